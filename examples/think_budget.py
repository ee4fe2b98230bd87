"""A thinking budget and "answer now": bound how long SmolLM3 reasons before it answers.

    python examples/think_budget.py path/to/model "What is 2+2?" [BUDGET] [--answer-after SECONDS]

After BUDGET thinking tokens (default 64) the reasoning is closed the way the model closes it
(a short hand-off sentence, `</think>`), and the answer follows. `chat.stop_thinking()`, from
any thread (a button, a timer, Ctrl-C in `smollm3-mlx chat`), does the same at the next token:
--answer-after sets a timer that calls it.
"""

import argparse
import sys
import threading

from smollm3_mlx import AnswerDelta, Chat, Done, ThinkingDelta, load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="HuggingFaceTB/SmolLM3-3B")
    parser.add_argument("question", nargs="?", default="What is 2+2?")
    parser.add_argument("budget", nargs="?", type=int, default=64)
    parser.add_argument("--answer-after", type=float, metavar="SECONDS")
    args = parser.parse_args()
    model, _ = load(args.model)
    chat = Chat(model, think=True, think_budget=args.budget)
    if args.answer_after is not None:
        threading.Timer(args.answer_after, chat.stop_thinking).start()
    budget, question = args.budget, args.question
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
