"""KV caches behind one small protocol.

Attention touches a cache only through `offset` (the position of the next token), `make_mask(L)`
and `update_and_fetch(keys, values)`; generation and chat use `trim(n)`, `state`, `nbytes` and
`is_trimmable()`. Rotation, kept tokens and quantization live here, never in the model.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx


class Cache(Protocol):
    offset: int

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...

    def make_mask(self, L: int) -> mx.array | str | None: ...

    def trim(self, n: int) -> int: ...

    def is_trimmable(self) -> bool: ...

    @property
    def state(self) -> tuple: ...

    @property
    def nbytes(self) -> int: ...


class KVCache:
    """A cache that grows in steps of `step` tokens; one per layer."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        B, n_kv_heads, L, head_dim = keys.shape
        if self.keys is None or prev + L > self.keys.shape[2]:
            n_steps = (self.step + L - 1) // self.step
            shape = (B, n_kv_heads, n_steps * self.step, head_dim)
            new_k, new_v = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is not None:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, L: int) -> str | None:
        # The fused kernel's "causal" aligns the L queries with the last L keys.
        return "causal" if L > 1 else None

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def trim_prompt_cache(cache: list[Cache], n: int) -> int:
    """Drop the last `n` tokens from every layer's cache; returns how many were dropped."""
    if not cache or not all(c.is_trimmable() for c in cache):
        return 0
    return [c.trim(n) for c in cache][0]
