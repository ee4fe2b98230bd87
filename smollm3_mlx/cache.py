"""KV caches behind one small protocol, and the prompt cache: the caches plus the ids they hold.

The model calls `prepare(L)` on each layer's cache before attention (room for L new tokens; returns
the mask), then attention reads `offset` (the position of the next token), calls
`update_and_fetch(keys, values)` and `attend(...)`. Generation uses `trim(n)`, `state`, `nbytes`,
`window`, `keep`, `dropped` and `room(n)`. Rotation, kept tokens and quantization live here, not in
the model; reusing a cache across turns or requests lives in `PromptCache`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import mlx.core as mx
from mlx.utils import tree_map

Rotate = Callable[[mx.array, int], mx.array]  # rotate keys by a number of positions


class Cache(Protocol):
    offset: int
    keep: int
    dropped: int

    @property
    def window(self) -> int | None: ...

    def room(self, n: int) -> int: ...

    def prepare(self, L: int) -> mx.array | str | None: ...

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]: ...

    def attend(
        self, queries: mx.array, keys: Any, values: Any, *, scale: float, mask: Any
    ) -> mx.array: ...

    def trim(self, n: int) -> int: ...

    def is_trimmable(self) -> bool: ...

    def copy(self) -> Cache: ...

    @property
    def state(self) -> tuple: ...

    @property
    def nbytes(self) -> int: ...


def _quantized_attention(queries, keys, values, *, scale, mask, group_size, bits) -> mx.array:
    """Attention straight on quantized keys and values (no dequantized copy of the cache)."""
    B, n_heads, L, D = queries.shape
    n_kv_heads = keys[0].shape[1]
    repeats = n_heads // n_kv_heads
    queries = (queries * scale).reshape(B, n_kv_heads, repeats, L, D)  # group queries by KV head
    keys, values = tree_map(lambda x: mx.expand_dims(x, 2), (keys, values))
    scores = mx.quantized_matmul(queries, *keys, transpose=True, group_size=group_size, bits=bits)
    if isinstance(mask, str):
        S = scores.shape[-1]
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, n_heads, L, D)


def check_kv_quantization(head_dim: int, bits: int | None, group_size: int) -> None:
    """Refuse KV settings MLX cannot quantize, before any token is generated."""
    if bits is None:
        return
    if bits not in (4, 8):
        raise ValueError(f"KV cache bits must be 4 or 8, not {bits}")
    if group_size not in (32, 64, 128) or head_dim % group_size:
        raise ValueError(
            f"KV group size {group_size} must be 32, 64 or 128 and divide head_dim {head_dim}"
        )


class KVCache:
    """One layer's cache: growing, or rotating within `max_size` tokens; dense or quantized.

    Rotating: when a step would pass `max_size`, the oldest tokens after the first `keep` (the
    system prompt) are dropped, at least `chunk` at a time, and the survivors' keys are rotated back
    by the number dropped, so positions stay inside the window (and inside the trained range).
    Quantized: with `bits`, keys and values are stored by `mx.quantize` once the cache holds
    `quantize_after` tokens.

    Args:
        max_size: the window in tokens; None grows without bound.
        keep: tokens at the start that are never dropped.
        rotate: shifts keys by n positions (the layer's RoPE); None for NoPE layers.
        chunk: the fewest tokens dropped at once (default: an eighth of the window).
        bits, group_size: KV quantization (4 or 8 bits); None keeps keys and values dense.
        quantize_after: stay dense until the cache holds this many tokens.
    """

    step = 256

    def __init__(
        self,
        max_size: int | None = None,
        keep: int = 0,
        rotate: Rotate | None = None,
        chunk: int | None = None,
        bits: int | None = None,
        group_size: int = 64,
        quantize_after: int = 0,
    ):
        if max_size is not None and max_size <= keep:
            raise ValueError(
                f"the window ({max_size}) must be larger than the kept prefix ({keep})"
            )
        self.max_size, self.keep, self.rotate = max_size, keep, rotate
        self.chunk = chunk or (max(1, (max_size - keep) // 8) if max_size else 0)
        self.bits, self.group_size, self.quantize_after = bits, group_size, quantize_after
        # Storage is a tuple: (keys,) when dense, (packed, scales, biases) when quantized.
        self.keys: tuple[mx.array, ...] | None = None
        self.values: tuple[mx.array, ...] | None = None
        self.quantized = False
        self.offset = 0
        self.dropped = 0  # tokens dropped so far by rotation

    @property
    def window(self) -> int | None:
        """The most tokens held at once (None: no limit)."""
        return self.max_size

    def room(self, n: int) -> int:
        """How many of `n` new tokens fit before this cache would drop or quantize what it holds."""
        if self.max_size is not None:
            n = min(n, self.max_size - self.offset)
        if self.bits and not self.quantized:  # stay on the same side as one-by-one steps
            n = min(n, self.quantize_after - self.offset)
        return n

    def copy(self) -> KVCache:
        """An independent copy (the stored arrays are shared until either side writes)."""
        other = copy.copy(self)
        if self.keys is not None:
            other.keys = tuple(mx.array(x) for x in self.keys)
            other.values = tuple(mx.array(x) for x in self.values)
        return other

    def _pack(self, x: mx.array) -> tuple[mx.array, ...]:
        if self.quantized:
            return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))
        return (x,)

    def _unpack(self, t: tuple[mx.array, ...]) -> mx.array:
        if self.quantized:
            return mx.dequantize(*t, group_size=self.group_size, bits=self.bits)
        return t[0]

    def _slice(self, t: tuple[mx.array, ...], start: int, stop: int) -> tuple[mx.array, ...]:
        return tuple(x[..., start:stop, :] for x in t)

    def prepare(self, L: int) -> str | None:
        if self.max_size is not None and self.offset + L > self.max_size:
            self._drop(max(self.offset + L - self.max_size, self.chunk), L)
        return "causal" if L > 1 else None

    def _drop(self, n: int, L: int) -> None:
        n = min(n, self.offset - self.keep)
        if self.offset - n + L > self.max_size:
            raise ValueError(
                f"{L} new tokens do not fit a window of {self.max_size} with {self.keep} kept"
            )
        tail_k = self._slice(self.keys, self.keep + n, self.offset)
        if self.rotate is not None:  # the survivors move n positions back
            tail_k = self._pack(self.rotate(self._unpack(tail_k), -n))
        tail_v = self._slice(self.values, self.keep + n, self.offset)

        def join(buf, tail):  # keep the capacity, so the next tokens need no regrowth
            room = n + buf[0].shape[2] - self.offset
            return tuple(
                mx.concatenate(
                    [
                        b[..., : self.keep, :],
                        t,
                        mx.zeros((*t.shape[:2], room, t.shape[3]), t.dtype),
                    ],
                    axis=2,
                )
                for b, t in zip(buf, tail, strict=True)
            )

        self.keys, self.values = join(self.keys, tail_k), join(self.values, tail_v)
        # One layer at a time: only this layer's old and new buffers are alive together.
        mx.eval(self.keys, self.values)
        self.offset -= n
        self.dropped += n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        prev, L = self.offset, keys.shape[2]
        if self.bits and not self.quantized and prev + L > self.quantize_after:
            dense = self.keys and (self.keys[0][..., :prev, :], self.values[0][..., :prev, :])
            self.quantized = True
            if dense:  # re-store what is cached so far
                self.keys, self.values = self._pack(dense[0]), self._pack(dense[1])
        new_k, new_v = self._pack(keys), self._pack(values)
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            steps = (self.step + L - 1) // self.step * self.step

            def grow(buf, new):
                zeros = [mx.zeros((*x.shape[:2], steps, x.shape[3]), x.dtype) for x in new]
                if buf is None:
                    return tuple(zeros)
                return tuple(
                    mx.concatenate([b[..., :prev, :], z], axis=2)
                    for b, z in zip(buf, zeros, strict=True)
                )

            self.keys, self.values = grow(self.keys, new_k), grow(self.values, new_v)
        self.offset += L
        for buf, new in zip(self.keys + self.values, new_k + new_v, strict=True):
            buf[..., prev : self.offset, :] = new
        return self._fetch()

    def _fetch(self) -> tuple[Any, Any]:
        k, v = self._slice(self.keys, 0, self.offset), self._slice(self.values, 0, self.offset)
        return (k, v) if self.quantized else (k[0], v[0])

    def attend(self, queries: mx.array, keys, values, *, scale: float, mask) -> mx.array:
        if self.quantized:
            return _quantized_attention(
                queries, keys, values, scale=scale, mask=mask,
                group_size=self.group_size, bits=self.bits,
            )  # fmt: skip
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple:
        return () if self.keys is None else self._fetch()

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self._slice(self.keys + self.values, 0, self.offset))

    def export(self) -> tuple[list[mx.array], dict[str, int]]:
        """What it holds (keys then values, 1 or 3 arrays each, up to `offset`), and counters."""
        arrays = (
            [] if self.keys is None else [*self._slice(self.keys + self.values, 0, self.offset)]
        )
        meta = {"offset": self.offset, "dropped": self.dropped, "quantized": int(self.quantized)}
        return arrays, meta

    def load_exported(self, arrays: Sequence[mx.array], meta: dict[str, int]) -> None:
        """Take what `export` gave, into a cache made with the same settings.

        Raises:
            ValueError: arrays or counters that do not fit these settings.
        """
        quantized, offset = bool(meta["quantized"]), int(meta["offset"])
        per_side = (3 if quantized else 1) if offset else 0
        if len(arrays) != 2 * per_side or (quantized and not self.bits) or offset < 0:
            raise ValueError("layer arrays do not match the KV cache settings")
        if any(a.ndim != 4 or a.shape[2] != offset for a in arrays):
            raise ValueError(f"layer arrays do not hold {offset} positions")
        self.quantized, self.offset, self.dropped = quantized, offset, int(meta["dropped"])
        self.keys = tuple(arrays[:per_side]) if offset else None
        self.values = tuple(arrays[per_side:]) if offset else None


def trim_prompt_cache(cache: list[Cache], n: int) -> int:
    """Drop the last `n` tokens from every layer's cache; returns how many were dropped."""
    if not cache or not all(c.is_trimmable() for c in cache):
        return 0
    return [c.trim(n) for c in cache][0]


@dataclass(frozen=True)
class KVSettings:
    """KV cache quantization: `bits` (4 or 8; None keeps it dense), once it holds `start` tokens."""

    bits: int | None = None
    group_size: int = 64
    start: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many ids `a` and `b` share from the start."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


T = TypeVar("T")


def longest_shared(
    held: Iterable[T], ids_of: Callable[[T], Sequence[int]], prompt: Sequence[int]
) -> tuple[T | None, int]:
    """The item of `held` whose ids share the most with `prompt` from the start, and how many
    (None, 0 when none shares any): where a prefix cache is looked up."""
    best, n = None, 0
    for item in held:
        k = common_prefix(ids_of(item), prompt)
        if k > n:
            best, n = item, k
    return best, n


def is_prefix(held: list[int], ids: list[int]) -> bool:
    """Whether `held` begins `ids` (a cache of `held` is made redundant by one of `ids`)."""
    return len(held) <= len(ids) and ids[: len(held)] == held


class PromptCache:
    """Per-layer caches plus the token ids they stand for, reusable across turns or requests.

    `ids` are all the ids the caches stand for, dropped ones included: with rotation the layers
    hold ids[:keep] + ids[keep + dropped:]. `reuse(prompt)` trims to the longest prefix the next
    prompt shares with `ids`; `settle(ids)` records what they hold after a turn, however it ended.

    Args:
        layers: one cache per layer, all made alike.
        window, keep: the rotating window and the ids at the start it never drops.
        kv: the KV quantization the layers were made with.
    """

    def __init__(
        self,
        layers: list[Cache],
        *,
        window: int | None = None,
        keep: int = 0,
        kv: KVSettings = KVSettings(),
    ):
        self.layers, self.window, self.keep, self.kv = layers, window, keep, kv
        self.ids: list[int] = []

    @classmethod
    def new(
        cls,
        model: Any,
        *,
        window: int | None = None,
        keep: int = 0,
        kv: KVSettings = KVSettings(),
    ) -> PromptCache:
        """An empty cache for `model` (anything with `make_cache`, as mlx-lm's cache asks); see
        `KVCache` for the window, `keep` and quantization."""
        layers = model.make_cache(
            window, keep, bits=kv.bits, group_size=kv.group_size, quantize_after=kv.start
        )
        return cls(layers, window=window, keep=keep, kv=kv)

    @property
    def offset(self) -> int:
        """How many positions the layers hold (the fewest, should a step have been cut short)."""
        return min(c.offset for c in self.layers) if self.layers else 0

    @property
    def dropped(self) -> int:
        return self.layers[0].dropped if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def export(self) -> tuple[dict[str, mx.array], dict[str, Any]]:
        """Named arrays (the ids and every layer's keys and values) and the settings and counters
        that go with them: all `restore` needs, for a file."""
        arrays = {"ids": mx.array(self.ids, dtype=mx.int32)}
        layers = []
        for i, c in enumerate(self.layers):
            held, meta = c.export()
            arrays.update({f"layers.{i}.{j}": a for j, a in enumerate(held)})
            layers.append({**meta, "arrays": len(held)})
        settings = {"window": self.window, "keep": self.keep, "kv": asdict(self.kv)}
        return arrays, {**settings, "layers": layers}

    @classmethod
    def restore(cls, model: Any, arrays: dict[str, mx.array], meta: dict[str, Any]) -> PromptCache:
        """The cache `export` described, on `model`: same ids, offset, dropped span and storage.

        Raises:
            ValueError: arrays and settings that do not describe a cache of this model.
        """
        kv = KVSettings(**meta["kv"])
        pc = cls.new(model, window=meta["window"], keep=meta["keep"], kv=kv)
        if len(meta["layers"]) != len(pc.layers):
            raise ValueError(f"{len(meta['layers'])} layers, the model has {len(pc.layers)}")
        for i, (c, m) in enumerate(zip(pc.layers, meta["layers"], strict=True)):
            c.load_exported([arrays[f"layers.{i}.{j}"] for j in range(m["arrays"])], m)
        pc.ids = arrays["ids"].tolist()
        if len({(c.offset, c.dropped) for c in pc.layers}) > 1:
            raise ValueError("the layers hold different positions")
        if len(pc.ids) != pc.offset + pc.dropped:
            raise ValueError(f"{len(pc.ids)} ids for {pc.offset + pc.dropped} cached positions")
        return pc

    def room(self, n: int) -> int:
        """How many of `n` new ids fit before a layer would drop or quantize what it holds."""
        return min((c.room(n) for c in self.layers), default=n)

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim to the longest prefix of `prompt` held here; returns how many ids need no prefill.

        At least one id is always left to prefill (its logits start the answer). A change past
        the dropped span trims back to it; a change inside it keeps only the kept ids.
        """
        n = common_prefix(self.ids, prompt[:-1])
        dropped = self.dropped
        if dropped and n < self.keep + dropped:
            n, dropped = min(n, self.keep), 0
        for c in self.layers:
            c.trim(c.offset - (n - dropped))
            c.dropped = dropped
        self.ids = list(prompt[:n])
        return n

    def settle(self, ids: Sequence[int]) -> None:
        """After a turn, however it ended: `ids` is the prompt and all ids generated (the layers
        may lack the last few, e.g. the final token of a turn cut by max_tokens)."""
        n = self.offset
        for c in self.layers:
            c.trim(c.offset - n)
        self.ids = list(ids[: n + self.dropped])

    def trim(self, n: int) -> int:
        """Drop the last `n` ids from every layer; returns how many were dropped."""
        n = trim_prompt_cache(self.layers, n)
        if n:
            self.ids = self.ids[: len(self.ids) - n]
        return n

    def copy(self) -> PromptCache:
        """A deep copy: generating with one leaves the other as it was."""
        other = PromptCache(
            [c.copy() for c in self.layers], window=self.window, keep=self.keep, kv=self.kv
        )
        other.ids = list(self.ids)
        return other
