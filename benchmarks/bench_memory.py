"""The memory estimate against the measured peak, on SmolLM3-3B's real layer dimensions.

Running the whole 3B model in float32 on a CPU takes hours per long prompt, so this builds a stack
of the first N layers with the real dimensions (hidden 2048, MLP 11008, 16 query / 4 KV heads of
128, the real 128256-token vocabulary), random weights, and prefills a random prompt in 512-token
chunks, as a chat turn does. Peak = mx.get_peak_memory() from before the weights are evaluated to
after the first generated token. The estimate for the full 36 layers follows from the same
formula (weights and KV cache scale with the layers; the activations of one chunk do not).

    python benchmarks/bench_memory.py [--layers 2] [--contexts 1024 2048] [--kv-bits none 4]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace

import mlx.core as mx
from mlx.utils import tree_flatten

from smollm3_mlx.memory import estimate
from smollm3_mlx.model import Model, ModelArgs
from smollm3_mlx.step import generate_step


def measure(args: ModelArgs, context: int, kv_bits: int | None, step: int) -> tuple[int, float]:
    model = Model(args)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(model.parameters())
    cache = model.make_cache(bits=kv_bits)
    prompt = mx.random.randint(0, args.vocab_size, (context,)).astype(mx.uint32)
    start = time.perf_counter()
    for _ in generate_step(prompt, model, max_tokens=1, prompt_cache=cache, prefill_step_size=step):
        pass
    mx.synchronize()
    return mx.get_peak_memory() - before, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--kv-bits", nargs="+", default=["none", "4"])
    parser.add_argument("--prefill-step", type=int, default=512)
    opts = parser.parse_args()
    full = ModelArgs()  # SmolLM3-3B's dimensions are ModelArgs' defaults
    args = replace(full, num_hidden_layers=opts.layers, no_rope_layers=None)
    weights = sum(v.nbytes for _, v in tree_flatten(Model(args).parameters()))
    print(f"{platform.machine()} {platform.processor() or ''}, MLX {mx.__version__}, CPU float32")
    print(f"{opts.layers} layers of SmolLM3-3B's dimensions, weights {weights / 1e6:.0f} MB")
    print("| context | KV | measured peak MB | estimate MB | estimate/measured | prefill s |")
    print("|---:|---|---:|---:|---:|---:|")
    for context in opts.contexts:
        for kv in opts.kv_bits:
            bits = None if kv == "none" else int(kv)
            peak, seconds = measure(args, context, bits, opts.prefill_step)
            est = estimate(
                args, weights, context=context, kv_bits=bits,
                prefill_step=opts.prefill_step, dtype=mx.float32, device="cpu",
            )  # fmt: skip
            print(
                f"| {context} | {kv} | {peak / 1e6:.1f} | {est.total / 1e6:.1f} | "
                f"{est.total / peak:.3f} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
