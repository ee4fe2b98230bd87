"""What every step shares: the Decoder (one forward pass, sampler, processors), prefill in chunks,
and the plain step `generate_step`. `generate` and `lookup` both build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .cache import PromptCache
from .model import Model, ModelArgs
from .sample import DEFAULT_MAX_TOKENS, LogitsProcessor, Sampler, greedy

DEFAULT_PREFILL_STEP = 512
# On the CPU a chunk of the prompt costs about as much per token as single steps (BENCHMARKS.md),
# so chunks there are sized to a few tokens of SmolLM3-3B: Ctrl-C acts within seconds.
CPU_PREFILL_WORK = 4 * 3.04e9  # tokens x parameters per chunk: 4 tokens of the 3B (3.04e9 below)


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
        prompt_cache: PromptCache,
        sampler: Sampler,
        logits_processors: Sequence[LogitsProcessor],
        tokens: mx.array,
        stats: LookupStats,
    ):
        self.model, self.prompt_cache, self.sampler = model, prompt_cache, sampler
        self.cache = prompt_cache.layers  # what the model's forward pass takes
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
    """Prompt tokens per forward chunk on this device (`prefill_step_for`; 512 for a model that
    is not ours, e.g. a wrapper: its size is unknown)."""
    if not isinstance(model, Model):
        return DEFAULT_PREFILL_STEP
    return prefill_step_for(model.args, gpu=mx.default_device().type == mx.gpu)


def prefill_step_for(args: ModelArgs, *, gpu: bool) -> int:
    """Prompt tokens per forward chunk for a model of `args`: 512 on a GPU; on the CPU, what
    makes a chunk short (the memory estimate counts the same chunk)."""
    if gpu:
        return DEFAULT_PREFILL_STEP
    a = args
    params = a.num_hidden_layers * (4 * a.hidden_size**2 + 3 * a.hidden_size * a.intermediate_size)
    return max(1, min(DEFAULT_PREFILL_STEP, int(CPU_PREFILL_WORK / params)))


@dataclass(frozen=True)
class StepOptions:
    """What `generate_step` and `lookup_generate_step` take beside the prompt and max_tokens.

    Args:
        sampler: logprobs -> token; greedy by default.
        logits_processors: (tokens so far, logits) -> logits, applied in order; the tokens
            are `context`, the prompt and the ids generated.
        prompt_cache: the PromptCache, its layers updated in place (the caller settles its ids);
            a fresh growing one when None.
        prefill_step_size: the prompt is processed in chunks of this many tokens
            (`default_prefill_step`: short chunks on the CPU).
        prompt_progress: called as (processed, total) during prefill.
        lookup_stats: the forward passes (and prompt lookup's drafts) are added to its counts.
        context: the ids already in `prompt_cache`, before the prompt (a chat's earlier turns):
            the logits processors see them, and prompt lookup drafts from them too.
    """

    sampler: Sampler | None = None
    logits_processors: Sequence[LogitsProcessor] = ()
    prompt_cache: PromptCache | None = None
    prefill_step_size: int | None = None
    prompt_progress: Callable[[int, int], None] | None = None
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
    pc = o.prompt_cache if o.prompt_cache is not None else PromptCache.new(model)
    tokens = prompt
    if o.context and o.logits_processors:  # they see every id so far, the cached ones included
        tokens = mx.concatenate([mx.array(list(o.context), dtype=prompt.dtype), prompt])
    stats = o.lookup_stats if o.lookup_stats is not None else LookupStats()
    decoder = Decoder(model, pc, o.sampler or greedy, o.logits_processors, tokens, stats)
    progress = o.prompt_progress or (lambda *_: None)
    total = prompt.size
    progress(0, total)
    step_size = o.prefill_step_size or default_prefill_step(model)
    _run_chunks(model, pc, prompt, total - 1, step_size, progress)  # the last goes to decoding
    return decoder, prompt[total - 1 :], lambda: progress(total, total)


def prefill_cache(model, pc: PromptCache, ids: list[int], *, step_size: int | None = None) -> None:
    """Put `ids` in `pc` without generating: reuse what it holds, run the rest in chunks, settle."""
    done = pc.reuse(ids)
    rest = mx.array(ids[done:])
    _run_chunks(model, pc, rest, rest.size, step_size or default_prefill_step(model))
    pc.settle(ids)


def _run_chunks(
    model,
    pc: PromptCache,
    prompt: mx.array,
    stop: int,
    step_size: int,
    progress: Callable[[int, int], None] = lambda *_: None,
) -> None:
    """Run `prompt[:stop]` through the model in chunks, evaluating the cache after each to bound
    memory; `progress` gets (processed, prompt.size)."""
    if pc.window is not None:  # a prefill chunk must fit beside the kept tokens
        step_size = min(step_size, pc.window - pc.keep)
    cache = pc.layers
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
