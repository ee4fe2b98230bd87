"""Tool calling with two Python functions: the model calls them, we run them, it answers.

    python examples/tools.py path/to/model "What is the weather in Paris?"

Each function's signature and docstring become its JSON schema (`smollm3_mlx.tool_schema`),
offered to the model through the chat template's `xml_tools`.
"""

import sys

from smollm3_mlx import AnswerDelta, Chat, ToolCall, ToolCallError, load


def get_weather(city: str) -> dict[str, object]:
    """Get the current weather in a city.

    Args:
        city: The city's name, for example Paris.
    """
    return {"temperature": 22, "condition": "sunny"}  # a stand-in for a weather service


def to_fahrenheit(celsius: float) -> float:
    """Convert a temperature from degrees Celsius to degrees Fahrenheit.

    Args:
        celsius: The temperature in degrees Celsius.
    """
    return celsius * 9 / 5 + 32


def main() -> None:
    model_path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
    question = sys.argv[2] if len(sys.argv) > 2 else "What is the weather in Paris?"
    model, _ = load(model_path)
    chat = Chat(model, think=False, tools=[get_weather, to_fahrenheit])

    events = chat.send(question)
    for _ in range(5):  # a few rounds of calls at most
        results = []
        for event in events:
            if isinstance(event, AnswerDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, ToolCall):
                results.append(chat.run_tool(event))
                print(f"[{event.name}({event.arguments}) -> {results[-1]}]")
            elif isinstance(event, ToolCallError):
                results.append(f"Error: {event.error}")  # tell the model, let it retry
        if not results:
            break
        events = chat.send_tool_result(*results)
    print()


if __name__ == "__main__":
    main()
