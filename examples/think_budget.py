"""A thinking budget and "answer now": bound how long SmolLM3 reasons before it answers.

    python examples/think_budget.py path/to/model "What is 2+2?" [BUDGET] [--answer-after SECONDS]

After BUDGET thinking tokens (default 64) the reasoning is closed the way the model closes it
(a short hand-off sentence, `</think>`), and the answer follows. `chat.stop_thinking()`, from
any thread (a button, a timer, Ctrl-C in `smollm3-mlx chat`), does the same at the next token:
--answer-after sets a timer that calls it.
"""

import sys
import threading

from smollm3_mlx import AnswerDelta, Chat, Done, ThinkingDelta, load


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_path = args[0] if args else "HuggingFaceTB/SmolLM3-3B"
    question = args[1] if len(args) > 1 else "What is 2+2?"
    budget = int(args[2]) if len(args) > 2 else 64
    model, _ = load(model_path)
    chat = Chat(model, think=True, think_budget=budget)
    if "--answer-after" in sys.argv:
        seconds = float(sys.argv[sys.argv.index("--answer-after") + 1])
        threading.Timer(seconds, chat.stop_thinking).start()
    for event in chat.send(question):
        if isinstance(event, ThinkingDelta):
            print(event.text, end="", file=sys.stderr, flush=True)
        elif isinstance(event, AnswerDelta):
            print(event.text, end="", flush=True)
        elif isinstance(event, Done):
            s = event.stats
            print()
            print(
                f"[{event.finish_reason}: thought for {s.thinking_tokens} tokens "
                f"(budget {budget}), answered in {s.answer_tokens}]",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
