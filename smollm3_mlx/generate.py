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

from .cache import PromptCache
from .sample import LogitsProcessor, Sampler, Sampling
from .step import LookupStats, generate_step

GREEDY = Sampling(temperature=0.0, top_p=1.0)  # for a model `load` did not make


class Cancel(Protocol):
    """What `cancel` needs: a threading.Event, or anything with is_set()."""

    def is_set(self) -> bool: ...


class _Cancelled(Exception):
    """Raised by stream_generate's progress hook between prefill chunks once cancelled."""


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
    # of prompt_tokens, those this call read: the rest after cached_tokens, fewer where it was
    # cancelled during the prefill
    prefill_tokens: int = 0
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
    plan = _Plan.make(
        model, tokenizer, sampling, sampler, logits_processors, response_format, max_tokens
    )
    max_tokens = plan.max_tokens if max_tokens is None else max_tokens
    ids = _prompt_ids(prompt, tokenizer)
    max_tokens = _fit_context(model, len(ids), max_tokens, kwargs.get("max_kv_size"), prompt_cache)
    mx.reset_peak_memory()
    start = time.perf_counter()
    reused = prompt_cache.reuse(ids) if prompt_cache is not None else 0
    meter = _Meter(ids, reused, kwargs.setdefault("lookup_stats", LookupStats()), start)
    text = _TextStream(tokenizer, stop_strings)
    generated = meter.generated
    steps = _choose_step(kwargs, cancel, meter)(
        mx.array(ids[reused:], dtype=mx.uint32),
        model,
        max_tokens=max_tokens,
        sampler=plan.sampler,
        logits_processors=plan.logits_processors,
        prompt_cache=prompt_cache.layers if prompt_cache is not None else None,
        context=ids[:reused],
        **kwargs,
    )
    finish, token = "length", None
    try:
        for token, logprobs in steps:
            if not generated:
                meter.first = time.perf_counter()
            generated.append(token)
            if token in tokenizer.eos_token_ids:
                finish = "stop"
                break
            piece, stopped = text.add(token)
            if stopped:
                finish = "stop"
                break
            yield meter.response(piece, token, None, logprobs)
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
    last = meter.response(piece, token if finish == "length" else None, finish)
    constraint = plan.constraint
    if constraint is not None and finish == "stop" and constraint.complete:
        last.parsed = constraint.parse() if constraint.response_format else None
    yield last


def _prompt_ids(prompt, tokenizer) -> list[int]:
    """A prompt's ids: text encoded (control tokens allowed), ids as a list."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, allow_special=True)
    return prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)


@dataclass(frozen=True)
class _Plan:
    """What a call to `stream_generate` decides once, before any step: sampler, processors, the
    response format's constraint (among the processors) and the default length."""

    sampler: Sampler
    logits_processors: Sequence[LogitsProcessor]
    constraint: Any
    max_tokens: int

    @classmethod
    def make(
        cls, model, tokenizer, sampling, sampler, logits_processors, response_format, max_tokens
    ) -> _Plan:
        if sampling is None:
            sampling = model.info.sampling if model.info is not None else GREEDY
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = sampler or sampling.sampler()
        if logits_processors is None:
            logits_processors = sampling.logits_processors()
        constraint = None
        if response_format is not None:
            from .constrain import make_turn_processors  # the grammar engine, only when asked

            # A prompt that leaves the model thinking keeps the answer's reserve, as Chat does.
            room = sampling.max_tokens if max_tokens is None or max_tokens < 0 else max_tokens
            held, constraint = make_turn_processors(
                tokenizer, response_format=response_format, room=room
            )
            logits_processors = [*logits_processors, *held]
        return cls(sampler, logits_processors, constraint, sampling.max_tokens)


class _Meter:
    """The running statistics of one `stream_generate` call, as responses."""

    def __init__(self, ids: list[int], reused: int, stats: LookupStats, start: float):
        self.ids, self.reused, self.stats = ids, reused, stats
        self.start = self.first = start  # `first`: when the first token arrived (prefill ends)
        self.generated: list[int] = []
        self.read = 0  # prompt ids prefilled so far (the prefill's progress counts them)

    def response(
        self, piece: str, token: int | None, finish: str | None, logprobs: mx.array | None = None
    ) -> GenerationResponse:
        prompt_time, decode_time = self.first - self.start, time.perf_counter() - self.first
        n = len(self.generated)
        prefilled = len(self.ids) - self.reused if n else self.read
        return GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=len(self.ids),
            prompt_tps=prefilled / prompt_time if prompt_time > 0 else 0.0,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            time_to_first_token=prompt_time,
            finish_reason=finish,
            cached_tokens=self.reused,
            prefill_tokens=prefilled,
            lookup=replace(self.stats),
            logprobs=logprobs,
        )


def _choose_step(
    kwargs: dict[str, Any], cancel: Cancel | None, meter: _Meter
) -> Callable[..., Generator]:
    """The step to run (`generate_step`, or prompt lookup's when asked), taking its options out
    of `kwargs`; between prefill chunks, the ids read are counted and `cancel` checked."""
    kwargs["prompt_progress"] = partial(_check, cancel, meter, kwargs.get("prompt_progress"))
    lookup = {k: kwargs.pop(k) for k in ("prompt_lookup", "prompt_lookup_ngram") if k in kwargs}
    if lookup.get("prompt_lookup"):
        from .lookup import lookup_generate_step

        return partial(lookup_generate_step, **lookup)
    return generate_step


def _check(
    cancel: Cancel | None,
    meter: _Meter,
    progress: Callable[[int, int], None] | None,
    done: int,
    total: int,
) -> None:
    meter.read = done
    if progress is not None:
        progress(done, total)
    if cancel is not None and cancel.is_set() and done < total:
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
