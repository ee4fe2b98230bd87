"""Samplers (logprobs -> token) and logits processors, built by make_* factories."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _categorical(logprobs: mx.array, temperature: float) -> mx.array:
    return mx.random.categorical(logprobs * (1 / temperature))


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
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """A sampler over log-probabilities: argmax at temperature 0, else filtered categorical.

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus mass to keep (1 keeps all).
        top_k: keep the k most likely tokens (0 keeps all).
        min_p: keep tokens at least min_p times as likely as the best (0 keeps all).
    """
    if temperature == 0:
        return greedy
    filters: list[Callable[[mx.array], mx.array]] = []
    if top_k > 0:
        filters.append(lambda x: _apply_top_k(x, top_k))
    if 0 < top_p < 1:
        filters.append(lambda x: _apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: _apply_min_p(x, min_p))

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return _categorical(logprobs, temperature)

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
