"""Generation in three layers: generate_step (token ids) -> stream_generate (responses) -> generate.

Nothing here prints; callers render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import mlx.core as mx

from .cache import Cache, PromptCache, trim_prompt_cache
from .sample import DEFAULT_MAX_TOKENS, LogitsProcessor, Sampler, Sampling, greedy

GREEDY = Sampling(temperature=0.0, top_p=1.0)  # for a model `load` did not make
DEFAULT_PREFILL_STEP = 512


class Cancel(Protocol):
    """What `cancel` needs: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


DEFAULT_LOOKUP_NGRAM = 3


@dataclass
class LookupStats:
    """Counts for prompt-lookup decoding."""

    passes: int = 0  # decode forward passes
    verified: int = 0  # of them, passes that verified a draft
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted


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


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prompt_cache: list[Cache] | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    prompt_progress: Callable[[int, int], None] | None = None,
    max_kv_size: int | None = None,
    keep: int = 0,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    prompt_lookup: int = 0,
    prompt_lookup_ngram: int = DEFAULT_LOOKUP_NGRAM,
    lookup_stats: LookupStats | None = None,
    context: Sequence[int] = (),
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) pairs; the next step is queued before the current one is returned.

    Args:
        prompt: 1-D array of token ids (only the ids not yet in `prompt_cache`).
        model: the model.
        max_tokens: how many tokens to generate (-1 for no limit).
        sampler: logprobs -> token; greedy by default.
        logits_processors: (tokens so far, logits) -> logits, applied in order; the tokens
            are `context`, the prompt and the ids generated. One with `stateful = True` turns
            prompt lookup off.
        prompt_cache: per-layer caches, updated in place; a fresh one when None.
        prefill_step_size: the prompt is processed in chunks of this many tokens.
        prompt_progress: called as (processed, total) during prefill.
        max_kv_size, keep: for a new cache, rotate within this many tokens, never dropping the
            first `keep` (see `KVCache`).
        kv_bits, kv_group_size, quantized_kv_start: for a new cache, quantize keys and values
            to 4 or 8 bits once it holds `quantized_kv_start` tokens.
        prompt_lookup: prompt-lookup decoding: draft up to this many tokens from n-grams of the
            prompt and the output, and verify them in one forward pass (0 turns it off). The
            output is unchanged: greedy gives the same tokens, sampling the same distribution.
        prompt_lookup_ngram: the longest n-gram matched to find a draft.
        lookup_stats: the forward passes, verify passes, drafted and accepted tokens are added
            to its counts.
        context: the ids already in `prompt_cache`, before `prompt` (a chat's earlier turns):
            logits processors see them, and prompt lookup drafts from them too.
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    if prompt_lookup < 0 or prompt_lookup_ngram < 1:
        raise ValueError("prompt_lookup must be >= 0 and prompt_lookup_ngram >= 1")
    if prompt_cache is None:
        prompt_cache = model.make_cache(
            max_kv_size, keep, bits=kv_bits, group_size=kv_group_size,
            quantize_after=quantized_kv_start,
        )  # fmt: skip
    cache = prompt_cache
    window = cache[0].window
    if window is not None:  # a prefill chunk must fit beside the kept tokens
        prefill_step_size = min(prefill_step_size, window - cache[0].keep)
    sampler = sampler or greedy
    tokens = None
    if logits_processors:  # they see every id so far, the cached ones included
        before = mx.array(list(context), dtype=prompt.dtype)
        tokens = mx.concatenate([before, prompt]) if context else prompt
    progress = prompt_progress or (lambda *_: None)
    stats = lookup_stats or LookupStats()
    lookup = None
    stateful = any(getattr(p, "stateful", False) for p in logits_processors)
    if prompt_lookup and not stateful and all(c.is_trimmable() for c in cache):
        # rejected drafts must come out of the cache, and a processor must see each id once
        lookup = _PromptLookup([*context, *prompt.tolist()], prompt_lookup_ngram)

    def process(history: mx.array | None, logits: mx.array) -> mx.array:
        for processor in logits_processors:
            logits = processor(history, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        stats.passes += 1
        logprobs = process(tokens, model(inputs[None], cache=cache)[:, -1, :])
        y = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, y])
        return y, logprobs.squeeze(0)

    def verify(y: int, draft: list[int]) -> tuple[list[int], mx.array]:
        """Run y and the draft in one pass and sample at every position; keep the longest prefix
        of the draft that the samples confirm, plus the first sample past it."""
        nonlocal tokens
        stats.passes, stats.verified, stats.drafted = (
            stats.passes + 1, stats.verified + 1, stats.drafted + len(draft)
        )  # fmt: skip
        inputs = mx.array([y, *draft], dtype=prompt.dtype)
        logits = model(inputs[None], cache=cache)[0]
        if logits_processors:  # each position sees its own history
            histories = [mx.concatenate([tokens, inputs[1 : i + 1]]) for i in range(len(inputs))]
            logprobs = mx.concatenate(
                [process(h, logits[i : i + 1]) for i, h in enumerate(histories)]
            )
        else:
            logprobs = process(None, logits)
        samples = sampler(logprobs).tolist()
        a = 0
        while a < len(draft) and samples[a] == draft[a]:
            a += 1
        trim_prompt_cache(cache, len(draft) - a)
        stats.accepted += a
        if logits_processors:
            tokens = mx.concatenate([tokens, mx.array(samples[: a + 1], dtype=tokens.dtype)])
        return samples[: a + 1], logprobs[: a + 1]

    total, done = prompt.size, 0
    progress(0, total)
    # Prefill all but the last token in chunks, evaluating the cache to bound memory.
    while total - done > 1:
        n = min(prefill_step_size, total - done - 1)
        model(prompt[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        progress(done, total)

    y, logprobs = step(prompt[done:])
    mx.async_eval(y, logprobs)
    n = 0
    while n != max_tokens:
        # A draft predicts y and what follows it: only once y confirms it is the rest verified.
        left = max_tokens - n if max_tokens >= 0 else prompt_lookup + 1
        room = min(c.room(min(prompt_lookup + 1, left)) for c in cache) if lookup else 0
        draft = lookup.draft(room) if lookup else []
        if len(draft) > 1 and y.item() != draft[0]:
            lookup.hit(False)
            draft = []
        if len(draft) > 1:
            start = time.perf_counter()
            samples, sample_logprobs = verify(draft[0], draft[1:])
            lookup.verified(len(draft), len(samples), time.perf_counter() - start)
            out = [(draft[0], logprobs), *zip(samples[:-1], sample_logprobs[:-1], strict=True)]
            y, logprobs = mx.array(samples[-1:], dtype=prompt.dtype), sample_logprobs[-1]
        else:
            if n + 1 != max_tokens:
                next_y, next_logprobs = step(y)
                mx.async_eval(next_y, next_logprobs)
            out = [(y.item(), logprobs)]
            if lookup:
                lookup.plain_step()
            if n + 1 != max_tokens:
                y, logprobs = next_y, next_logprobs
        if n == 0:
            progress(total, total)
        for token, token_logprobs in out:
            if lookup:
                lookup.add([token])
            yield token, token_logprobs
            n += 1
            if n % 256 == 0:
                mx.clear_cache()


@dataclass
class GenerationResponse:
    """One step of stream_generate: the new text and token, and running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    time_to_first_token: float  # seconds
    finish_reason: str | None = None  # "stop" (end of turn or stop string), "length", "cancelled"
    cached_tokens: int = 0  # of prompt_tokens, those reused from the prompt cache (no prefill)
    lookup: LookupStats = field(default_factory=LookupStats)  # forward passes, drafts accepted


def _stop_index(text: str, stop_strings: Sequence[str]) -> int:
    """Where the first stop string starts in `text`, or -1."""
    hits = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters could still begin a stop string (kept until resolved)."""
    return max(
        (
            k
            for s in stop_strings
            for k in range(min(len(s) - 1, len(text)), 0, -1)
            if s.startswith(text[-k:])
        ),
        default=0,
    )


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | mx.array,
    *,
    max_tokens: int | None = None,
    sampling: Sampling | None = None,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    stop_strings: Sequence[str] = (),
    prompt_cache: PromptCache | None = None,
    cancel: Cancel | None = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream text as it is generated, stopping at an end-of-turn token or a stop string.

    The last response has `finish_reason` "stop", "length" or "cancelled"; the others None.

    Args:
        model, tokenizer: as returned by `load`.
        prompt: text (encoded as is, control tokens allowed) or token ids: the whole prompt,
            also when `prompt_cache` holds part of it.
        max_tokens: the most tokens to generate; `sampling.max_tokens` by default.
        sampling: a Sampling; the model folder's generation_config.json by default.
        sampler: replaces the one `sampling` makes.
        logits_processors: replace those `sampling` makes (its repetition penalty).
        stop_strings: generation ends before the first of these appears in the text.
        prompt_cache: reused for the longest prefix it holds of `prompt`, and left holding the
            prompt and the ids generated (multi-turn reuse); a fresh cache when None.
        cancel: a threading.Event: once set, generation ends after the current token, with
            "cancelled".
        **kwargs: passed to `generate_step` (prefill_step_size, prompt_progress, prompt_lookup,
            max_kv_size, ...).
    """
    if sampling is None:
        sampling = model.info.sampling if model.info is not None else GREEDY
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = sampler or sampling.sampler()
    if logits_processors is None:
        logits_processors = sampling.logits_processors()
    max_tokens = sampling.max_tokens if max_tokens is None else max_tokens
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, allow_special=True)
    ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    max_tokens = _fit_context(model, len(ids), max_tokens, kwargs.get("max_kv_size"), prompt_cache)
    mx.reset_peak_memory()
    start = time.perf_counter()
    reused = prompt_cache.reuse(ids) if prompt_cache is not None else 0

    stats = kwargs.setdefault("lookup_stats", LookupStats())
    detokenizer = tokenizer.detokenizer()
    eos = tokenizer.eos_token_ids
    pending = ""  # decoded text not yet sent, held while it may begin a stop string
    first = start  # when the first token arrived: prefill ends there
    generated: list[int] = []

    def response(text: str, token: int | None, finish: str | None) -> GenerationResponse:
        prompt_time, decode_time = first - start, time.perf_counter() - first
        n, prefilled = len(generated), len(ids) - reused
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=prefilled / prompt_time if prompt_time > 0 else 0.0,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            time_to_first_token=prompt_time,
            finish_reason=finish,
            cached_tokens=reused,
            lookup=replace(stats),
        )

    finish = "length"
    token = None
    steps = generate_step(
        mx.array(ids[reused:], dtype=mx.uint32),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache.layers if prompt_cache is not None else None,
        context=ids[:reused],
        **kwargs,
    )
    try:
        for token, _ in steps:
            if not generated:
                first = time.perf_counter()
            generated.append(token)
            if token in eos:
                finish = "stop"
                break
            detokenizer.add_token(token)
            pending += detokenizer.last_segment
            if stop_strings and (i := _stop_index(pending, stop_strings)) >= 0:
                pending = pending[:i]
                finish = "stop"
                break
            keep = _held_back(pending, stop_strings) if stop_strings else 0
            text, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            yield response(text, token, None)
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
    finally:  # however it ended (a break, an error, the caller closing the stream)
        steps.close()
        if prompt_cache is not None:
            prompt_cache.settle(ids + generated)

    detokenizer.finalize()
    if finish != "stop":
        pending += detokenizer.last_segment
        if finish == "length" and stop_strings and (i := _stop_index(pending, stop_strings)) >= 0:
            pending, finish = pending[:i], "stop"
    yield response(pending, token if finish == "length" else None, finish)


def _fit_context(
    model, n: int, max_tokens: int, max_kv_size: int | None, prompt_cache: PromptCache | None
) -> int:
    """`max_tokens`, cut to the room the model's context leaves (none to cut in a rotating cache).

    Raises:
        ValueError: the prompt alone fills the context.
    """
    context = model.max_context
    if not context or max_kv_size or (prompt_cache is not None and prompt_cache.window):
        return max_tokens
    if n >= context:
        raise ValueError(
            f"the prompt needs {n} tokens of context, no room left to answer in the "
            f"{context} allowed (raise max_context, up to 131072 with YaRN)"
        )
    return min(max_tokens, context - n) if max_tokens >= 0 else context - n


def generate(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as a string; see `stream_generate` for the options."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
