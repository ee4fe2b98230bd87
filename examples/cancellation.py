"""Stop an answer: from another thread with `chat.cancel()`, or by leaving the loop.

    python examples/cancellation.py path/to/model "Sing me a song."

The partial answer stays in the history, marked `interrupted` (Chat(on_cancel="drop") removes
the whole turn instead), and the chat goes on.
"""

import sys
import threading

from smollm3_mlx import AnswerDelta, Chat, Done, load

model_path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
question = sys.argv[2] if len(sys.argv) > 2 else "Sing me a song."

model, _ = load(model_path)
chat = Chat(model, think=False)

# 1. Another thread (a Stop button) cancels after a moment: generation stops within one step.
timer = threading.Timer(1.0, chat.cancel)
timer.start()
for event in chat.send(question):
    if isinstance(event, AnswerDelta):
        print(event.text, end="", flush=True)
    elif isinstance(event, Done):
        print(f"\n[{event.finish_reason} after {event.stats.generation_tokens} tokens]")
timer.cancel()

# 2. Leaving the loop early and closing the stream cancels too.
stream = chat.send(question)
for n, _event in enumerate(stream):
    if n == 10:
        break
stream.close()
print(
    f"[history: {len(chat.messages)} messages, last interrupted: "
    f"{chat.messages[-1].get('interrupted', False)}]"
)
