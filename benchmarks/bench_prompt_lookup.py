"""Prompt-lookup decoding on the full-size SmolLM3-3B shapes (random weights, 4-bit mixed).

    python benchmarks/bench_prompt_lookup.py [--tokens 24] [--draft 4 8] [--runs 1]

1. Cost of a verify pass: one forward pass over L tokens against one over a single token, at the
   same cache position. A draft of k tokens fully accepted gives k + 1 tokens for one pass of
   L = k + 1, so L / cost(L) is the most speed-up that draft length can bring.
2. Decode tok/s with and without prompt lookup, greedy, the runs alternating:
   - repetitive: the prompt holds a passage and the output quotes it. Random weights cannot quote,
     so a logits processor adds +100 to the passage's next token (in both modes): the model
     really runs every pass, and the draft is accepted because the model's output repeats.
   - non-repetitive: the random model's own greedy output (it does not repeat itself).
   Accepted tokens per verify pass, forward passes and the ratio with/without are printed.

With --float32-layers N both are repeated on a float32 model of the first N full-size layers
(with the full embedding and head), since the whole 3B in float32 needs 12 GB.

The checkpoint (convert/make_random_checkpoint.py) and its 4-bit mixed conversion are built once
in $SMOLLM3_BENCH_CACHE or benchmarks/.cache/ (existing folders are reused, never deleted).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from smollm3_mlx.convert import convert
from smollm3_mlx.loading import load
from smollm3_mlx.lookup import lookup_generate_step
from smollm3_mlx.step import LookupStats

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SMOLLM3_BENCH_CACHE", REPO_ROOT / "benchmarks" / ".cache"))
CHECKPOINT = CACHE / "smollm3-3b-random"
Q4 = CACHE / "smollm3-3b-random-q4"
PASSAGE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope."
)
OTHER = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ensure_model() -> Path:
    if not (CHECKPOINT / "config.json").exists():
        builder = REPO_ROOT / "convert" / "make_random_checkpoint.py"
        subprocess.run([sys.executable, builder, CHECKPOINT, "--if-missing"], check=True)
    if not (Q4 / "config.json").exists():
        convert(CHECKPOINT, Q4, bits=4, recipe="mixed")
    return Q4


def ensure_layers(layers: int) -> Path:
    path = CACHE / f"smollm3-3b-random-{layers}layers"
    builder = REPO_ROOT / "convert" / "make_random_checkpoint.py"
    subprocess.run(
        [sys.executable, builder, path, "--layers", str(layers), "--if-missing"], check=True
    )
    return path


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def quote(prompt_len: int, passage: list[int]):
    """A logits processor that makes the model continue with the passage, token by token."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        target = passage[(tokens.size - prompt_len) % len(passage)]
        return logits + 100 * (mx.arange(logits.shape[-1]) == target)

    return processor


def pass_cost(model, prompt: mx.array, lengths: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of one forward pass over L tokens after `prompt`, for each L."""
    cache = model.make_cache()
    model(prompt[None], cache=cache)
    mx.eval([c.state for c in cache])
    times: dict[int, list[float]] = {L: [] for L in lengths}
    for _ in range(repeats):
        for L in lengths:  # alternating, so that other load falls on all lengths alike
            start = time.perf_counter()
            mx.eval(model(prompt[:L][None], cache=cache))
            times[L].append(time.perf_counter() - start)
            for c in cache:
                c.trim(L)
    return {L: statistics.median(t) for L, t in times.items()}


def decode(model, prompt: mx.array, tokens: int, lookup: int, processors) -> dict:
    stats = LookupStats()
    steps = lookup_generate_step(
        prompt, model, max_tokens=tokens, logits_processors=processors,
        prompt_lookup=lookup, lookup_stats=stats,
    )  # fmt: skip
    first = None
    out = []
    for token, _ in steps:
        first = first or time.perf_counter()
        out.append(token)
    seconds = time.perf_counter() - first
    return {"tps": (len(out) - 1) / seconds, "tokens": out, "stats": stats}


def report(path: Path, dtype: str, args) -> None:
    """Print the cost of a verify pass and the decode speed with and without lookup."""
    model, tokenizer = load(path, dtype=dtype)
    print(f"\n== {path.name}, computing in {dtype} ==")
    quote_prompt = tokenizer.encode(f"Quote this passage exactly:\n\n{PASSAGE}\n\n")
    passage = tokenizer.encode(PASSAGE)
    other_prompt = tokenizer.encode(OTHER)
    lengths = sorted({1, 2, 3, *(d + 1 for d in args.draft)})
    cost = pass_cost(model, mx.array(quote_prompt), lengths, args.cost_repeats)
    n, repeats = len(quote_prompt), args.cost_repeats
    print(f"forward pass over L tokens after a {n}-token prompt (median of {repeats})")
    print(f"{'L':>3} {'seconds':>8} {'vs L=1':>7} {'L / cost (best speed-up)':>25}")
    for L in lengths:
        ratio = cost[L] / cost[1]
        print(f"{L:>3} {cost[L]:>8.3f} {ratio:>6.2f}x {L / ratio:>24.2f}x")

    tasks = {
        "repetitive (quote)": (quote_prompt, [quote(len(quote_prompt), passage)]),
        "non-repetitive": (other_prompt, []),
    }
    print(f"\ndecode, {args.tokens} tokens, greedy, {args.runs} run(s) of each")
    header = f"{'task':<20} {'lookup':>6} {'tok/s':>7} {'passes':>6} {'drafted':>7} {'accepted':>8}"
    print(header + f" {'acc/verify':>10} {'tok/pass':>8} {'speed-up':>8}")
    for task, (prompt, processors) in tasks.items():
        runs: dict[int, list[dict]] = {d: [] for d in (0, *args.draft)}
        for _ in range(args.runs):
            for lookup in runs:  # alternating, so that other load falls on all modes alike
                runs[lookup].append(
                    decode(model, mx.array(prompt), args.tokens, lookup, processors)
                )
        base = statistics.median(r["tps"] for r in runs[0])
        assert all(r["tokens"] == runs[0][0]["tokens"] for rs in runs.values() for r in rs)
        for lookup, rs in runs.items():
            s, tps = rs[-1]["stats"], statistics.median(r["tps"] for r in rs)
            per_verify = s.accepted / s.verified if s.verified else 0.0
            print(
                f"{task:<20} {lookup:>6} {tps:>7.3f} {s.passes:>6} {s.drafted:>7} "
                f"{s.accepted:>8} {per_verify:>10.2f} {args.tokens / s.passes:>8.2f} "
                f"{tps / base:>7.2f}x"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per run")
    parser.add_argument(
        "--draft", type=int, nargs="+", default=[4, 8], help="prompt_lookup: max draft tokens"
    )
    parser.add_argument("--runs", type=int, default=1, help="timed runs of each mode (medians)")
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument(
        "--float32-layers", type=int, default=0,
        help="also run a float32 model of this many full-size layers (the whole 3B needs 12 GB)",
    )  # fmt: skip
    parser.add_argument("--skip-q4", action="store_true", help="only the float32 model")
    args = parser.parse_args()

    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, {cpu_name()}")
    print(f"mlx {mx.__version__}, device {mx.default_device()}")
    print(f"command: python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    if not args.skip_q4:
        report(ensure_model(), "auto", args)
    if args.float32_layers:
        report(ensure_layers(args.float32_layers), "float32", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
