"""Answer a question about a long text file, past the trained 64K window if need be.

    python examples/long_document.py MODEL report.txt "What did the audit find?" --max-context 98304

Past 65,536 tokens, `max_context` switches on YaRN (factor max_context / 65536), as SmolLM3's model
card recommends for 128K. The reasoning goes to stderr, the answer to stdout.
"""

import argparse
import sys
from pathlib import Path

from smollm3_mlx import ModelLoadError, TurnIds, TurnState, load, stream_generate


def main() -> None:
    parser = argparse.ArgumentParser(description="Answer a question about a long text file.")
    parser.add_argument("model", help="model folder or hub repo id")
    parser.add_argument("file", type=Path, help="the text to read")
    parser.add_argument("question")
    parser.add_argument(
        "--max-context", type=int, help="up to 131072; default: the trained window (65536)"
    )
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()

    try:
        model, tokenizer = load(args.model, max_context=args.max_context)
    except ModelLoadError as e:  # e.g. more context than YaRN reaches
        sys.exit(f"error: {e}")
    document = args.file.read_text()
    messages = [{"role": "user", "content": f"{document}\n\nQuestion: {args.question}"}]
    # tokenize=True keeps the document's text from ever becoming control tokens.
    prompt = tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=args.think)
    assert isinstance(prompt, list)  # token ids, as tokenize=True asks
    print(f"[{len(prompt)} prompt tokens of {model.max_context}]", file=sys.stderr)

    turn = TurnState(TurnIds.of(tokenizer), prompt)  # where the turn stands: thinking or not
    try:
        for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens):
            # the last response's token, if any, came already: only its text is new
            token = response.token if response.finish_reason is None else None
            for kind, text in turn.split(token, response.text):
                out = sys.stderr if kind == "thinking" else sys.stdout
                print(text, end="", flush=True, file=out)
    except ValueError as e:  # the document does not fit the context
        sys.exit(f"error: {e}")
    print()


if __name__ == "__main__":
    main()
