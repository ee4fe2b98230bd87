"""Structured output: an answer that is JSON valid against a schema, or one of a few strings.

    python examples/structured_output.py path/to/model "Describe Paris."

The schema holds the answer token by token (the thinking stays free), so the answer always
parses: `Done.parsed` holds the value. A Pydantic model class works as well
(`response_format=City` gives a `City`), and so do `{"type": "regex", "pattern": ...}` and a
list of strings.
"""

import json
import sys

from smollm3_mlx import Chat, Done, load

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 40_000_000},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
    },
    "required": ["name", "country", "landmarks"],
    "additionalProperties": False,
}


def ask(chat: Chat, question: str, response_format: object) -> Done:
    *_, done = chat.send(question, response_format=response_format)
    assert isinstance(done, Done)
    if done.parsed is None:  # cut short by max_tokens, or cancelled: no complete value
        sys.exit(f"no complete answer ({done.finish_reason}): {done.answer!r}")
    return done


def main() -> None:
    model_path = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM3-3B"
    question = sys.argv[2] if len(sys.argv) > 2 else "Describe Paris."
    model, _ = load(model_path)
    chat = Chat(model, think=False, max_tokens=512)
    city = ask(chat, question, CITY).parsed
    print(json.dumps(city, ensure_ascii=False))
    capital = ask(chat, "Is it a capital city?", ["yes", "no"]).parsed
    print(f"capital: {capital}")


if __name__ == "__main__":
    main()
