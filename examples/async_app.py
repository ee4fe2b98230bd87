"""An app's event loop stays free while the model answers: `asend` generates off the loop.

    python examples/async_app.py path/to/model "What is 2+2?" "Say hi."

A ticker task keeps running beside the answer, as a UI would.
"""

import asyncio
import sys

from smollm3_mlx import AnswerDelta, Chat, Done, load


async def ticker(ticks: list[int]) -> None:
    while True:  # stands for the app's UI: it keeps getting the loop
        await asyncio.sleep(0.01)
        ticks.append(1)


async def main(model_path: str, questions: list[str]) -> None:
    model, _ = load(model_path)
    chat = Chat(model, think=False)
    ticks: list[int] = []
    ui = asyncio.create_task(ticker(ticks))
    for question in questions:
        print(f"> {question}")
        async for event in chat.asend(question):
            if isinstance(event, AnswerDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, Done):
                print(f"\n[{event.stats.generation_tokens} tokens]")
    ui.cancel()
    print(f"[the loop ran {len(ticks)} UI ticks meanwhile]")


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
    asyncio.run(main(path, sys.argv[2:] or ["What is 2+2?", "Say hi."]))
