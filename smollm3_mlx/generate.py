"""Generation in three layers: generate_step (token ids) -> stream_generate (responses) -> generate.

`stream_generate` is the one core that Chat, the CLI and a server use: it reuses a PromptCache,
decides the end of a turn, and measures. Prompt lookup is a step of its own (lookup.py) that it
chooses instead of `generate_step`. Nothing here prints; callers render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import mlx.core as mx

from .cache import Cache, PromptCache
from .model import Model
from .sample import DEFAULT_MAX_TOKENS, LogitsProcessor, Sampler, Sampling, greedy

GREEDY = Sampling(temperature=0.0, top_p=1.0)  # for a model `load` did not make
DEFAULT_PREFILL_STEP = 512
# On the CPU a chunk of the prompt costs about as much per token as single steps (BENCHMARKS.md),
# so chunks there are sized to a few tokens of SmolLM3-3B: Ctrl-C acts within seconds.
CPU_PREFILL_WORK = 4 * 3.04e9  # tokens x parameters per chunk: 4 tokens of the 3B (3.04e9 below)


class Cancel(Protocol):
    """What `cancel` needs: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


@dataclass
class LookupStats:
    """Forward passes, and what prompt lookup drafted and got accepted."""

    passes: int = 0  # decode forward passes
    verified: int = 0  # of them, passes that verified a draft
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted


class Decoder:
    """The model, its cache, the sampler and the logits processors: one forward pass at a time.

    `tokens` holds every id so far (context, prompt, generated) while processors need them.
    """

    def __init__(
        self,
        model,
        cache: list[Cache],
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor],
        tokens: mx.array,
        stats: LookupStats,
    ):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.processors = list(logits_processors)
        self.tokens = tokens if self.processors else None
        self.stats = stats

    def logprobs(self, history: mx.array | None, logits: mx.array) -> mx.array:
        for processor in self.processors:
            logits = processor(history, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def step(self, inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Feed `inputs`; the next token (queued, not evaluated) and its log-probabilities."""
        self.stats.passes += 1
        logprobs = self.logprobs(self.tokens, self.model(inputs[None], cache=self.cache)[:, -1, :])
        y = self.sampler(logprobs)
        self.accept(y)
        return y, logprobs.squeeze(0)

    def accept(self, ids: mx.array) -> None:
        if self.tokens is not None:
            self.tokens = mx.concatenate([self.tokens, ids.astype(self.tokens.dtype)])


def default_prefill_step(model) -> int:
    """Prompt tokens per forward chunk: 512 on a GPU; on the CPU, what makes a chunk short
    (512 for a model that is not ours, e.g. a wrapper: its size is unknown)."""
    if mx.default_device().type == mx.gpu or not isinstance(model, Model):
        return DEFAULT_PREFILL_STEP
    a = model.args
    params = a.num_hidden_layers * (4 * a.hidden_size**2 + 3 * a.hidden_size * a.intermediate_size)
    return max(1, min(DEFAULT_PREFILL_STEP, int(CPU_PREFILL_WORK / params)))


class _Cancelled(Exception):
    """Raised by stream_generate's progress hook between prefill chunks once cancelled."""


@dataclass(frozen=True)
class StepOptions:
    """What `generate_step` and `lookup_generate_step` take beside the prompt and max_tokens.

    Args:
        sampler: logprobs -> token; greedy by default.
        logits_processors: (tokens so far, logits) -> logits, applied in order; the tokens
            are `context`, the prompt and the ids generated.
        prompt_cache: per-layer caches, updated in place; a fresh one when None.
        prefill_step_size: the prompt is processed in chunks of this many tokens
            (`default_prefill_step`: short chunks on the CPU).
        prompt_progress: called as (processed, total) during prefill.
        max_kv_size, keep: for a new cache, rotate within this many tokens, never dropping the
            first `keep` (see `KVCache`).
        kv_bits, kv_group_size, quantized_kv_start: for a new cache, quantize keys and values
            to 4 or 8 bits once it holds `quantized_kv_start` tokens.
        lookup_stats: the forward passes (and prompt lookup's drafts) are added to its counts.
        context: the ids already in `prompt_cache`, before the prompt (a chat's earlier turns):
            the logits processors see them, and prompt lookup drafts from them too.
    """

    sampler: Sampler | None = None
    logits_processors: Sequence[LogitsProcessor] = ()
    prompt_cache: list[Cache] | None = None
    prefill_step_size: int | None = None
    prompt_progress: Callable[[int, int], None] | None = None
    max_kv_size: int | None = None
    keep: int = 0
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    lookup_stats: LookupStats | None = None
    context: Sequence[int] = ()


def prefill(
    prompt: mx.array, model, o: StepOptions
) -> tuple[Decoder, mx.array, Callable[[], None]]:
    """Make the cache if none is given and prefill all of `prompt` but its last id.

    Returns the decoder, the ids left to feed, and what to call once the first token is out
    (the prefill's last progress report).
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    cache = o.prompt_cache
    if cache is None:
        cache = model.make_cache(
            o.max_kv_size, o.keep, bits=o.kv_bits, group_size=o.kv_group_size,
            quantize_after=o.quantized_kv_start,
        )  # fmt: skip
    tokens = prompt
    if o.context and o.logits_processors:  # they see every id so far, the cached ones included
        tokens = mx.concatenate([mx.array(list(o.context), dtype=prompt.dtype), prompt])
    stats = o.lookup_stats if o.lookup_stats is not None else LookupStats()
    decoder = Decoder(model, cache, o.sampler or greedy, o.logits_processors, tokens, stats)
    progress = o.prompt_progress or (lambda *_: None)
    total = prompt.size
    progress(0, total)
    step_size = o.prefill_step_size or default_prefill_step(model)
    _run_chunks(
        model, cache, prompt, total - 1, step_size, progress
    )  # the last id goes to decoding
    return decoder, prompt[total - 1 :], lambda: progress(total, total)


def prefill_cache(model, pc: PromptCache, ids: list[int], *, step_size: int | None = None) -> None:
    """Put `ids` in `pc` without generating: reuse what it holds, run the rest in chunks, settle."""
    done = pc.reuse(ids)
    rest = mx.array(ids[done:])
    _run_chunks(model, pc.layers, rest, rest.size, step_size or default_prefill_step(model))
    pc.settle(ids)


def _run_chunks(
    model,
    cache: list[Cache],
    prompt: mx.array,
    stop: int,
    step_size: int,
    progress: Callable[[int, int], None] = lambda *_: None,
) -> None:
    """Run `prompt[:stop]` through the model in chunks, evaluating the cache after each to bound
    memory; `progress` gets (processed, prompt.size)."""
    if cache[0].window is not None:  # a prefill chunk must fit beside the kept tokens
        step_size = min(step_size, cache[0].window - cache[0].keep)
    done = 0
    while done < stop:
        n = min(step_size, stop - done)
        model(prompt[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        progress(done, prompt.size)


def generate_step(
    prompt: mx.array, model, *, max_tokens: int = DEFAULT_MAX_TOKENS, **options: Any
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) pairs; the next step is queued before the current one is returned.

    Args:
        prompt: 1-D array of token ids (only the ids not yet in `prompt_cache`).
        model: the model.
        max_tokens: how many tokens to generate (-1 for no limit).
        **options: see `StepOptions` (sampler, logits_processors, prompt_cache, ...).
    """
    return plain_steps(prompt, model, max_tokens, StepOptions(**options))


def plain_steps(
    prompt: mx.array, model, max_tokens: int, options: StepOptions
) -> Generator[tuple[int, mx.array], None, None]:
    """The loop of `generate_step`: one forward pass per token."""
    decoder, last, prefilled = prefill(prompt, model, options)
    y, logprobs = decoder.step(last)
    mx.async_eval(y, logprobs)
    n = 0
    while n != max_tokens:
        if n + 1 != max_tokens:
            next_y, next_logprobs = decoder.step(y)
            mx.async_eval(next_y, next_logprobs)
        if n == 0:
            prefilled()
        yield y.item(), logprobs
        n += 1
        if n % 256 == 0:
            mx.clear_cache()
        if n != max_tokens:
            y, logprobs = next_y, next_logprobs


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
    parsed: Any = None  # the last response: the value of an answer held to `response_format`
    # `token`'s step: log-probabilities over the vocabulary, after the logits processors
    logprobs: mx.array | None = None


class _TextStream:
    """Token ids -> text, held back while it may begin a stop string, cut before one."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.detokenizer = tokenizer.detokenizer()
        self.stop_strings = stop_strings
        self.pending = ""  # decoded, not yet sent

    def add(self, token: int) -> tuple[str, bool]:
        """The text that is now safe to send, and whether a stop string was reached."""
        self.detokenizer.add_token(token)
        self.pending += self.detokenizer.last_segment
        if self._cut():
            return self.pending, True
        keep = self._held_back() if self.stop_strings else 0
        text, self.pending = (
            self.pending[: len(self.pending) - keep],
            self.pending[len(self.pending) - keep :],
        )
        return text, False

    def end(self, finish: str) -> tuple[str, str]:
        """The rest of the text, and the finish reason (a stop string found in it: "stop")."""
        self.detokenizer.finalize()
        if finish != "stop":
            self.pending += self.detokenizer.last_segment
            if finish == "length" and self._cut():
                finish = "stop"
        return self.pending, finish

    def _cut(self) -> bool:
        hits = [i for s in self.stop_strings if (i := self.pending.find(s)) >= 0]
        if hits:
            self.pending = self.pending[: min(hits)]
        return bool(hits)

    def _held_back(self) -> int:
        """How many trailing characters could still begin a stop string (kept until resolved)."""
        text = self.pending
        return max(
            (
                k
                for s in self.stop_strings
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
    response_format: Any = None,
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
        cancel: a threading.Event: once set, generation ends after the current token (during
            the prefill: after the current forward chunk), with "cancelled".
        response_format: hold the output to a JSON schema, regex or choice of strings (see
            `constrain.make_response_format`); the last response's `parsed` has its value. A
            chat prompt's answer starts after its think block; a plain prompt's at once.
        **kwargs: passed to the step: `generate_step` (prefill_step_size, prompt_progress,
            max_kv_size, ...), or with `prompt_lookup` (and `prompt_lookup_ngram`)
            `lookup.lookup_generate_step`.
    """
    if sampling is None:
        sampling = model.info.sampling if model.info is not None else GREEDY
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = sampler or sampling.sampler()
    if logits_processors is None:
        logits_processors = sampling.logits_processors()
    constraint = None
    if response_format is not None:
        from .constrain import make_answer_constraint  # the grammar engine, only when asked

        constraint = make_answer_constraint(tokenizer, response_format)
        logits_processors = [*logits_processors, *([constraint] if constraint else [])]
    max_tokens = sampling.max_tokens if max_tokens is None else max_tokens
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, allow_special=True)
    ids = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    max_tokens = _fit_context(model, len(ids), max_tokens, kwargs.get("max_kv_size"), prompt_cache)
    mx.reset_peak_memory()
    start = time.perf_counter()
    reused = prompt_cache.reuse(ids) if prompt_cache is not None else 0

    stats = kwargs.setdefault("lookup_stats", LookupStats())
    text = _TextStream(tokenizer, stop_strings)
    first = start  # when the first token arrived: prefill ends there
    generated: list[int] = []

    def response(
        piece: str, token: int | None, finish: str | None, logprobs: mx.array | None = None
    ) -> GenerationResponse:
        prompt_time, decode_time = first - start, time.perf_counter() - first
        n, prefilled = len(generated), len(ids) - reused
        return GenerationResponse(
            text=piece,
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
            logprobs=logprobs,
        )

    if cancel is not None:  # checked between prefill chunks too
        kwargs["prompt_progress"] = partial(_check, cancel, kwargs.get("prompt_progress"))
    step: Callable[..., Generator[tuple[int, mx.array], None, None]] = generate_step
    lookup = {k: kwargs.pop(k) for k in ("prompt_lookup", "prompt_lookup_ngram") if k in kwargs}
    if lookup.get("prompt_lookup"):
        from .lookup import lookup_generate_step

        step = partial(lookup_generate_step, **lookup)
    steps = step(
        mx.array(ids[reused:], dtype=mx.uint32),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache.layers if prompt_cache is not None else None,
        context=ids[:reused],
        **kwargs,
    )
    finish, token = "length", None
    try:
        for token, logprobs in steps:
            if not generated:
                first = time.perf_counter()
            generated.append(token)
            if token in tokenizer.eos_token_ids:
                finish = "stop"
                break
            piece, stopped = text.add(token)
            if stopped:
                finish = "stop"
                break
            yield response(piece, token, None, logprobs)
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
    except _Cancelled:
        finish = "cancelled"
    finally:  # however it ended (a break, an error, the caller closing the stream)
        steps.close()
        if prompt_cache is not None:
            prompt_cache.settle(ids + generated)
    piece, finish = text.end(finish)
    last = response(piece, token if finish == "length" else None, finish)
    if constraint is not None and finish == "stop" and constraint.complete:
        last.parsed = constraint.parse() if constraint.response_format else None
    yield last


def _check(cancel: Cancel, progress: Callable[[int, int], None] | None, done: int, total: int):
    if progress is not None:
        progress(done, total)
    if cancel.is_set() and done < total:
        raise _Cancelled


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
