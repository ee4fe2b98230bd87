"""A quantization recipe chosen by measurement: bits where the model is sensitive, better rounding.

Sensitivity is measured on the shipped calibration text (never the evaluation text) as the
diagonal of the Fisher information: the squared gradient of each window's loss with respect to
every weight. To second order, quantizing a matrix W to Q(W) costs the model
    KL(source || quantized) ~ 1/2 * sum(F * (Q(W) - W)^2),
so for every matrix and every option (bits, group size) the cost of that option is estimated from
the very codes the converter would write, and bits are handed out greedily, where they buy the
most KL per bit, until the target size (bits per weight, embedding included) is reached, as
mlx-lm's dynamic_quant does with its gradient estimate.

Rounding at a fixed width is activation-aware as well: within each group the range is clipped
and the scale and bias refit by weighted least squares, weighting each weight by its column's
Fisher mass (the input dimension's importance; within one row that is all that matters under a
rank-one view of F), instead of mx.quantize's min/max.

What this needs: the source model in float32 with one gradient and one accumulator, about 12
bytes per parameter (a few hundred MB for a small model; ~37 GB for SmolLM3-3B: a large GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

# (bits, group size) a matrix may get; their stored bits per weight count the bf16 scale and bias
OPTIONS = ((3, 64), (4, 128), (4, 64), (4, 32), (5, 64), (6, 64), (8, 64))
DEFAULT = (4, 64)  # the top-level quantization entry; every other option is a per-layer override
SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7)  # clipping candidates
CALIBRATION_WINDOW = 128


def option_bpw(option: tuple[int, int], scale_bits: int = 16) -> float:
    bits, group = option
    return bits + 2 * scale_bits / group


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per quantized module: its (bits, group size), and its columns' importance for rounding."""

    options: dict[str, tuple[int, int]]
    importance: dict[str, np.ndarray]
    target_bpw: float
    estimated_kl: float  # the second-order estimate of the whole recipe, nats per token

    def overrides(self) -> dict[str, dict[str, int]]:
        """config.json's per-layer entries, as mlx-lm records them: every non-default module."""
        return {
            p: {"group_size": g, "bits": b}
            for p, (b, g) in sorted(self.options.items())
            if (b, g) != DEFAULT
        }

    def counts(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for option in self.options.values():
            out[option] = out.get(option, 0) + 1
        return dict(sorted(out.items()))


def fit_groups(w: mx.array, group_size: int, bits: int, importance: mx.array | None, dtype):
    """(codes uint8, scales, biases) of `w` (rows, cols), scales and biases rounded to `dtype`:
    per group, the clipped range and then the least-squares refit with the lowest weighted
    squared error (weights: `importance` of each column; None: all equal)."""
    rows, cols = w.shape
    g = w.astype(mx.float32).reshape(rows, cols // group_size, group_size)
    if importance is None:
        a = mx.ones((1, cols // group_size, group_size))
    else:
        imp = importance.astype(mx.float32)
        a = (imp + 1e-3 * mx.mean(imp) + 1e-30).reshape(1, cols // group_size, group_size)
    levels = 2**bits - 1
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    mid = (lo + hi) / 2

    def codes_of(s, b):
        s, b = s.astype(dtype).astype(mx.float32), b.astype(dtype).astype(mx.float32)
        s = mx.where(s == 0, 1e-12, s)
        q = mx.clip(mx.round((g - b[..., None]) / s[..., None]), 0, levels)
        err = (a * (g - (s[..., None] * q + b[..., None])) ** 2).sum(axis=-1)
        return q, s, b, err

    best = None
    for t in SHRINK:
        low, high = mid - t * (mid - lo), mid + t * (hi - mid)
        cand = codes_of((high - low) / levels, low)
        best = cand if best is None else _pick(best, cand)
    q = best[0]
    sa, sq, sqq = a.sum(-1), (a * q).sum(-1), (a * q * q).sum(-1)
    sg, sqg = (a * g).sum(-1), (a * q * g).sum(-1)
    det = sa * sqq - sq * sq
    ok = det > 1e-12 * sa * sqq
    det = mx.where(ok, det, 1)
    s = mx.where(ok, (sa * sqg - sq * sg) / det, best[1])
    b = mx.where(ok, (sqq * sg - sq * sqg) / det, best[2])
    s = mx.where(s > 0, s, best[1])
    q, s, b, _ = _pick(best, codes_of(s, b))
    return q.astype(mx.uint8).reshape(rows, cols), s.astype(dtype), b.astype(dtype)


def _pick(x, y):
    """Per group, whichever of two candidates (codes, scales, biases, error) errs less."""
    better = y[3] < x[3]
    return (
        mx.where(better[..., None], y[0], x[0]),
        mx.where(better, y[1], x[1]),
        mx.where(better, y[2], x[2]),
        mx.minimum(x[3], y[3]),
    )


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine packing: each row's codes as one little-endian bit stream, in uint32 words."""
    rows, cols = codes.shape
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    packed = np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")


def quantize(w: mx.array, group_size: int, bits: int, importance: mx.array | None, dtype):
    """(packed weight, scales, biases) as mx.quantize returns them, from `fit_groups`."""
    codes, scales, biases = fit_groups(w, group_size, bits, importance, dtype)
    mx.eval(codes, scales, biases)
    return mx.array(pack(np.array(codes), bits)), scales, biases


def _quantizable(model: nn.Module) -> dict[str, nn.Module]:
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % 32 == 0
    }


def fisher(model: nn.Module, windows: list[list[int]], done: Callable[[int, int], None] | None):
    """The diagonal empirical Fisher of every quantizable weight: the mean over windows of the
    squared gradient of the window's mean next-token loss."""
    modules = _quantizable(model)
    model.freeze()
    for m in modules.values():
        m.unfreeze(keys=["weight"])

    def loss(model, ids):
        logits = model(ids[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    grad_fn = nn.value_and_grad(model, loss)
    acc = {p: mx.zeros(m.weight.shape) for p, m in modules.items()}
    for i, window in enumerate(windows):
        _, grads = grad_fn(model, mx.array([window]))
        flat = dict(tree_flatten(grads))
        acc = {p: a + flat[f"{p}.weight"].astype(mx.float32) ** 2 for p, a in acc.items()}
        mx.eval(acc)
        if done is not None:
            done(i + 1, len(windows))
    return {p: a / len(windows) for p, a in acc.items()}


def plan(
    source: Path,
    target_bpw: float,
    *,
    dtype=mx.bfloat16,
    windows: list[list[int]],
    progress: Callable[[int, int], None] | None = None,
) -> Plan:
    """Choose every quantizable matrix's (bits, group size) for `target_bpw` stored bits per
    parameter (codes, scales, biases and the unquantized norms, embedding included)."""
    from .loading import load_model

    model = load_model(source, dtype="float32")
    F = fisher(model, windows, progress)
    modules = _quantizable(model)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    fixed = sum(v.size for _, v in tree_flatten(model.parameters())) - sum(
        m.weight.size for m in modules.values()
    )
    budget = target_bpw * n_params - 16 * fixed  # the norms stay in 16 bits
    # A floor under the Fisher (a small share of its mean): where the text gave no gradient
    # (tokens it never holds), plain squared error still ranks the options.
    floor = 1e-3 * sum(f.sum().item() for f in F.values()) / sum(f.size for f in F.values())
    costs, importance = {}, {}
    for p, m in modules.items():
        w, f = m.weight, F[p] + floor
        col = f.sum(axis=0)
        importance[p] = np.array(col)
        costs[p] = {}
        for option in OPTIONS:
            bits, group = option
            if w.shape[-1] % group:
                continue
            codes, s, b = fit_groups(w, group, bits, col, dtype)
            deq = _dequantize(codes, s, b, group)
            costs[p][option] = 0.5 * (f * (deq - w) ** 2).sum().item()
    options = _allocate(costs, {p: m.weight.size for p, m in modules.items()}, budget)
    estimate = sum(costs[p][o] for p, o in options.items())
    del model, F
    mx.clear_cache()
    return Plan(options, importance, target_bpw, estimate)


def _dequantize(codes, scales, biases, group):
    rows, cols = codes.shape
    g = codes.astype(mx.float32).reshape(rows, cols // group, group)
    deq = g * scales.astype(mx.float32)[..., None] + biases.astype(mx.float32)[..., None]
    return deq.reshape(rows, cols)


def _allocate(costs, sizes, budget: float) -> dict[str, tuple[int, int]]:
    """Start every matrix at its cheapest option; then take, again and again, the upgrade that
    removes the most estimated KL per added bit, while it fits the budget."""
    choice = {p: min(c, key=option_bpw) for p, c in costs.items()}
    spent = sum(sizes[p] * option_bpw(o) for p, o in choice.items())
    if spent > budget:
        need = spent / sum(sizes.values())
        raise ValueError(f"the target is below the smallest recipe (~{need:.2f} bits per weight)")
    while True:
        best, best_gain = None, 0.0
        for p, c in costs.items():
            now = choice[p]
            for option, kl in c.items():
                extra = sizes[p] * (option_bpw(option) - option_bpw(now))
                if extra <= 0 or spent + extra > budget:
                    continue
                gain = (c[now] - kl) / extra
                if gain > best_gain:
                    best, best_gain = (p, option, extra), gain
        if best is None:
            return choice
        p, option, extra = best
        choice[p], spent = option, spent + extra


def calibration_windows(tokenizer, window: int = CALIBRATION_WINDOW) -> list[list[int]]:
    from .quality import make_windows, shipped_text

    ids = tokenizer.backend.encode(shipped_text("calibration")).ids
    return make_windows(ids, window + 1)
