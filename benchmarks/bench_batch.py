"""Continuous batching measured: fairness, throughput, memory, and a load test of the server.

    python benchmarks/bench_batch.py --model DIR [--parts 1 2 3 4] [--streams 1 2 4 8]

1. Fairness: one long request running (a --long-prompt prompt, a long answer), a short one sent
   once the long one decodes: the short one's time to first token and decode speed, on the
   batched engine (`Engine(max_batch=8)`) against the engine as it was, one request at a time
   (`Engine(max_batch=1)`: the short one waits for the long one). In process, no HTTP.
2. Throughput: aggregate decode tokens/s of N greedy streams (short prompts, --tokens each)
   run together (`stream_batch`) against the same N run one after another (`stream_generate`),
   and, when mlx-lm is installed, its `batch_generate` on the same folder.
3. Memory: the peak (mx.get_peak_memory) of 8 rows, each prefilled to --context tokens and
   decoding, against `memory.estimate(batch=8)`.
4. Load test: the batched server (uvicorn on loopback, in a thread), 32 concurrent streaming
   clients with mixed lengths, some leaving mid-answer and some cancelling early: every answer
   complete or cleanly cancelled, none lost, MLX's active memory back where it was after it.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import threading
import time

import mlx.core as mx
import numpy as np

from smollm3_mlx import load
from smollm3_mlx.batch import BatchGenerator, stream_batch
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.memory import estimate_memory
from smollm3_mlx.sample import Sampling

GREEDY = Sampling(temperature=0.0, top_p=1.0)


def ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(1000, min(vocab, 100_000), n).tolist()


def no_end(tokenizer):
    eos = mx.array(sorted(tokenizer.eos_token_ids))
    return [lambda tokens, logits: logits.at[:, eos].add(-mx.inf)]  # every row runs to the end


def fairness(model, tokenizer, args) -> None:
    from smollm3_mlx.serve.engine import Engine, Finished, Job, Token

    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    long_prompt, short_prompt = ids(rng, args.long_prompt, vocab), ids(rng, 16, vocab)
    print(f"\n## 1. fairness: long {args.long_prompt}+{args.long_tokens}, short 16+{args.tokens}")
    print("| engine | short TTFT s | short decode tok/s | long total s |")
    print("|---|---:|---:|---:|")
    for max_batch in (1, 8):
        engine = Engine(model, tokenizer, max_batch=max_batch, cache_bytes=0)
        engine.start()
        times: dict[str, list[float]] = {"long": [], "short": []}
        done = {k: threading.Event() for k in times}
        emit = {k: _recorder(Token, Finished, times[k], done[k]) for k in times}
        procs = no_end(tokenizer)
        start = time.perf_counter()
        engine.submit(
            Job(long_prompt, args.long_tokens, GREEDY, processors=procs, emit=emit["long"])
        )
        while not times["long"]:
            time.sleep(0.01)
        sent = time.perf_counter()
        engine.submit(Job(short_prompt, args.tokens, GREEDY, processors=procs, emit=emit["short"]))
        done["short"].wait()
        done["long"].wait()
        engine.stop()
        short = times["short"]
        ttft, rate = short[0] - sent, (len(short) - 1) / (short[-1] - short[0])
        label = "batched (max_batch 8)" if max_batch > 1 else "one at a time (max_batch 1)"
        print(f"| {label} | {ttft:.2f} | {rate:.2f} | {times['long'][-1] - start:.1f} |")


def _recorder(token_type, finished_type, times: list[float], done: threading.Event):
    """An `emit` that records when each token came and sets `done` at the end."""

    def emit(item):
        if isinstance(item, token_type):
            times.append(time.perf_counter())
        elif isinstance(item, finished_type):
            done.set()

    return emit


def throughput(model, tokenizer, args) -> None:
    rng = np.random.default_rng(1)
    vocab = model.args.vocab_size
    print(f"\n## 2. throughput: N streams x {args.tokens} tokens, prompts of 8")
    print("| streams | serial tok/s | batched tok/s | batched / serial | mlx-lm batch tok/s |")
    print("|---:|---:|---:|---:|---:|")
    procs = no_end(tokenizer)
    for n in args.streams:
        prompts = [ids(rng, 8, vocab) for _ in range(n)]
        start = time.perf_counter()
        for p in prompts:
            for _ in stream_generate(
                model,
                tokenizer,
                p,
                max_tokens=args.tokens,
                sampling=GREEDY,
                logits_processors=procs,
            ):
                pass
        serial = n * args.tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in stream_batch(
            model,
            tokenizer,
            prompts,
            max_batch=n,
            max_tokens=args.tokens,
            sampling=GREEDY,
            logits_processors=procs,
        ):
            pass
        batched = n * args.tokens / (time.perf_counter() - start)
        theirs = mlx_lm_batch(args.model, prompts, args.tokens)
        shown = f"{theirs:.2f}" if theirs else "n/a"
        print(f"| {n} | {serial:.2f} | {batched:.2f} | {batched / serial:.2f} | {shown} |")


_MLX_LM: dict = {}


def mlx_lm_batch(path: str, prompts: list[list[int]], tokens: int) -> float | None:
    """mlx-lm's own `batch_generate` on the same folder (aggregate tokens/s), or None."""
    try:
        from mlx_lm import batch_generate, load as mlx_lm_load
    except ImportError:
        return None
    if "model" not in _MLX_LM:
        _MLX_LM["model"], _MLX_LM["tokenizer"] = mlx_lm_load(path)
        if mx.default_device() == mx.cpu:  # as ours computes there (bfloat16 is slow on a CPU)
            _MLX_LM["model"].set_dtype(mx.float32)
        mx.eval(_MLX_LM["model"].parameters())  # loaded lazily: not inside the timing
        batch_generate(_MLX_LM["model"], _MLX_LM["tokenizer"], prompts[:1], max_tokens=2)
    start = time.perf_counter()
    out = batch_generate(
        _MLX_LM["model"], _MLX_LM["tokenizer"], prompts, max_tokens=tokens, return_token_ids=True
    )
    seconds = time.perf_counter() - start
    return sum(len(t) for t in out.token_ids) / seconds  # it stops at an end of turn


def memory(model, tokenizer, args) -> None:
    rng = np.random.default_rng(2)
    vocab = model.args.vocab_size
    dtype = str(model.model.norm.weight.dtype).removeprefix("mlx.core.")
    est = estimate_memory(args.model, max_context=args.context, dtype=dtype, batch=8)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    gen = BatchGenerator(model, tokenizer, max_batch=8)
    prompt_len = args.context - args.tokens - 1
    for _ in range(8):
        gen.insert(
            ids(rng, prompt_len, vocab),
            max_tokens=args.tokens,
            sampling=GREEDY,
            logits_processors=no_end(tokenizer),
        )
    together = 0
    while len(gen):
        gen.step()
        together = max(together, len(gen.decoding))
    mx.synchronize()
    peak = mx.get_peak_memory()
    print(f"\n## 3. memory: 8 rows x {args.context} tokens ({together} decoding together)")
    print("| measured peak MB | estimate MB | estimate / measured |")
    print("|---:|---:|---:|")
    print(f"| {peak / 1e6:.1f} | {est.total / 1e6:.1f} | {est.total / peak:.3f} |")


def load_test(model, tokenizer, args) -> None:
    import httpx
    import uvicorn

    from smollm3_mlx.serve.app import make_app
    from smollm3_mlx.serve.engine import Engine

    engine = Engine(model, tokenizer, max_batch=8, queue_size=32, cache_bytes=0)
    app = make_app(engine, model_name="bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/chat/completions"

    async def one(http, i):
        body = {
            "model": "bench",
            "stream": True,
            "temperature": 0,
            "max_tokens": [4, 12, 24, 48][i % 4],
            "messages": [{"role": "user", "content": "word " * (5 + 40 * (i % 3))}],
        }
        leave = i % 8 == 3  # disconnects after a few chunks
        cancel_early = i % 8 == 5  # gives up before the first chunk
        n = 0
        try:
            async with http.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    return f"http {r.status_code}"
                async for line in r.aiter_lines():
                    if cancel_early:
                        return "cancelled"
                    if line == "data: [DONE]":
                        return "done"
                    n += line.startswith("data: ")
                    if leave and n == 3:
                        return "left"
        except httpx.HTTPError as e:
            return f"error {type(e).__name__}"
        return "no [DONE]"

    async def crowd():
        async with httpx.AsyncClient(timeout=600) as http:
            return await asyncio.gather(*(one(http, i) for i in range(args.clients)))

    before = mx.get_active_memory()
    start = time.perf_counter()
    outcomes = asyncio.run(crowd())
    seconds = time.perf_counter() - start
    deadline = time.monotonic() + 60
    while engine.busy or engine.waiting:
        assert time.monotonic() < deadline, "the engine did not drain"
        time.sleep(0.05)
    mx.clear_cache()
    after = mx.get_active_memory()
    server.should_exit = True
    thread.join(timeout=60)
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    records = {r.reason: 0 for r in engine.records}
    for r in engine.records:
        records[r.reason] += 1
    print(f"\n## 4. load test: {args.clients} streaming clients, max_batch 8, queue 32")
    print(f"clients: {counts}; engine records: {records}; {seconds:.1f} s")
    print(f"active memory before {before / 1e6:.1f} MB, after {after / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=16, help="tokens per short answer")
    parser.add_argument("--long-prompt", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--context", type=int, default=512, help="each row's context (part 3)")
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    mx.eval(model.parameters())
    with open("/proc/loadavg") as f:
        load_avg = f.read().split()[:3]
    print(
        f"{platform.platform()}, MLX {mx.__version__} on {mx.default_device()}, "
        f"load average {' '.join(load_avg)}"
    )
    parts = {1: fairness, 2: throughput, 3: memory, 4: load_test}
    for part in args.parts:
        parts[part](model, tokenizer, args)


if __name__ == "__main__":
    main()
