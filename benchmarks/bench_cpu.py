"""MLX's CPU backend: which weight format and compute dtype are fastest, and how many cores it uses.

Times one SmolLM3-3B projection (2048 -> 11008, the MLP's gate/up; and 11008 -> 2048, its down)
in every weight format a user can run on the CPU, for 1 row (a decode step) and 16 rows (a
prefill chunk), and scales the time to the whole model by parameter count (all of SmolLM3-3B's
matmuls, output head included: 3.07 G weights). Also reports CPU time / wall time (1.0 = one core
busy) and whether two CPU streams run at once.

    python benchmarks/bench_cpu.py [--rows 1 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import mlx.core as mx

MODEL_MATMUL_PARAMS = 36 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 11008) + 128256 * 2048
SHAPES = [(11008, 2048), (2048, 11008)]  # (out, in) as nn.Linear stores them
FORMATS = [  # name, bits (None: dense), weight dtype, activation dtype
    ("4-bit, float32 compute (ours on the CPU)", 4, None, mx.float32),
    ("4-bit, bfloat16 compute (mlx-lm's default)", 4, None, mx.bfloat16),
    ("8-bit, float32 compute (ours on the CPU)", 8, None, mx.float32),
    ("8-bit, bfloat16 compute (mlx-lm's default)", 8, None, mx.bfloat16),
    ("dense bfloat16", None, mx.bfloat16, mx.bfloat16),
    ("dense float16", None, mx.float16, mx.float16),
    ("dense float32 (bundled reference BLAS)", None, mx.float32, mx.float32),
]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeat: int) -> tuple[float, float]:
    """(median wall seconds, CPU seconds / wall seconds) of mx.eval(fn())."""
    mx.eval(fn())
    walls, cpu0, start = [], cpu_seconds(), time.perf_counter()
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), (cpu_seconds() - cpu0) / (time.perf_counter() - start)


def matmul(x: mx.array, w, bits: int | None, stream=None):
    if bits is None:
        return mx.matmul(x, w.T, stream=stream)
    return mx.quantized_matmul(x, *w, transpose=True, group_size=64, bits=bits, stream=stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# MLX CPU backend: weight formats and threads\n\nMLX {mx.__version__}, "
          f"{os.cpu_count()} CPUs, device {mx.default_device()}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("command: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    env = {k: v for k, v in os.environ.items() if "THREAD" in k or k.startswith("MLX_")}
    print(f"thread-related environment: {env or 'none'}\n")

    weights = {shape: mx.random.normal(shape, key=mx.random.key(0)) * 0.02 for shape in SHAPES}
    heads = " | ".join(
        f"{m} row{'s' if m > 1 else ''}: s/token (model) | CPU/wall" for m in args.rows
    )
    print(f"| format | {heads} |\n|---|" + "---:|---:|" * len(args.rows))
    for name, bits, wdtype, adtype in FORMATS:
        cells = []
        for rows in args.rows:
            per_param, load = [], []
            for shape, w in weights.items():
                if bits is None:
                    wq = w.astype(wdtype)
                else:
                    q, s, b = mx.quantize(w, 64, bits)
                    wq = (q, s.astype(adtype), b.astype(adtype))
                x = mx.random.normal((rows, shape[1]), key=mx.random.key(1)).astype(adtype)
                mx.eval(wq, x)
                seconds, busy = timed(lambda x=x, wq=wq, b=bits: matmul(x, wq, b), args.repeat)
                per_param.append(seconds / rows / (shape[0] * shape[1]))
                load.append(busy)
            cells.append(f"{statistics.mean(per_param) * MODEL_MATMUL_PARAMS:.2f} | "
                         f"{statistics.mean(load):.2f}")  # fmt: skip
        print(f"| {name} | {' | '.join(cells)} |", flush=True)

    # Two streams: does MLX run two CPU streams' work at once (one thread each)?
    q, s, b = mx.quantize(weights[SHAPES[0]], 64, 4)
    x = mx.random.normal((1, SHAPES[0][1]))
    mx.eval(q, s, b, x)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    one, one_busy = timed(lambda: [matmul(x, (q, s, b), 4) for _ in range(2)], args.repeat)
    two, two_busy = timed(
        lambda: [matmul(x, (q, s, b), 4, stream=st) for st in streams], args.repeat
    )
    print(f"\nTwo 4-bit float32 matvecs: one stream {one * 1e3:.1f} ms (CPU/wall {one_busy:.2f}), "
          f"two CPU streams {two * 1e3:.1f} ms (CPU/wall {two_busy:.2f}): "
          f"{one / two:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
