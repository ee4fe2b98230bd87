"""`smollm3-mlx serve` measured from a client: its overhead, and what the prompt cache saves.

    python benchmarks/bench_server.py --model DIR [--tokens 128] [--history 1000] [--runs 5]

1. Overhead: decode tokens/s of one greedy answer streamed through the server (the official
   `openai` client, SSE, a server in its own process) against `Chat.send` in this process, on the
   same model folder; the runs alternate. Both are clocked the same way, from the first text to
   the end of the answer: (tokens - 1) / seconds. Goal: server / in-process >= 0.97.
2. Time to first token of a follow-up turn over a history of about --history tokens: the client
   resends the whole conversation (as OpenAI clients do) with a new question, max_tokens=1, not
   streamed; the time is the whole request (prefill + one token + HTTP). Hit: a server whose
   prompt-cache LRU holds the conversation (each run asks a new question, so only the history is
   reused); cold: a server started with --cache-bytes 0. Goal: hit <= 0.05 x cold.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from openai import OpenAI

from smollm3_mlx import AnswerDelta, Chat, Done, ThinkingDelta, Tokenizer, load

FILLER = (
    "The harbour town kept its records in a long ledger: arrivals, departures, the weather at "
    "dawn, the price of salt, and the names of the ships that came in from the north. "
)


class Server:
    """`smollm3-mlx serve` in a subprocess, on a free port."""

    def __init__(self, model: str, *args: str):
        command = [sys.executable, "-m", "smollm3_mlx.cli", "serve", "--model", model,
                   "--port", "0", "--model-name", "bench", *args]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline() if self.proc.stdout else ""
        if not ready.startswith("ready: "):
            raise SystemExit(f"the server did not start: {ready!r}")
        self.client = OpenAI(base_url=ready.split()[1], api_key="none", max_retries=0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def served_tps(server: Server, question: str, tokens: int) -> tuple[float, int]:
    stream = server.client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = 0.0
    n = 0
    for chunk in stream:
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content or getattr(c.delta, "reasoning_content", None):
                first = first or time.perf_counter()
                last = time.perf_counter()
    return (n - 1) / (last - first), n


def local_tps(model, question: str, tokens: int) -> tuple[float, int]:
    chat = Chat(model, temperature=0.0, top_p=1.0, max_tokens=tokens)
    first = last = 0.0
    n = 0
    for event in chat.send(question):
        if isinstance(event, ThinkingDelta | AnswerDelta) and event.text:
            first = first or time.perf_counter()
            last = time.perf_counter()
        elif isinstance(event, Done):
            n = event.stats.generation_tokens - (event.finish_reason == "stop")
    return (n - 1) / (last - first), n


def history(tokenizer, target: int) -> list[dict[str, str]]:
    """User and assistant turns of filler text, about `target` tokens once rendered."""
    messages: list[dict[str, str]] = []
    while True:
        n = len(tokenizer.apply_chat_template(messages, tokenize=True)) if messages else 0
        if n >= target:
            return messages
        messages += [
            {"role": "user", "content": f"Turn {len(messages) // 2}: what does the ledger say? "},
            {"role": "assistant", "content": FILLER * 2},
        ]


def follow_up_seconds(server: Server, past: list[dict[str, str]], k: int) -> tuple[float, int]:
    messages = [*past, {"role": "user", "content": f"Question {k}: what came in today?"}]
    start = time.perf_counter()
    r = server.client.chat.completions.create(
        model="bench", messages=messages, temperature=0, max_tokens=1
    )
    seconds = time.perf_counter() - start
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    return seconds, r.usage.prompt_tokens_details.cached_tokens or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (part 1)")
    parser.add_argument("--history", type=int, default=1000, help="history tokens (part 2)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--question", default="Sing me a song.")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    args = parser.parse_args()
    print(f"{platform.platform()}, {platform.machine()}, Python {platform.python_version()}")

    if 1 in args.parts:
        overhead(args, load(args.model)[0])
    if 2 in args.parts:  # only the servers hold the model
        follow_up(args, Tokenizer.from_folder(args.model))


def overhead(args: argparse.Namespace, model) -> None:
    server = Server(args.model)
    try:
        local_tps(model, args.question, 8)  # warm up both
        served_tps(server, args.question, 8)
        local, served = [], []
        for _ in range(args.runs):  # alternating, so that other load falls on both alike
            tps, n_local = local_tps(model, args.question, args.tokens)
            local.append(tps)
            tps, n_served = served_tps(server, args.question, args.tokens)
            served.append(tps)
            assert n_local == n_served, (n_local, n_served)
        a, b = statistics.median(local), statistics.median(served)
        print(f"1. decode, {n_local} tokens, median of {args.runs}: in-process {a:.2f} tok/s, "
              f"server {b:.2f} tok/s, server / in-process = {b / a:.3f}")  # fmt: skip
    finally:
        server.close()


def follow_up(args: argparse.Namespace, tokenizer) -> None:
    past = history(tokenizer, args.history)
    server = Server(args.model)
    try:
        first, _ = follow_up_seconds(server, past, 0)  # the conversation enters the cache
        hits = [follow_up_seconds(server, past, k) for k in range(1, args.runs + 1)]
    finally:
        server.close()
    cold_server = Server(args.model, "--cache-bytes", "0")
    try:
        follow_up_seconds(cold_server, past, 0)
        colds = [follow_up_seconds(cold_server, past, k) for k in range(1, args.runs + 1)]
    finally:
        cold_server.close()
    n = len(tokenizer.apply_chat_template(
        [*past, {"role": "user", "content": "Question 1: what came in today?"}], tokenize=True
    ))  # fmt: skip
    hit, cold = statistics.median(s for s, _ in hits), statistics.median(s for s, _ in colds)
    print(f"2. follow-up over {n} prompt tokens, median of {args.runs}: "
          f"hit {hit * 1000:.1f} ms (cached {hits[0][1]}), cold {cold * 1000:.1f} ms "
          f"(cached {colds[0][1]}; first request {first * 1000:.1f} ms), "
          f"hit / cold = {hit / cold:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
