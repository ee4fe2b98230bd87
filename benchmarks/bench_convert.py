"""Convert the full-size SmolLM3-3B layout (random bf16 weights) with smollm3-mlx and mlx-lm.

Each conversion runs in its own subprocess; the table gives its wall time (process start to exit,
imports included), its peak resident memory (the child's own ru_maxrss) and the output's size.
The source shards are read once before the runs, so every run starts with them in the page cache.

    python benchmarks/bench_convert.py [--bits 4 8] [--repeat N] [--keep]

With --repeat N each conversion runs N times (the tools alternating) and the table keeps each
one's fastest run and lowest peak, so that other load on a shared machine weighs less.

The checkpoint is built (once) by convert/make_random_checkpoint.py in $SMOLLM3_BENCH_CACHE or
benchmarks/.cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SMOLLM3_BENCH_CACHE", REPO_ROOT / "benchmarks" / ".cache"))
CHECKPOINT = CACHE / "smollm3-3b-random"

# Each runner converts argv[1] to argv[2] at argv[3] bits, then prints its peak RSS in bytes.
PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
RUNNERS = {
    "smollm3-mlx": (
        "import sys; from smollm3_mlx.convert import convert\n"
        "convert(sys.argv[1], sys.argv[2], bits=int(sys.argv[3]))\n" + PEAK
    ),
    "mlx-lm": (
        "import sys; from mlx_lm.convert import convert\n"
        "convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=int(sys.argv[3]))\n" + PEAK
    ),
}
RECIPES = {
    "smollm3-mlx": {4: "mixed (head 8-bit)", 8: "uniform"},
    "mlx-lm": {4: "uniform", 8: "uniform"},
}


def run(tool: str, bits: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNERS[tool], str(CHECKPOINT), str(out), str(bits)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{tool} q{bits} failed:\n{proc.stderr[-3000:]}")
    weights = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    return {
        "tool": tool,
        "bits": bits,
        "recipe": RECIPES[tool][bits],
        "seconds": seconds,
        "peak_rss": int(proc.stdout.strip().splitlines()[-1]),
        "size": weights,
        "quantization": config["quantization"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each conversion")
    parser.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = parser.parse_args()

    subprocess.run(
        [sys.executable, str(REPO_ROOT / "convert" / "make_random_checkpoint.py"),
         str(CHECKPOINT), "--if-missing"],
        check=True,
    )  # fmt: skip
    for f in CHECKPOINT.glob("*.safetensors"):  # warm the page cache for every run alike
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    import mlx.core as mx

    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, {total_mem / 2**30:.1f} GiB RAM")
    print(f"# mlx {mx.__version__}, default device {mx.default_device()}")
    print(f"# load average before the runs: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    rows = []
    for bits in args.bits:
        runs: dict[str, list[dict]] = {"mlx-lm": [], "smollm3-mlx": []}
        for _ in range(args.repeat):
            for tool, results in runs.items():
                out = CACHE / f"bench-{tool}-q{bits}"
                results.append(run(tool, bits, out))
                if not args.keep:
                    shutil.rmtree(out)
                r = results[-1]
                print(f"  {tool} q{bits}: {r['seconds']:.1f} s, {r['peak_rss'] / 2**20:.0f} MiB")
        for results in runs.values():
            best = min(results, key=lambda r: r["seconds"])
            rows.append({**best, "peak_rss": min(r["peak_rss"] for r in results)})

    print("\n| tool | bits | recipe | wall time (s) | peak RSS (MiB) | weights on disk (MB) |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['bits']} | {r['recipe']} | {r['seconds']:.1f} "
            f"| {r['peak_rss'] / 2**20:.0f} | {r['size'] / 1e6:.0f} |"
        )
    print("\n| bits | time ours/mlx-lm | peak RSS ours/mlx-lm |")
    print("|---|---:|---:|")
    for bits in args.bits:
        theirs, ours = (next(r for r in rows if r["bits"] == bits and r["tool"] == t)
                        for t in ("mlx-lm", "smollm3-mlx"))  # fmt: skip
        print(
            f"| {bits} | {ours['seconds'] / theirs['seconds']:.2f} "
            f"| {ours['peak_rss'] / theirs['peak_rss']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
