"""Measure generation speed: prefill and decode tokens per second, first token, peak memory.

Every runtime is timed on the same clock from outside its `stream_generate`, on the same random
prompt, greedy with end of sequence masked (so that every run generates all its tokens, and the
runtimes do the same work), and the runs alternate between runtimes so that other load on the
machine falls on all of them alike. Nothing here prints.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

# prompt, max_tokens -> responses with a `generation_tokens` field (ours and mlx-lm's alike)
Stream = Callable[[mx.array, int], Iterable]
PROMPT_VOCAB = 128000  # SmolLM3's ordinary tokens; the control tokens start at 128000


@dataclass
class Runner:
    """One runtime to time: a name, what it computes in, its stream and its model."""

    name: str
    dtype: str
    stream: Stream
    model: object
    before: Callable[[], None] | None = None  # called before each run (e.g. to swap weights)
    # Waits for work queued but not needed (mlx-lm queues a step past the last token), untimed,
    # so that it cannot slow the next run, of this runtime or another.
    sync: Callable[[], None] = mx.synchronize


@dataclass(frozen=True)
class BenchResult:
    """Medians over `runs` runs of one runtime on one prompt length."""

    runtime: str
    dtype: str
    prompt_tokens: int
    generation_tokens: int  # generated in each run: all that were asked for (EOS is never chosen)
    runs: int
    prefill_tps: float  # prompt tokens / the time of a run generating one token
    decode_tps: float  # the further tokens / the further time a longer run takes
    time_to_first_token: float  # seconds until the first token reaches the caller
    peak_memory: float  # GB: the model's weights plus the most memory the run added


@dataclass(frozen=True)
class RunReport:
    """One timed run, reported as soon as it ends (so that a long benchmark shows its progress)."""

    done: int  # timed runs finished, this one included
    total: int
    runtime: str
    prefill_tps: float
    decode_tps: float  # 0.0 when only the prefill was timed


def default_sizes(device: mx.Device | None = None) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, runs) that take minutes, not hours, on this backend.

    MLX's CPU backend runs the 3B model at about 0.5 tok/s, prefill and decode alike
    (BENCHMARKS.md): the GPU sizes, 512 + 128 tokens three times, would take about two hours
    there; 8 + 4 tokens twice take about a minute and a half.
    """
    device = device or mx.default_device()
    return (512, 128, 3) if device.type == mx.gpu else (8, 4, 2)


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def random_prompt(n: int, seed: int = 0) -> mx.array:
    return mx.random.randint(0, PROMPT_VOCAB, (n,), key=mx.random.key(seed)).astype(mx.uint32)


def greedy_past_eos(eos_ids: Iterable[int]) -> Callable[[mx.array], mx.array]:
    """Greedy, never choosing an end-of-sequence id: a run generates every token it was asked
    for, whatever the prompt (a random one can make a model end its answer at once)."""
    ids = sorted(eos_ids)
    masks: dict[int, mx.array] = {}

    def sample(logprobs: mx.array) -> mx.array:
        n = logprobs.shape[-1]
        if n not in masks:
            mask = mx.zeros((n,), dtype=logprobs.dtype)
            inside = [i for i in ids if i < n]
            if inside:
                mask[mx.array(inside)] = -mx.inf
            masks[n] = mask
        return mx.argmax(logprobs + masks[n], axis=-1)

    return sample


def _floating(v: mx.array) -> bool:
    return mx.issubdtype(v.dtype, mx.floating)


def _dtype_name(model) -> str:
    floats = {v.dtype for _, v in tree_flatten(model.parameters()) if _floating(v)}
    return "/".join(sorted(str(d).removeprefix("mlx.core.") for d in floats))


def _run(runner: Runner, prompt: mx.array, max_tokens: int) -> tuple[float, float, int, float]:
    """(seconds to the first token, seconds to the end, tokens generated, peak GB) of one run."""
    if runner.before:
        runner.before()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start, first, last = time.perf_counter(), None, None
    for last in runner.stream(prompt, max_tokens):  # noqa: B007
        first = first or time.perf_counter()
    end = time.perf_counter()
    runner.sync()
    peak = (nbytes(runner.model) + mx.get_peak_memory() - base) / 1e9
    return first - start, end - start, last.generation_tokens, peak


def bench(
    runners: list[Runner],
    *,
    prompt_tokens: int = 512,
    generation_tokens: int = 128,
    runs: int = 3,
    seed: int = 0,
    warmup: bool = True,
    on_run: Callable[[RunReport], None] | None = None,
) -> list[BenchResult]:
    """Time each runner `runs` times (alternating, after one untimed warm-up) on a random prompt.

    Each run is a pair: the prompt with one token generated (the prefill: its time is the whole
    run), then with `generation_tokens`; decode speed is the extra tokens over the extra time.
    Timing whole runs makes it independent of when a runtime hands each token over (one that
    streams a token only once the next one is computed gains nothing from it).

    Args:
        runners: from `smollm3_runner` and `mlx_lm_runners`.
        prompt_tokens: the prompt's length (random ordinary tokens).
        generation_tokens: tokens to generate, greedy; 1 measures the prefill alone.
        runs: timed runs of each runner; the result holds their medians.
        seed: of the random prompt.
        warmup: first run each runner once, untimed, on one token (first-call allocations).
        on_run: called after each timed run of a runner (both of its passes) with its numbers.
    """
    prompt = random_prompt(prompt_tokens, seed)
    for runner in runners if warmup else ():
        _run(runner, prompt[:1], 1)
    timings: dict[str, list[tuple]] = {r.name: [] for r in runners}
    for _ in range(runs):
        for runner in runners:
            _, prefill, _, peak = _run(runner, prompt, 1)
            first, end, n = prefill, prefill, 1
            if generation_tokens > 1:
                first, end, n, peak2 = _run(runner, prompt, generation_tokens)
                peak = max(peak, peak2)
            decode = _decode_tps(n, prefill, first, end)
            timings[runner.name].append((prefill, first, decode, n, peak))
            if on_run:
                done = sum(map(len, timings.values()))
                total = runs * len(runners)
                on_run(RunReport(done, total, runner.name, prompt_tokens / prefill, decode))
    results = []
    for runner in runners:
        prefill, first, decode, n, peak = zip(*timings[runner.name], strict=True)
        results.append(
            BenchResult(
                runtime=runner.name,
                dtype=runner.dtype,
                prompt_tokens=prompt_tokens,
                generation_tokens=min(n),
                runs=runs,
                prefill_tps=prompt_tokens / statistics.median(prefill),
                decode_tps=statistics.median(decode),
                time_to_first_token=statistics.median(first),
                peak_memory=max(peak),
            )
        )
    return results


def _decode_tps(n: int, prefill: float, first: float, end: float) -> float:
    """The further tokens of a run over the further time it took past the prefill run; where
    noise hides that difference (a loaded machine, a tiny model: the longer run took no longer),
    over its own time after its first token, so that a run of n > 1 tokens always has a figure."""
    if n <= 1:
        return 0.0
    extra = end - prefill if end > prefill else end - first
    return (n - 1) / extra if extra > 0 else 0.0


def smollm3_runner(model, tokenizer, name: str = "smollm3-mlx") -> Runner:
    """Our `stream_generate`, greedy past end of sequence, no repetition penalty."""
    from .generate import stream_generate

    sampler = greedy_past_eos(tokenizer.eos_token_ids)

    def stream(prompt: mx.array, max_tokens: int) -> Iterator:
        return stream_generate(
            model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=[]
        )

    return Runner(name, _dtype_name(model), stream, model)


def mlx_lm_runners(path: str | Path, dtypes: Iterable[mx.Dtype | None] = (None,)) -> list[Runner]:
    """mlx-lm's `stream_generate` on the same folder, greedy past end of sequence as ours, one
    model loaded.

    Args:
        path: the model folder.
        dtypes: one runner per entry; None is mlx-lm as it runs by default (computing in the
            stored dtype), a dtype casts the floating-point parameters (scales, biases, norms),
            which makes it compute in that dtype. The casts are swapped in before each run.
    """
    from mlx_lm import load
    from mlx_lm.generate import generation_stream, stream_generate

    model, tokenizer = load(str(path))
    mx.eval(model.parameters())
    stored = model.parameters()

    sampler = greedy_past_eos(tokenizer.eos_token_ids)

    def stream(prompt: mx.array, max_tokens: int) -> Iterator:
        return stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)

    runners: list[Runner] = []
    for dtype in dtypes:
        params = stored
        if dtype is not None:
            params = tree_map(lambda v, d=dtype: v.astype(d) if _floating(v) else v, stored)
        model.update(params)
        if any(r.dtype == _dtype_name(model) for r in runners):
            continue  # the cast changes nothing: the default already computes in it
        mx.eval(params)
        name = "mlx-lm" if dtype is None else f"mlx-lm {_dtype_name(model)}"
        swap = lambda p=params: model.update(p)  # noqa: E731
        sync = lambda: mx.synchronize(generation_stream)  # noqa: E731
        runners.append(Runner(name, _dtype_name(model), stream, model, swap, sync))
    return runners
