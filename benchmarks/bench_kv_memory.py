"""KV-cache memory: bytes per token at SmolLM3-3B's shapes, projections, and a measured long run.

    python benchmarks/bench_kv_memory.py [--tokens 2048]

Part 1 fills one real-shaped layer cache (4 KV heads x 128) with each setting and multiplies by 36
layers, so the numbers are what `KVCache` really stores (packed weights + scales + biases).
Part 2 runs a long greedy generation on a small random SmolLM3 with a plain and a rotating cache
and compares the measured peak memory with the projection (weights + bytes per token x tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from smollm3_mlx.cache import KVCache
from smollm3_mlx.loading import load_model
from smollm3_mlx.model import Model, ModelArgs
from smollm3_mlx.step import generate_step

LENGTHS = [8192, 32768, 65536, 131072]
TARGET_GB = 2.6  # the goal for 128K with 4-bit KV
SETTINGS = [  # (label, dtype of keys/values or of the scales, bits, group size)
    ("bfloat16", mx.bfloat16, None, 64),
    ("8-bit g64, bf16 scales", mx.bfloat16, 8, 64),
    ("4-bit g64, bf16 scales", mx.bfloat16, 4, 64),
    ("4-bit g128, bf16 scales", mx.bfloat16, 4, 128),
    ("float32 (CPU compute)", mx.float32, None, 64),
    ("8-bit g64, f32 scales (CPU)", mx.float32, 8, 64),
    ("4-bit g64, f32 scales (CPU)", mx.float32, 4, 64),
    ("4-bit g128, f32 scales (CPU)", mx.float32, 4, 128),
]


def bytes_per_token(args: ModelArgs, dtype, bits, group_size, n=512) -> float:
    cache = KVCache(bits=bits, group_size=group_size)
    kv = mx.zeros((1, args.num_key_value_heads, n, args.head_dim), dtype)
    cache.update_and_fetch(kv, kv)
    return cache.nbytes / n * args.num_hidden_layers


def tiny_checkpoint(folder: Path) -> Path:
    """A small random SmolLM3 (real head shapes, 4 layers), written with mlx, no transformers."""
    config = dict(
        model_type="smollm3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=128, vocab_size=1024,
        max_position_embeddings=65536, rope_theta=5e6,
    )  # fmt: skip
    model = Model(ModelArgs.from_dict(config))
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.02 for k, v in tree_flatten(model.parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def measured_run(tokens: int) -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(tiny_checkpoint(Path(tmp) / "m"))
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        for label, window, bits in [
            ("plain, float32", None, None),
            ("plain, 8-bit", None, 8),
            ("plain, 4-bit", None, 4),
            (f"rotating {tokens // 8}, float32", tokens // 8, None),
            (f"rotating {tokens // 8}, 4-bit", tokens // 8, 4),
        ]:
            per_token = bytes_per_token(model.args, mx.float32, bits, 64)
            mx.clear_cache()
            mx.reset_peak_memory()
            cache = model.make_cache(window, 16, bits=bits)
            prompt = mx.array([1, 2, 3, 4] * 8)
            for _ in generate_step(prompt, model, max_tokens=tokens, prompt_cache=cache):
                pass
            kept = min(tokens + prompt.size, window or tokens + prompt.size)
            projected = weights + per_token * kept
            rows.append((label, projected / 1e6, mx.get_peak_memory() / 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="length of the measured run")
    opts = parser.parse_args()

    args = ModelArgs()  # the defaults mirror SmolLM3-3B's config.json
    print(f"# KV cache memory, SmolLM3-3B shapes ({args.num_hidden_layers} layers x 2 x "
          f"{args.num_key_value_heads} KV heads x {args.head_dim})")  # fmt: skip
    print(f"machine: {platform.platform()}, mlx {mx.__version__}, {mx.default_device()}")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| setting | bytes/token | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " |")
    print("|---|---:|" + "---:|" * len(LENGTHS))
    for label, dtype, bits, group in SETTINGS:
        b = bytes_per_token(args, dtype, bits, group)
        cells = " | ".join(f"{b * n / 2**30:.2f} GiB" for n in LENGTHS)
        print(f"| {label} | {b:,.0f} | {cells} |")

    print(f"\n128K tokens with 4-bit KV, against the target of {TARGET_GB} GB:")
    for label, dtype, bits, group in SETTINGS:
        if bits == 4:
            total = bytes_per_token(args, dtype, bits, group) * LENGTHS[-1]
            verdict = (
                "within"
                if total <= TARGET_GB * 1e9
                else "within only if GB means GiB"
                if total <= TARGET_GB * 2**30
                else "over"
            )
            print(f"- {label}: {total / 1e9:.2f} GB = {total / 2**30:.2f} GiB, {verdict}")

    print(f"\n# Measured: {opts.tokens} generated tokens, 4-layer model with real head shapes\n")
    print("| cache | projected MB | measured peak MB | measured / projected |")
    print("|---|---:|---:|---:|")
    for label, projected, peak in measured_run(opts.tokens):
        print(f"| {label} | {projected:,.1f} | {peak:,.1f} | {peak / projected:.2f} |")


if __name__ == "__main__":
    main()
