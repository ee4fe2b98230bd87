"""The KV cache of a batch: rows of different lengths, each row a `PromptCache` of its own.

A batched step runs the projections and the MLP once for all rows (that is where decoding's
memory traffic goes: the weights), and attention row by row over that row's keys only. So rows
need no padding and no mask across rows: each keeps its own offset (RoPE reads them as one array),
its own rotation (window, kept ids) and its own KV quantization, and a row's attention is the very
computation it would be alone. A finished row is its `PromptCache` (for the prefix LRU and the
cache folder); a cached prefix joins as a new row by being added.

The price, on a GPU: attention is one kernel per row and layer instead of one per layer.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .cache import Cache, PromptCache


class BatchLayer:
    """One layer across the rows of a batch, behind the protocol the model's attention calls
    (`prepare`, `offset`, `update_and_fetch`, `attend`): the rows' caches, in row order."""

    def __init__(self, rows: list[Cache]):
        self.rows = rows

    @property
    def offset(self) -> mx.array:
        """The position of each row's next token, shape (B,): RoPE takes one offset per row."""
        return mx.array([c.offset for c in self.rows])

    def prepare(self, L: int) -> list[Any]:
        """Room for `L` new tokens in every row (a rotating row drops here); the rows' masks."""
        return [c.prepare(L) for c in self.rows]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list, list]:
        """Store row i of `keys` and `values` (B, n_kv_heads, L, head_dim) in row i's cache;
        returns each row's keys and values so far."""
        held = [
            c.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, c in enumerate(self.rows)
        ]
        return [k for k, _ in held], [v for _, v in held]

    def attend(
        self, queries: mx.array, keys: list, values: list, *, scale: float, mask: list
    ) -> mx.array:
        """Each row's queries over its own keys, with its own mask; (B, n_heads, L, head_dim)."""
        out = [
            c.attend(queries[i : i + 1], keys[i], values[i], scale=scale, mask=mask[i])
            for i, c in enumerate(self.rows)
        ]
        return out[0] if len(out) == 1 else mx.concatenate(out, axis=0)

    @property
    def state(self) -> tuple:
        return tuple(c.state for c in self.rows)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.rows)


class BatchCache:
    """The rows of a batch, each a `PromptCache` (its layers, its ids, its settings).

    `layers` is what a batched forward pass takes: one `BatchLayer` per layer over the rows in
    their current order. Rows come and go between steps (`add`, `extract`), at no copy.
    """

    def __init__(self, rows: list[PromptCache] | None = None):
        self.rows: list[PromptCache] = list(rows or [])

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: PromptCache) -> int:
        """Add a row (an empty cache, or a cached prefix a request continues); its index.

        Raises:
            ValueError: a cache with another number of layers than the rows already here.
        """
        n = len(self.rows[0].layers) if self.rows else len(row.layers)
        if len(row.layers) != n:
            raise ValueError(f"a cache of {len(row.layers)} layers cannot join rows of {n}")
        self.rows.append(row)
        return len(self.rows) - 1

    def extract(self, index: int) -> PromptCache:
        """Take row `index` out of the batch: its cache, whole (the rows after it move up)."""
        return self.rows.pop(index)

    @property
    def layers(self) -> list[BatchLayer]:
        if not self.rows:
            raise ValueError("an empty batch has no layers to run")
        per_layer = zip(*(r.layers for r in self.rows), strict=True)
        return [BatchLayer(list(caches)) for caches in per_layer]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)
