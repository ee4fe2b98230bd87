"""Talk to `smollm3-mlx serve` with the official OpenAI client: the reasoning as it streams (on
stderr), then the answer (on stdout); then the same question with thinking switched off.

smollm3-mlx serve &                 # http://127.0.0.1:8000/v1
python examples/openai_client.py "What is 2+2?" [--base-url http://127.0.0.1:8000/v1]
"""

import argparse
import os
import sys

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("question", nargs="?", default="What is 2+2?")
parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
args = parser.parse_args()

# The key matters only if the server was started with --api-key.
client = OpenAI(base_url=args.base_url, api_key=os.environ.get("SMOLLM3_MLX_API_KEY", "none"))
model = client.models.list().data[0].id  # the one model the server serves

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": args.question}],
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:  # the last chunk
        details = chunk.usage.completion_tokens_details
        thought = details.reasoning_tokens if details else 0
        print(f"\n[{chunk.usage.completion_tokens} tokens, {thought} of them thinking]",
              file=sys.stderr)  # fmt: skip
    for choice in chunk.choices:
        reasoning = getattr(choice.delta, "reasoning_content", None)  # a field OpenAI lacks
        if reasoning:
            print(reasoning, end="", file=sys.stderr, flush=True)
        if choice.delta.content:
            print(choice.delta.content, end="", flush=True)
print()

# Thinking off for one request, as vLLM and SGLang spell it for SmolLM3.
quick = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": args.question}],
    extra_body={"chat_template_kwargs": {"enable_thinking": False}},
)
print(f"[no thinking] {quick.choices[0].message.content}", file=sys.stderr)
