"""Rotary position embeddings: the default RoPE and YaRN, computed as transformers computes them."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def yarn_attention_factor(
    factor: float,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
) -> float:
    """The factor YaRN multiplies cos and sin by (so q.k by its square)."""
    if attention_factor is not None:
        return float(attention_factor)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    return get_mscale(factor)


def yarn_inv_freq(
    dims: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> mx.array:
    """Inverse frequencies blended between interpolation and extrapolation (YaRN, section 3.2)."""

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where a dimension extrapolates (high frequency), 0 where it interpolates
    return interpolation * (1 - keep) + extrapolation * keep


class RoPE(nn.Module):
    """Rotary embedding over the whole head (SmolLM3 has no partial rotary factor).

    `inv_freq` replaces the geometric series of `base` (YaRN); `attention_factor` scales the
    rotated queries and keys as transformers scales cos and sin.
    """

    def __init__(
        self,
        dims: int,
        base: float,
        inv_freq: mx.array | None = None,
        attention_factor: float = 1.0,
    ):
        super().__init__()
        self.dims = dims
        self.base = base
        self.attention_factor = attention_factor
        # mx.fast.rope takes periods (1 / inverse frequency); keep them out of the parameters.
        self._freqs = None if inv_freq is None else 1.0 / inv_freq
        if self._freqs is not None:  # computed now: a lazy array would belong to this thread's
            mx.eval(self._freqs)  # stream, and fail on another (a server's worker thread)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return self.rotate(x, offset)

    def shift(self, x: mx.array, n: int) -> mx.array:
        """Move already-rotated keys by n positions (negative moves back); scale untouched."""
        return self.rotate(x[..., None, :], n)[..., 0, :]  # L = 1: every row by the same n

    def rotate(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """The rotation of row i by offset + i positions, without scaling."""
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None if self._freqs is not None else self.base,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def make_rope(dims: int, base: float, scaling: dict | None) -> RoPE:
    """Build the RoPE a config asks for; `scaling` is the normalised rope_scaling dict or None."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return RoPE(dims, base)
    if rope_type != "yarn":
        raise ValueError(f"unsupported RoPE type {rope_type!r} (SmolLM3 uses default or yarn)")
    factor = float(scaling["factor"])
    inv_freq = yarn_inv_freq(
        dims,
        base,
        factor,
        scaling["original_max_position_embeddings"],
        beta_fast=scaling.get("beta_fast") or 32.0,
        beta_slow=scaling.get("beta_slow") or 1.0,
        truncate=scaling.get("truncate", True),
    )
    attention = yarn_attention_factor(
        factor,
        scaling.get("attention_factor"),
        scaling.get("mscale"),
        scaling.get("mscale_all_dim"),
    )
    return RoPE(dims, base, inv_freq=inv_freq, attention_factor=attention)
