"""Time to first token after a long system prompt: from a prompt-cache file against a cold prefill.

On the full-size SmolLM3-3B layout (36 layers, 4-bit weights with the embedding at 8 bits, as
`smollm3-mlx convert` writes them; random values: the timing does not depend on them). MLX's CPU
backend needs about an hour to prefill 2,000 tokens of the 3B model, so on a CPU this measures:
- the cold prefill rate on a short prompt (`--cold-tokens`), from which the 2,000-token prefill
  time is extrapolated (prefill is linear in the prompt at this length: the weights dominate);
- saving and loading the cache file at the full length, for a cache built with the right shapes
  (and random contents) without running the prefill; the load includes the checksum and the
  fingerprint comparison;
- the question after it (`--question-tokens`), prefilled on top of the loaded 2,000-token cache
  up to its first token: time to first token from the file = load + this.
File size against the cache's own bytes, dense and 4-bit KV.

    python benchmarks/bench_prompt_cache.py [--system-tokens 2000] [--cold-tokens 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from smollm3_mlx.cache import KVSettings, PromptCache
from smollm3_mlx.cache_file import Fingerprint, load_prompt_cache, save_prompt_cache
from smollm3_mlx.model import Model, ModelArgs
from smollm3_mlx.step import generate_step


def build_model() -> Model:
    model = Model(ModelArgs())  # SmolLM3-3B's dimensions are ModelArgs' defaults

    def predicate(p: str, m: nn.Module) -> bool | dict:  # the mixed 4-bit recipe
        if not hasattr(m, "to_quantized"):
            return False
        return {"group_size": 64, "bits": 8} if p == "model.embed_tokens" else True

    nn.quantize(model, 64, 4, class_predicate=predicate)
    model.set_dtype(mx.float32)  # the CPU default compute dtype
    for layer in [model.model.embed_tokens, *model.layers, model.model.norm]:
        mx.eval(layer.parameters())  # one layer at a time: no float32 copy of the whole model
    return model


def filled_cache(model: Model, n: int, kv: KVSettings) -> PromptCache:
    """A cache holding `n` random positions, as a prefill would leave it (shapes and storage)."""
    pc = PromptCache.new(model, kv=kv)
    a = model.args
    for c in pc.layers:
        k = mx.random.normal((1, a.num_key_value_heads, n, a.head_dim))
        c.update_and_fetch(k, k * 0.5)
        mx.eval(c.state)
    pc.ids = mx.random.randint(0, a.vocab_size, (n,)).tolist()
    return pc


def first_token_seconds(model: Model, prompt: list[int], pc: PromptCache | None) -> float:
    start = time.perf_counter()
    layers = pc.layers if pc is not None else None
    for _token, _ in generate_step(mx.array(prompt), model, max_tokens=1, prompt_cache=layers):
        break
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--cold-tokens", type=int, default=8)
    parser.add_argument("--question-tokens", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    print(f"{platform.machine()}, MLX {mx.__version__}, {mx.default_device()}")
    model = build_model()
    vocab = model.args.vocab_size
    fp = Fingerprint("bench", "bench", "bench", "float32", keep=0)

    prompt = mx.random.randint(0, vocab, (opts.cold_tokens,)).tolist()
    cold = first_token_seconds(model, prompt, None)
    rate = opts.cold_tokens / cold
    minutes = (opts.system_tokens + opts.question_tokens) / rate / 60
    print(f"cold prefill of {opts.cold_tokens} tokens to the first token: {cold:.1f} s "
          f"({rate:.2f} tokens/s); {opts.system_tokens} + {opts.question_tokens} tokens at that "
          f"rate: ~{minutes:.0f} min (extrapolated)")  # fmt: skip

    question = mx.random.randint(0, vocab, (opts.question_tokens,)).tolist()
    for kv in (KVSettings(), KVSettings(bits=4)):
        pc = filled_cache(model, opts.system_tokens, kv)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "system.cache"
            saves, loads = [], []
            for _ in range(opts.runs):
                start = time.perf_counter()
                save_prompt_cache(path, pc, replace(fp, kv=kv))
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                loaded = load_prompt_cache(path, model, expect=replace(fp, kv=kv))
                mx.eval([c.state for c in loaded.layers])
                loads.append(time.perf_counter() - start)
            size = path.stat().st_size
        ask = first_token_seconds(model, question, loaded)
        load = statistics.median(loads)
        name = f"{kv.bits}-bit" if kv.bits else "float32"
        cold_all = (opts.system_tokens + opts.question_tokens) / rate
        print(f"KV {name}: file {size / 1e6:.1f} MB, cache {pc.nbytes / 1e6:.1f} MB "
              f"(file/cache {size / pc.nbytes:.4f}); save {statistics.median(saves):.2f} s, "
              f"load {load:.2f} s (median of {opts.runs}); question of {opts.question_tokens} "
              f"tokens on the loaded cache to its first token {ask:.1f} s; time to first token "
              f"from the file {load + ask:.1f} s, cold ~{cold_all:.0f} s (extrapolated)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
