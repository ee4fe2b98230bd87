"""Stream a turn: the reasoning as it is written (on stderr), then the answer (on stdout).

python examples/streaming.py path/to/model "What is 2+2?"
"""

import sys

from smollm3_mlx import AnswerDelta, Chat, Done, ThinkingDelta, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
question = sys.argv[2] if len(sys.argv) > 2 else "What is 2+2?"

model, _ = load(model_path)
chat = Chat(model, think=True)
for event in chat.send(question):
    if isinstance(event, ThinkingDelta):
        print(event.text, end="", file=sys.stderr, flush=True)
    elif isinstance(event, AnswerDelta):
        print(event.text, end="", flush=True)
    elif isinstance(event, Done):
        s = event.stats
        print()
        print(
            f"[{event.finish_reason}: thought for {s.thinking_tokens} tokens, "
            f"{s.generation_tokens} tokens at {s.generation_tps:.1f} tok/s]",
            file=sys.stderr,
        )
