"""Prompt-lookup decoding: a step of its own beside `generate_step`, chosen by `stream_generate`.

Drafts come from the context (what followed the latest earlier occurrence of the last n-gram) and
are verified in one forward pass; the output is unchanged: greedy gives the same tokens, sampling
the same distribution.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import replace
from typing import Any

import mlx.core as mx

from .cache import trim_prompt_cache
from .sample import DEFAULT_MAX_TOKENS
from .step import Decoder, LookupStats, StepOptions, plain_steps, prefill

DEFAULT_LOOKUP_NGRAM = 3


class _PromptLookup:
    """Drafts from the context: what followed the latest earlier occurrence of its last n-gram.

    The longest n-gram (up to `ngram` tokens) that occurred before wins. A miss (a draft whose
    first token is wrong, or a verify pass slower per token than plain steps) pauses drafting for
    a number of tokens that doubles with each miss in a row, so that it costs almost nothing where
    it does not pay: on non-repetitive text, or where a pass over many tokens costs many steps.
    """

    def __init__(self, tokens: list[int], ngram: int):
        self.ngram = ngram
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.pause, self.backoff, self.hopeless = 0, 1, 0
        self.step_time: float | None = None  # seconds per plain step, smoothed
        self.last: float | None = None  # when the previous plain step's token arrived
        self.add(tokens)

    def add(self, tokens: list[int]) -> None:
        for t in tokens:
            p = len(self.tokens)
            for k in range(1, min(self.ngram, p) + 1):
                self.seen[tuple(self.tokens[p - k :])] = p
            self.tokens.append(t)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens predicted to come next (an empty list while paused)."""
        if self.pause:
            self.pause -= 1
            return []
        if self.step_time is None:  # time plain steps first: a verify pass must beat them
            return []
        for k in range(min(self.ngram, len(self.tokens)), 0, -1):
            start = self.seen.get(tuple(self.tokens[-k:]))
            if start is not None:
                period = len(self.tokens) - start  # a match near the end repeats, as loops do
                return [self.tokens[start + i % period] for i in range(limit)]
        return []

    def hit(self, ok: bool) -> None:
        self.pause, self.backoff = (0, 1) if ok else (self.backoff, min(2 * self.backoff, 64))

    def plain_step(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            dt = now - self.last
            self.step_time = dt if self.step_time is None else 0.8 * self.step_time + 0.2 * dt
        self.last = now

    def verified(self, length: int, new_tokens: int, seconds: float) -> None:
        """A pass over `length` tokens gave `new_tokens` in `seconds`: a hit if it beat plain steps.

        Where a pass over L tokens costs L steps (MLX's CPU backend), not even a fully accepted
        draft pays: after two such passes in a row, drafting pauses for 256 tokens at a time.
        """
        self.last = None
        steps = 1.1 * seconds / self.step_time  # what the pass cost in plain steps, with a margin
        self.hit(new_tokens > 1 and new_tokens > steps)
        self.hopeless = self.hopeless + 1 if length <= steps else 0
        if self.hopeless >= 2:
            self.pause = self.backoff = 256


def lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt_lookup: int = 4,
    prompt_lookup_ngram: int = DEFAULT_LOOKUP_NGRAM,
    **options: Any,
) -> Generator[tuple[int, mx.array], None, None]:
    """`generate_step` with prompt-lookup decoding: the same (token, logprobs) pairs, fewer passes.

    Args:
        prompt, model, max_tokens: as for `generate_step`.
        prompt_lookup: draft up to this many tokens from n-grams of the context, the prompt and
            the output, and verify them in one forward pass (0: plain steps).
        prompt_lookup_ngram: the longest n-gram matched to find a draft.
        **options: see `StepOptions`; `lookup_stats` also counts verify passes, drafted and
            accepted tokens. A logits processor with `stateful = True`, or a cache that cannot
            be trimmed (rejected drafts must come out), means plain steps.
    """
    if prompt_lookup < 0 or prompt_lookup_ngram < 1:
        raise ValueError("prompt_lookup must be >= 0 and prompt_lookup_ngram >= 1")
    o = StepOptions(**options)
    o = o if o.lookup_stats is not None else replace(o, lookup_stats=LookupStats())
    stateful = any(getattr(p, "stateful", False) for p in o.logits_processors)
    cache = o.prompt_cache
    if not prompt_lookup or stateful or (cache and not all(c.is_trimmable() for c in cache)):
        return plain_steps(prompt, model, max_tokens, o)
    return _lookup_steps(prompt, model, max_tokens, prompt_lookup, prompt_lookup_ngram, o)


def _lookup_steps(
    prompt: mx.array, model, max_tokens: int, prompt_lookup: int, ngram: int, o: StepOptions
) -> Generator[tuple[int, mx.array], None, None]:
    decoder, last, prefilled = prefill(prompt, model, o)
    lookup = _PromptLookup([*o.context, *prompt.tolist()], ngram)
    y, logprobs = decoder.step(last)
    mx.async_eval(y, logprobs)
    n = 0
    while n != max_tokens:
        # A draft predicts y and what follows it: only once y confirms it is the rest verified.
        left = max_tokens - n if max_tokens >= 0 else prompt_lookup + 1
        room = min(c.room(min(prompt_lookup + 1, left)) for c in decoder.cache)
        draft = lookup.draft(room)
        if len(draft) > 1 and y.item() != draft[0]:
            lookup.hit(False)
            draft = []
        if len(draft) > 1:
            begin = time.perf_counter()
            samples, sample_logprobs = _verify(decoder, draft[0], draft[1:], prompt.dtype)
            lookup.verified(len(draft), len(samples), time.perf_counter() - begin)
            out = [(draft[0], logprobs), *zip(samples[:-1], sample_logprobs[:-1], strict=True)]
            y, logprobs = mx.array(samples[-1:], dtype=prompt.dtype), sample_logprobs[-1]
        else:
            if n + 1 != max_tokens:
                next_y, next_logprobs = decoder.step(y)
                mx.async_eval(next_y, next_logprobs)
            out = [(y.item(), logprobs)]
            lookup.plain_step()
            if n + 1 != max_tokens:
                y, logprobs = next_y, next_logprobs
        if n == 0:
            prefilled()
        for token, token_logprobs in out:
            lookup.add([token])
            yield token, token_logprobs
            n += 1
            if n % 256 == 0:
                mx.clear_cache()


def _verify(
    decoder: Decoder, y: int, draft: list[int], dtype: mx.Dtype
) -> tuple[list[int], mx.array]:
    """Run y and the draft in one pass and sample at every position; keep the longest prefix of
    the draft that the samples confirm, plus the first sample past it."""
    stats = decoder.stats
    stats.passes, stats.verified, stats.drafted = (
        stats.passes + 1, stats.verified + 1, stats.drafted + len(draft)
    )  # fmt: skip
    inputs = mx.array([y, *draft], dtype=dtype)
    logits = decoder.model(inputs[None], cache=decoder.cache)[0]
    if decoder.tokens is not None:  # each position sees its own history
        history = decoder.tokens
        logprobs = mx.concatenate(
            [
                decoder.logprobs(mx.concatenate([history, inputs[1 : i + 1]]), logits[i : i + 1])
                for i in range(len(inputs))
            ]
        )
    else:
        logprobs = decoder.logprobs(None, logits)
    samples = decoder.sampler(logprobs).tolist()
    a = 0
    while a < len(draft) and samples[a] == draft[a]:
        a += 1
    trim_prompt_cache(decoder.cache, len(draft) - a)
    stats.accepted += a
    decoder.accept(mx.array(samples[: a + 1], dtype=dtype))
    return samples[: a + 1], logprobs[: a + 1]
