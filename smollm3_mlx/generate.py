"""Generation in three layers: generate_step (token ids) -> stream_generate (responses) -> generate.

Nothing here prints; callers render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import Cache
from .sample import LogitsProcessor, Sampler, greedy, make_logits_processors, make_sampler

DEFAULT_MAX_TOKENS = 4096  # reasoning traces run to thousands of tokens
DEFAULT_PREFILL_STEP = 512


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
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) pairs; the next step is queued before the current one is returned.

    Args:
        prompt: 1-D array of token ids (only the ids not yet in `prompt_cache`).
        model: the model.
        max_tokens: how many tokens to generate (-1 for no limit).
        sampler: logprobs -> token; greedy by default.
        logits_processors: (tokens so far, logits) -> logits, applied in order.
        prompt_cache: per-layer caches, updated in place; a fresh one when None.
        prefill_step_size: the prompt is processed in chunks of this many tokens.
        prompt_progress: called as (processed, total) during prefill.
        max_kv_size, keep: for a new cache, rotate within this many tokens, never dropping the
            first `keep` (see `KVCache`).
        kv_bits, kv_group_size, quantized_kv_start: for a new cache, quantize keys and values
            to 4 or 8 bits once it holds `quantized_kv_start` tokens.
    """
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    if prompt_cache is None:
        prompt_cache = model.make_cache(
            max_kv_size, keep, bits=kv_bits, group_size=kv_group_size,
            quantize_after=quantized_kv_start,
        )  # fmt: skip
    cache = prompt_cache
    window = getattr(cache[0], "max_size", None)
    if window is not None:  # a prefill chunk must fit beside the kept tokens
        prefill_step_size = min(prefill_step_size, window - cache[0].keep)
    sampler = sampler or greedy
    tokens = prompt if logits_processors else None
    progress = prompt_progress or (lambda *_: None)

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = model(inputs[None], cache=cache)[:, -1, :]
        if logits_processors:
            for processor in logits_processors:
                logits = processor(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, y])
        return y, logprobs.squeeze(0)

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
        if n + 1 != max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        if n == 0:
            mx.eval(y)
            progress(total, total)
        yield y.item(), logprobs
        if n % 256 == 255:
            mx.clear_cache()
        if n + 1 != max_tokens:
            y, logprobs = next_y, next_logprobs
        n += 1


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
    finish_reason: str | None = None  # "stop" (end of turn or stop string), "length"


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
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    stop_strings: Sequence[str] = (),
    prompt_cache: list[Cache] | None = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream text as it is generated, stopping at an end-of-turn token or a stop string.

    Args:
        model, tokenizer: as returned by `load`.
        prompt: text (encoded as is, control tokens allowed) or token ids.
        max_tokens: the most tokens to generate.
        sampler: from `make_sampler`; the model folder's generation_config.json by default.
        logits_processors: from `make_logits_processors`; the folder's repetition penalty by
            default.
        stop_strings: generation ends before the first of these appears in the text.
        prompt_cache: per-layer caches to extend (for multi-turn reuse).
        **kwargs: passed to `generate_step` (prefill_step_size, prompt_progress).
    """
    defaults = getattr(model, "generation_config", None)
    if sampler is None:
        sampler = (
            make_sampler(defaults.temperature, defaults.top_p, defaults.top_k, defaults.min_p)
            if defaults
            else greedy
        )
    if logits_processors is None:
        logits_processors = make_logits_processors(defaults.repetition_penalty) if defaults else []
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, allow_special=True)
    prompt = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.uint32)
    context = getattr(model, "max_context", None)
    rotating = kwargs.get("max_kv_size") or getattr((prompt_cache or [None])[0], "max_size", None)
    if context and not rotating:
        used = prompt.size + (prompt_cache[0].offset if prompt_cache else 0)
        if used >= context:
            raise ValueError(
                f"the prompt needs {used} tokens of context, more than the {context} allowed "
                "(raise max_context, up to 131072 with YaRN)"
            )
        max_tokens = min(max_tokens, context - used) if max_tokens >= 0 else context - used

    detokenizer = tokenizer.detokenizer()
    eos = tokenizer.eos_token_ids
    pending = ""  # decoded text not yet sent, held while it may begin a stop string
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = start  # when the first token arrived: prefill ends there
    n = 0

    def response(text: str, token: int | None, finish: str | None) -> GenerationResponse:
        prompt_time, decode_time = first - start, time.perf_counter() - first
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=prompt.size,
            prompt_tps=prompt.size / prompt_time if prompt_time > 0 else 0.0,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            time_to_first_token=prompt_time,
            finish_reason=finish,
        )

    finish = "length"
    token = None
    for token, _ in generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        **kwargs,
    ):
        if n == 0:
            first = time.perf_counter()
        n += 1
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

    detokenizer.finalize()
    if finish == "length":
        pending += detokenizer.last_segment
        if stop_strings and (i := _stop_index(pending, stop_strings)) >= 0:
            pending, finish = pending[:i], "stop"
    yield response(pending, token if finish == "length" else None, finish)


def generate(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as a string; see `stream_generate` for the options."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
