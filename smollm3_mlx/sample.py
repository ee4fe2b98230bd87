"""Sampling settings, and the samplers (logprobs -> token) and logits processors they build.

A logits processor is `processor(tokens, logits) -> logits`, where `tokens` holds every id so far:
the whole prompt (a cached prefix included) and the ids generated. It may force a token by
masking all others to -inf. One with the attribute `stateful = True` (it keeps state across
calls) turns prompt lookup off, whose verify pass calls processors on speculative histories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
DEFAULT_MAX_TOKENS = 4096  # reasoning traces run to thousands of tokens


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _categorical(logprobs: mx.array, temperature: float) -> mx.array:
    return mx.random.categorical(logprobs * (1 / temperature))


@mx.compile
def _categorical_keyed(logprobs: mx.array, temperature: float, key: mx.array) -> mx.array:
    return mx.random.categorical(logprobs * (1 / temperature), key=key)


@mx.compile
def _apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    kth = mx.sort(logprobs, axis=-1)[..., -top_k, None]
    return mx.where(logprobs < kth, -mx.inf, logprobs)


@mx.compile
def _apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    # Keep the smallest set of tokens whose probability mass reaches top_p.
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    mass_before = mx.cumsum(mx.exp(sorted_lp), axis=-1) - mx.exp(sorted_lp)
    sorted_lp = mx.where(mass_before < top_p, sorted_lp, -mx.inf)
    return mx.put_along_axis(logprobs, order, sorted_lp, axis=-1)


@mx.compile
def _apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    # Drop tokens less likely than min_p times the most likely one.
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    *,
    seed: int | None = None,
) -> Sampler:
    """A sampler over log-probabilities: argmax at temperature 0, else filtered categorical.

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus mass to keep (1 keeps all).
        top_k: keep the k most likely tokens (0 keeps all).
        min_p: keep tokens at least min_p times as likely as the best (0 keeps all).
        seed: draw from a random stream of the sampler's own (a batch row's), the very draws
            MLX's global generator makes after `mx.random.seed(seed)`; None: the global one.
    """
    if temperature == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if top_k > 0:
        filters.append(lambda x: _apply_top_k(x, min(top_k, x.shape[-1])))  # k past the vocab: all
    if 0 < top_p < 1:
        filters.append(lambda x: _apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: _apply_min_p(x, min_p))

    key = None if seed is None else mx.random.key(seed)

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal key
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return _categorical(logprobs, temperature)
        key, draw = mx.random.split(key)  # as the global generator steps its own key
        return _categorical_keyed(logprobs, temperature, draw)

    return sampler


def make_repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """Scale down the logits of tokens seen in the last `context_size` tokens (CTRL-style)."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[-context_size:]
        selected = logits[:, recent]
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        logits[:, recent] = selected
        return logits

    return processor


def make_logits_processors(
    repetition_penalty: float = 1.0, repetition_context_size: int = 64
) -> list[LogitsProcessor]:
    if repetition_penalty and repetition_penalty != 1.0:
        return [make_repetition_penalty(repetition_penalty, repetition_context_size)]
    return []


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: the one sampling type of the API, CLI and chat.

    The defaults are SmolLM3's recommended ones; a model folder's generation_config.json gives
    its own (`model.info.sampling`, read by `load`).

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_p, top_k, min_p: filters, as for `make_sampler`.
        repetition_penalty: CTRL-style penalty on recent tokens (1 is off).
        max_tokens: the most tokens a turn or completion generates.
        seed: seeds MLX's random generator when generation starts (None leaves it as it is).

    Raises:
        ValueError: a value out of its range (one line naming it), so that the API, the CLI and
            saved conversations refuse the same values the same way.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS  # thinking alone can take thousands
    seed: int | None = None

    def __post_init__(self) -> None:
        problem = sampling_problem(self)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_model(cls, model: Any, **overrides: Any) -> Sampling:
        """The model folder's generation_config.json defaults (`model.info.sampling`), then the
        `overrides` not None."""
        base = model.info.sampling if model.info is not None else cls()
        return base.updated(**overrides)

    def updated(self, **overrides: Any) -> Sampling:
        """A copy with the `overrides` that are not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def sampler(self) -> Sampler:
        return make_sampler(self.temperature, self.top_p, self.top_k, self.min_p)

    def logits_processors(self) -> list[LogitsProcessor]:
        return make_logits_processors(self.repetition_penalty)


# name -> (kind, lowest, highest, whether the lowest itself is allowed, what it means)
_RANGES: dict[str, tuple[type, float, float, bool, str]] = {
    "temperature": (float, 0, math.inf, True, "a finite number >= 0 (0 is greedy)"),
    "top_p": (float, 0, 1, False, "a number in (0, 1] (1 keeps all tokens)"),
    "top_k": (int, 0, math.inf, True, "a whole number >= 0 (0 keeps all tokens)"),
    "min_p": (float, 0, 1, True, "a number in [0, 1] (0 keeps all tokens)"),
    "repetition_penalty": (float, 0, math.inf, False, "a finite number > 0 (1 is off)"),
    "max_tokens": (int, 1, math.inf, True, "a whole number >= 1"),
    "seed": (int, 0, 2**64 - 1, True, "a whole number from 0 to 2**64 - 1, or None"),
}


def sampling_problem(s: Sampling) -> str | None:
    """What is wrong with a Sampling's values, in one line, or None."""
    for name, (kind, low, high, low_ok, meaning) in _RANGES.items():
        v = getattr(s, name)
        if v is None and name == "seed":
            continue
        whole = isinstance(v, int) and not isinstance(v, bool)
        number = whole or (kind is float and isinstance(v, float) and math.isfinite(v))
        ok = number and (low <= v if low_ok else low < v) and v <= high
        if not ok:
            return f"{name} must be {meaning}, not {v!r:.40}"
    return None
