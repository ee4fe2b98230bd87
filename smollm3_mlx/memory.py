"""Memory guardrails: what a session will need, what the machine offers, and MLX's limits.

The estimate has three parts, computed before any weight is read:
- weights as they will sit in memory: the safetensors headers' tensors, floating ones at the
  compute dtype (the CPU computes in float32, so a bfloat16 checkpoint doubles there);
- the KV cache at the requested context, as `cache.KVCache` stores it: capacity grown in steps of
  `KVCache.step`, dense in the compute dtype, or packed uint32 codes plus scales and biases;
- activations of one prefill chunk at the end of the context (the largest one), fitted to peaks
  measured with `mx.get_peak_memory` (tests/test_memory.py measures them again).

For a batch (the server's rows, batch.py): each row's KV cache at the context, and the larger of
one prefill chunk (rows are prefilled one at a time) and a decode step of all rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import KVCache
from .model import ModelArgs
from .step import prefill_step_for

GB = 1e9
KV_STEP = KVCache.step  # the cache grows by whole steps
# Activation temporaries per token of a prefill chunk, in compute-dtype elements, beyond the
# attention scores: fitted to MLX 0.32 CPU peaks on tiny and full-size layer stacks (see
# tests/test_memory.py); queries and attention outputs per head, the MLP's gate and up
# projections, and the residual stream with its norms and projections.
PER_HEAD_DIM, PER_INTERMEDIATE, PER_HIDDEN = 6.5, 2, 7


class MemoryBudgetError(RuntimeError):
    """The session would need more memory than the machine offers; one line with the numbers."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a session needs, by part, and the settings they were computed for."""

    weights: int
    kv_cache: int
    activations: int
    context: int
    kv_bits: int | None
    kv_group_size: int
    prefill_step: int
    dtype: str  # the compute dtype
    device: str  # "gpu" or "cpu"
    args: ModelArgs = field(repr=False, compare=False, default_factory=ModelArgs)
    batch: int = 1  # rows decoded together, each with its own KV cache at `context`

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def rows(self) -> list[tuple[str, int, str]]:
        """(part, bytes, what it is computed for), for printing."""
        kv = f"{self.kv_bits}-bit, group {self.kv_group_size}" if self.kv_bits else self.dtype
        rows = f"{self.batch} rows x " if self.batch > 1 else ""
        return [
            ("weights", self.weights, f"as loaded ({self.dtype} compute)"),
            ("KV cache", self.kv_cache, f"{rows}{self.context} tokens, {kv}"),
            ("activations", self.activations, f"prefill chunk of {self.prefill_step} tokens"),
            ("total", self.total, f"on the {self.device}"),
        ]


def _device_info() -> dict[str, Any]:
    info = getattr(mx, "device_info", None) or mx.metal.device_info  # the older name
    try:
        return dict(info())
    except (RuntimeError, ValueError):  # no such device on this build
        return {}


def _on_gpu() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def available_memory() -> tuple[int, str]:
    """(bytes the machine offers this process, where the number comes from)."""
    if _on_gpu():
        size = _device_info().get("max_recommended_working_set_size")
        if size:
            return int(size), "MLX's recommended working set"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the total
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE"), "RAM"
        except (ValueError, OSError, AttributeError):
            continue
    return 0, "unknown"


def weights_bytes(files: list[Path], itemsize: int | None, *, tied: bool = True) -> int:
    """Bytes the weights take once loaded: stored sizes, floating tensors cast to `itemsize`."""
    from .checkpoint import ST_SIZES, WEIGHT_DTYPES, read_safetensors_header

    floats = set(WEIGHT_DTYPES) - {"U32"}  # U32: quantized codes, never cast

    total = 0
    for f in files:
        for name, t in read_safetensors_header(f).items():
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue  # dropped by Model.sanitize
            n = math.prod(t["shape"])
            cast = itemsize is not None and t["dtype"] in floats
            total += n * (itemsize if cast else ST_SIZES[t["dtype"]])
    return total


def planned_weights_bytes(
    args: ModelArgs, bits: int | None, group_size: int = 64, recipe: str | None = None,
    itemsize: int = 2,
) -> int:  # fmt: skip
    """Bytes of the weights `smollm3-mlx convert` would write (None: unquantized), from the
    lazy model's own parameter layout: nothing is allocated."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .model import Model

    model = Model(replace(args, quantization=None))
    if bits is not None:
        recipe = recipe or ("mixed" if bits == 4 else "uniform")

        def predicate(p: str, m: nn.Module) -> bool | dict:  # convert._quantized_layout's
            if not hasattr(m, "to_quantized") or m.weight.shape[-1] % group_size:
                return False
            if recipe == "mixed" and p in ("model.embed_tokens", "lm_head"):
                return {"group_size": group_size, "bits": 8}
            return True

        nn.quantize(model, group_size, bits, class_predicate=predicate)
    return sum(
        v.nbytes if v.dtype == mx.uint32 else v.size * itemsize
        for _, v in tree_flatten(model.parameters())
    )


def kv_capacity(context: int, prefill_step: int) -> int:
    """Tokens of room a cache holding `context` tokens has grown to, as KVCache grows."""
    capacity, done = 0, 0
    while done < context:  # prefill chunks, then the last prompt token and the decoded ones
        n = min(prefill_step, context - done - 1) if context - done > 1 else 1
        if done + n > capacity:
            capacity += (n + KV_STEP - 1) // KV_STEP * KV_STEP
        done += n
        if n == 1:  # one at a time from here: whole steps up to the context
            return max(capacity, (context + KV_STEP - 1) // KV_STEP * KV_STEP)
    return capacity


def kv_bytes_per_token(args: ModelArgs, bits: int | None, group_size: int, itemsize: int) -> int:
    """Keys and values of one token in one layer, as KVCache stores them."""
    hd, n_kv = args.head_dim or 0, args.num_key_value_heads or 0  # set by ModelArgs
    if bits is None:
        per_head = hd * itemsize
    else:  # uint32 codes, then a scale and a bias per group in the compute dtype
        per_head = hd * bits // 32 * 4 + 2 * (hd // group_size) * itemsize
    return 2 * n_kv * per_head


def activation_bytes(
    args: ModelArgs, context: int, prefill_step: int, itemsize: int, *, fused_attention: bool
) -> int:
    """The largest prefill chunk's temporaries: the last chunk, attending to the whole context."""
    L, S = max(1, min(prefill_step, context - 1)), context
    # MLX's fused attention kernel (the GPU, dense keys) never holds the scores; the CPU and the
    # quantized path hold (heads, L, S) scores and an (L, S) boolean mask.
    scores = 0 if fused_attention else args.num_attention_heads * L * S * itemsize + L * S
    per_token = (
        PER_HEAD_DIM * args.num_attention_heads * (args.head_dim or 0)
        + PER_INTERMEDIATE * args.intermediate_size
        + PER_HIDDEN * args.hidden_size
    )
    logits = 3 * args.vocab_size * itemsize  # the last token's logits, log-softmax, sample
    return int(scores + L * per_token * itemsize + logits)


def estimate(
    args: ModelArgs,
    weights: int,
    *,
    context: int,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    kv_start: int = 0,
    prefill_step: int | None = None,
    dtype: mx.Dtype = mx.bfloat16,
    device: str | None = None,
    batch: int = 1,
) -> MemoryEstimate:
    """The memory a session of `args` with `weights` bytes needs at `context` tokens, for
    `batch` rows decoded together (each up to `context`), its prompts read in chunks of
    `prefill_step` tokens (default: the chunk generation uses on `device`,
    `step.prefill_step_for`: a few tokens of the 3B on the CPU)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    device = device or ("gpu" if _on_gpu() else "cpu")
    prefill_step = prefill_step or prefill_step_for(args, gpu=device == "gpu")
    itemsize = dtype.size
    bits = kv_bits if kv_bits and context > kv_start else None  # dense until kv_start tokens
    layer = kv_capacity(context, prefill_step) * kv_bytes_per_token(
        args, bits, kv_group_size, itemsize
    )
    fused = device == "gpu" and bits is None
    # Rows are prefilled one chunk at a time; a decode step runs one token of every row.
    act = max(
        activation_bytes(args, context, prefill_step, itemsize, fused_attention=fused),
        batch * activation_bytes(args, context, 1, itemsize, fused_attention=fused),
    )
    # While the cache grows, one layer's old and new buffers are alive together.
    act += layer
    return MemoryEstimate(
        weights=weights,
        kv_cache=batch * layer * args.num_hidden_layers,
        activations=act,
        context=context,
        kv_bits=bits,
        kv_group_size=kv_group_size,
        prefill_step=prefill_step,
        dtype=str(dtype).removeprefix("mlx.core."),
        device=device,
        args=args,
        batch=batch,
    )


def largest_batch(est: MemoryEstimate, budget: int, *, most: int = 64) -> int:
    """The most rows (up to `most`) whose estimate, as `est` but for the batch, fits `budget`;
    at least 1 (one row is what a single request needs anyway, checked elsewhere)."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _redo(est, batch=mid).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def estimate_memory(
    path: str | Path,
    *,
    max_context: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    kv_start: int = 0,
    prefill_step: int | None = None,
    dtype: str | mx.Dtype | None = "auto",
    bits: int | None = None,
    device: str | None = None,
    batch: int = 1,
) -> MemoryEstimate:
    """Estimate a session on a model folder without loading it.

    Args:
        path: a model folder (config.json and safetensors weights).
        max_context: the context the session may reach; default: what `load` allows.
        kv_bits, kv_group_size, kv_start: KV cache quantization, as for `Chat`.
        prefill_step: tokens per prefill chunk (default: what generation uses on `device`).
        dtype: the compute dtype, as for `load` ("auto": float32 on the CPU, else as stored).
        bits: for a folder with a config but no weights (the reference folder): estimate the
            weights `smollm3-mlx convert --bits` would write (None: the bfloat16 checkpoint).
        device: "gpu" or "cpu"; default: where MLX computes now.
        batch: rows decoded together (the server's batch), each with a KV cache at the context.
    """
    from . import checkpoint

    path = Path(path)
    config = checkpoint.load_config(path)
    args = checkpoint.model_args(config, path)
    context, _ = checkpoint.context_window(args, max_context)
    compute = checkpoint.resolve_dtype(dtype)
    stored_name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    stored = checkpoint.DTYPES.get(stored_name, mx.bfloat16)
    itemsize = compute.size if compute is not None else None
    has_weights = any(path.glob("*.safetensors"))
    if bits is not None or not has_weights:
        weights = planned_weights_bytes(args, bits, itemsize=itemsize or stored.size)
    else:
        weights = weights_bytes(
            checkpoint.weight_files(path), itemsize, tied=args.tie_word_embeddings
        )
    kv_dtype = compute or (mx.bfloat16 if args.quantization else stored)
    return estimate(
        args, weights, context=context, kv_bits=kv_bits, kv_group_size=kv_group_size,
        kv_start=kv_start, prefill_step=prefill_step, dtype=kv_dtype, device=device,
        batch=batch,
    )  # fmt: skip


def _largest_context(est: MemoryEstimate, budget: int) -> int:
    """The longest context (a multiple of 1024) whose estimate fits `budget`, or 0."""
    lo, hi = 0, est.context // 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _redo(est, context=mid * 1024).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 1024


def _redo(est: MemoryEstimate, **changes: Any) -> MemoryEstimate:
    settings = dict(
        context=est.context, kv_bits=est.kv_bits, kv_group_size=est.kv_group_size,
        prefill_step=est.prefill_step, dtype=getattr(mx, est.dtype), device=est.device,
        batch=est.batch,
    )  # fmt: skip
    weights = changes.pop("weights", est.weights)
    return estimate(est.args, weights, **{**settings, **changes})


def cheapest_fix(est: MemoryEstimate, budget: int) -> str:
    """The one change that brings the estimate under `budget`, cheapest in quality first."""
    options: list[tuple[str, MemoryEstimate]] = []
    for bits in (8, 4):
        if est.kv_bits is None or est.kv_bits > bits:
            options.append((f"--kv-bits {bits}", _redo(est, kv_bits=bits)))
    if not est.args.quantization:
        w4 = planned_weights_bytes(est.args, 4, itemsize=getattr(mx, est.dtype).size)
        options.append(("the 4-bit model (smollm3-mlx convert)", _redo(est, weights=w4)))
    for fix, new in options:
        if new.total <= budget:
            return f"{fix} (needs {new.total / GB:.1f} GB)"
    for kv_bits in (est.kv_bits, 4):
        smaller = replace(est, kv_bits=kv_bits)
        context = _largest_context(smaller, budget)
        if context:
            kv = "--kv-bits 4 and " if kv_bits != est.kv_bits else ""
            return f"{kv}--max-context {context}"
    return "a smaller model or a machine with more memory"


def check_memory(est: MemoryEstimate, available: tuple[int, str] | None = None) -> None:
    """Raise MemoryBudgetError (one line: the numbers and the cheapest fix) when `est` exceeds
    what the machine offers."""
    budget, source = available or available_memory()
    if budget <= 0 or est.total <= budget:  # unknown: nothing to compare with
        return
    parts = ", ".join(f"{name} {n / GB:.1f}" for name, n, _ in est.rows()[:3])
    raise MemoryBudgetError(
        f"this session needs about {est.total / GB:.1f} GB ({parts}) but {budget / GB:.1f} GB "
        f"is available ({source}); try {cheapest_fix(est, budget)}, "
        "or override with --no-memory-check (check_memory=False)"
    )


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure: MemoryError, or MLX's RuntimeError ("[metal::malloc] Attempting to
    allocate ...", "Insufficient Memory", "out of memory")."""
    text = str(e).lower()
    words = ("malloc", "allocate", "out of memory", "insufficient memory", "outofmemory")
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(w in text for w in words)
    )


@contextmanager
def memory_limits(est: MemoryEstimate) -> Iterator[None]:
    """Set MLX's wired and cache limits for this session on Apple Silicon; restore them on exit.

    The wired limit covers what the session needs (not all of the recommended working set, which
    can starve macOS), the buffer cache what one prefill chunk allocates. No-op on the CPU.
    """
    size = _device_info().get("max_recommended_working_set_size") if _on_gpu() else None
    if not size:
        yield
        return
    old_wired = mx.set_wired_limit(min(est.weights + est.kv_cache, int(size)))
    old_cache = mx.set_cache_limit(max(est.activations, 256 * 2**20))
    try:
        yield
    finally:
        mx.synchronize()  # no kernel may run while the wired limit changes
        mx.set_wired_limit(old_wired)
        mx.set_cache_limit(old_cache)
