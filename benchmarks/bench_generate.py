"""Generation speed of smollm3-mlx vs mlx-lm on the same converted SmolLM3-3B folders.

Builds once (cached in $SMOLLM3_BENCH_CACHE or benchmarks/.cache/) the full-size random SmolLM3-3B
checkpoint and its 4-bit (mixed) and 8-bit conversions, then times on each, alternating the
runtimes in one process: prefill tok/s (prompt-only runs), decode tok/s (greedy), time to first
token and peak memory. Each runtime's own `stream_generate` is timed from outside on one clock
(see smollm3_mlx/bench.py).

    python benchmarks/bench_generate.py                # the protocol for this device (below)
    python benchmarks/bench_generate.py --prefill 512 2048 --decode 128 --runs 5

The full protocol (512 and 2048-token prefill, 128 decoded tokens) is the default on a GPU. On
the CPU backend a 3B model decodes at under 1 tok/s (and mlx-lm, computing in bfloat16 there,
ten times slower), so the CPU default is a reduced protocol that finishes in about 20 minutes.

mlx-lm runs twice: as a user gets it ("mlx-lm": it computes in the stored bfloat16) and with its
scales, biases and norms cast to float32 ("mlx-lm float32"), which is the same math as ours on
the CPU. On a GPU both runtimes compute in bfloat16 and the second run is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "convert"))

from make_random_checkpoint import make_random_checkpoint  # noqa: E402

from smollm3_mlx import load  # noqa: E402
from smollm3_mlx.bench import bench, mlx_lm_runners, smollm3_runner  # noqa: E402

CACHE = Path(os.environ.get("SMOLLM3_BENCH_CACHE", REPO_ROOT / "benchmarks" / ".cache"))
CHECKPOINT = CACHE / "smollm3-3b-random"
# (prefill prompt lengths, decode prompt length, decoded tokens, runs) per device
# On the CPU a quantized matmul costs the same per token at any prompt length (measured: no
# batching gain from 1 to 32 rows), so short prompts give the long prompts' tok/s up to the
# attention cost, which is small beside the matmuls at these lengths.
PROTOCOL = {"gpu": ([512, 2048], 32, 128, 5), "cpu": ([8], 4, 5, 3)}
SLOW_PROTOCOL = (2, 1, 3, 1)  # the CPU's bfloat16 quantized kernels: ~10x slower again


def model_folder(bits: int) -> Path:
    """The converted folder, built once; made under a temporary name and renamed when complete,
    so that two benchmark processes building at once never see or delete a partial folder."""
    out = CACHE / f"smollm3-3b-random-q{bits}"
    if (out / "config.json").exists():
        return out
    from smollm3_mlx.convert import convert

    make_random_checkpoint(CHECKPOINT, if_missing=True)
    tmp = CACHE / f".{out.name}.build-{os.getpid()}"
    print(f"converting {CHECKPOINT.name} to {bits}-bit into {out}", flush=True)
    convert(CHECKPOINT, tmp, bits=bits, force=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    elif platform.system() == "Darwin":
        cpu = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    import mlx_lm

    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, "
        f"device {mx.default_device()}; MLX {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}"
    )


def row(bits: int, what: str, r, ours) -> str:
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
    if what == "decode":
        value, base = r.decode_tps, ours.decode_tps
        size = f"{r.generation_tokens} tokens after {r.prompt_tokens}"
    else:
        value, base = r.prefill_tps, ours.prefill_tps
        size = f"{r.prompt_tokens}-token prompt"
    return (
        f"| q{bits} | {what} | {size} | {r.runtime} | {r.dtype} | {value:.3f} | "
        f"{r.time_to_first_token:.2f} | {r.peak_memory:.2f} | {ratio(base, value)} |"
    )


def main() -> int:
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    prefill, decode_prompt, decode, runs = PROTOCOL[device]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--prefill", type=int, nargs="*", default=prefill, help="prompt lengths")
    parser.add_argument("--decode", type=int, default=decode, help="tokens decoded (0: skip)")
    parser.add_argument("--decode-prompt", type=int, default=decode_prompt)
    parser.add_argument("--runs", type=int, default=runs, help="timed runs; medians reported")
    parser.add_argument(
        "--mlx-lm",
        nargs="*",
        choices=["default", "float32"],
        default=["default", "float32"] if device == "cpu" else ["default"],
        help="which mlx-lm runs: as it runs by default, and/or computing in float32",
    )
    parser.add_argument(
        "--slow-sizes",
        type=int,
        nargs=4,
        default=SLOW_PROTOCOL if device == "cpu" else None,
        metavar=("PREFILL", "DECODE_PROMPT", "DECODE", "RUNS"),
        help="smaller sizes for runtimes computing in half precision on the CPU, whose "
        "quantized kernels are ~10x slower there; ours is timed at these sizes too",
    )
    args = parser.parse_args()

    print(f"# Generation speed: smollm3-mlx vs mlx-lm\n\n{machine()}")
    print("command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    lines = [
        "| model | measure | size | runtime | computes in | tok/s | first token (s) | "
        "peak memory (GB) | ours/this |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for bits in args.bits:
        folder = model_folder(bits)
        model, tokenizer = load(folder)
        ours = smollm3_runner(model, tokenizer)
        dtypes = [None if v == "default" else mx.float32 for v in args.mlx_lm]
        theirs = mlx_lm_runners(folder, dtypes) if dtypes else []
        # Runtimes computing in half precision on the CPU get the small sizes, beside ours.
        slow = [r for r in theirs if device == "cpu" and "float32" not in r.dtype]
        fast = [ours, *(r for r in theirs if r not in slow)]
        plans = [(fast, args.prefill, args.decode_prompt, args.decode, args.runs)]
        if slow and args.slow_sizes:
            p, dp, d, n = args.slow_sizes
            plans.append(([ours, *slow], [p] if p else [], dp, d, n))
        warm = set()  # each runner is warmed up once
        for runners, prefill_sizes, decode_prompt_len, decode_tokens, n_runs in plans:
            for size in prefill_sizes:
                results = bench(
                    runners, prompt_tokens=size, generation_tokens=1, runs=n_runs,
                    warmup=any(r.name not in warm for r in runners),
                )  # fmt: skip
                warm.update(r.name for r in runners)
                lines += [row(bits, "prefill", r, results[0]) for r in results]
                print("\n".join(lines[-len(results) :]), flush=True)
            if decode_tokens:
                results = bench(
                    runners,
                    prompt_tokens=decode_prompt_len,
                    generation_tokens=decode_tokens,
                    runs=n_runs,
                    warmup=any(r.name not in warm for r in runners),
                )
                warm.update(r.name for r in runners)
                lines += [row(bits, "decode", r, results[0]) for r in results]
                print("\n".join(lines[-len(results) :]), flush=True)
        del model, tokenizer, ours, theirs, fast, slow, plans
        mx.clear_cache()
    print("\n" + "\n".join(lines))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
