"""The generation worker behind the server: one thread runs MLX, one request at a time.

Requests wait in a bounded queue (beyond it, `Busy`). Each runs on a prompt cache taken from an
LRU of prefix caches bounded in bytes, so a follow-up turn prefills only its new tokens, and goes
back into it afterwards, however the request ended. A set `cancel` event stops a request within
one step (during the prefill, after the current chunk). Results go to the request through its `emit`
callback, called on the worker thread.
"""

from __future__ import annotations

import math
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..cache import KVSettings, PromptCache, is_prefix, longest_shared
from ..generate import stream_generate
from ..sample import Sampling
from .cache_dir import DEFAULT_DIR_BYTES, CacheDir

DEFAULT_QUEUE = 8
DEFAULT_CACHE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int  # of them, reused from a cached prefix


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # the most likely ids and their logprobs


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of turn), "length" or "cancelled"


@dataclass(frozen=True)
class Failed:
    error: BaseException


Item = Started | Token | Finished | Failed


@dataclass
class Job:
    """One request's generation.

    Args:
        prompt: all the prompt's ids (the cached prefix is found here).
        max_tokens: the most ids to generate; None: up to the end of the context.
        sampling: the request's sampling (its seed None: a fresh one is drawn).
        top_logprobs: None: no logprobs; else the count of alternatives per token.
        processors: extra logits processors (constrained decoding).
        emit: receives the items, on the worker thread.
    """

    prompt: list[int]
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    top_logprobs: int | None = None
    processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = ()
    emit: Callable[[Item], None] = lambda item: None
    cancel: threading.Event = field(default_factory=threading.Event)


class Busy(RuntimeError):
    """The queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class WarmUpError(RuntimeError):
    """The model failed the engine's warm-up step (see `Engine.start`)."""


@dataclass(frozen=True)
class Record:
    """How a finished request went (the last few are kept, for logs and tests)."""

    prompt_tokens: int
    cached_tokens: int
    generated: int
    reason: str
    seconds: float


class PromptCacheLRU:
    """Prefix caches kept across requests, keyed by the ids they hold, bounded in bytes.

    `take` hands out the cache sharing the longest prefix with a prompt: the cache itself when
    all it holds is a prefix of the prompt (a follow-up turn), else a copy (the original stays,
    for the conversation it belongs to). `put` stores a cache after its request, dropping the
    caches it extends and then the least recently used ones until the total fits.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: list[PromptCache] = []  # least recently used first

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries)

    def take(self, prompt: Sequence[int]) -> PromptCache | None:
        best, n = longest_shared(self.entries, lambda c: c.ids, prompt)
        if best is None:
            return None
        if n == len(best.ids):
            self.entries.remove(best)
            return best
        return best.copy()

    def put(self, cache: PromptCache) -> None:
        ids = cache.ids
        self.entries = [c for c in self.entries if not is_prefix(c.ids, ids)]
        self.entries.append(cache)
        total = self.nbytes
        while self.entries and total > self.max_bytes:
            total -= self.entries.pop(0).nbytes

    def clear(self) -> None:
        self.entries = []


class Engine:
    """Runs jobs one at a time on a thread of its own (start / stop around the server's life).

    Args:
        model, tokenizer: as `load` returns them.
        queue_size: how many requests may wait while one runs; more get `Busy`.
        cache_bytes: the prompt-cache LRU's budget.
        kv_bits: quantize the KV cache to 4 or 8 bits (None: dense).
        cache_dir: a folder where prompt caches persist across restarts (None: memory only).
        cache_dir_bytes: that folder's budget.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        queue_size: int = DEFAULT_QUEUE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        kv_bits: int | None = None,
        cache_dir=None,
        cache_dir_bytes: int = DEFAULT_DIR_BYTES,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.context: int = model.max_context
        self.kv = KVSettings(bits=kv_bits)
        self.lru = PromptCacheLRU(cache_bytes)
        self.disk = None if cache_dir is None else CacheDir(
            cache_dir, model, tokenizer, kv=self.kv, max_bytes=cache_dir_bytes
        )  # fmt: skip
        self.records: deque[Record] = deque(maxlen=64)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max(queue_size, 0) or 1)
        self._queue_size = queue_size
        self._current: Job | None = None
        self._closed = False
        self._mean_seconds = 1.0
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def start(self) -> None:
        """Start the worker thread (if it is not running); returns once it has warmed up (see
        `_warm_up`).

        Raises:
            WarmUpError: the model failed its warm-up step (the worker is gone).
        """
        self._closed = False
        if self._thread is not None:
            return
        warmed: list[BaseException | None] = []
        ready, cancel = threading.Event(), threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(warmed, ready, cancel), name="smollm3-engine", daemon=True
        )
        self._thread.start()
        try:
            ready.wait()
        except BaseException:  # Ctrl-C while it warms up: the worker ends (MLX asks it) first
            cancel.set()
            self.stop()
            raise
        if warmed != [None]:
            self._thread.join()
            self._thread = None
            error = warmed[0]
            raise WarmUpError(f"the model failed its warm-up step: {error}") from error

    def close(self) -> None:
        """Take no more jobs; cancel the running one and those waiting (the thread stays)."""
        self._closed = True
        if self._current is not None:
            self._current.cancel.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(Finished("cancelled"))

    def stop(self) -> None:
        """Close, and end the worker thread."""
        self.close()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise Busy when the queue is full."""
        if self._closed or (self._queue_size == 0 and self.busy):
            raise Busy(self._retry_after())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy(self._retry_after()) from None

    def _retry_after(self) -> int:
        return max(1, math.ceil((self.waiting + 1) * self._mean_seconds))

    def _run(
        self, warmed: list[BaseException | None], ready: threading.Event, cancel: threading.Event
    ) -> None:
        try:
            try:
                self._warm_up(cancel)
                warmed.append(None)
            except BaseException as e:
                warmed.append(e)
                return
            finally:
                ready.set()
            while (job := self._jobs.get()) is not None:
                if job.cancel.is_set():  # its client left while it waited
                    self.records.append(Record(len(job.prompt), 0, 0, "cancelled", 0.0))
                    job.emit(Finished("cancelled"))
                    continue
                self._current = job
                if self._closed:  # close() ran between the get and the line above: it missed us
                    job.cancel.set()
                start = time.perf_counter()
                try:
                    self._generate(job)
                except Exception as e:  # the request fails; the server goes on
                    job.emit(Failed(e))
                finally:
                    self._current = None
                    mx.clear_cache()  # what the request used goes back; the LRU's caches stay
                seconds = time.perf_counter() - start
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        finally:
            mx.clear_streams()  # MLX asks a thread that ran MLX work to free its streams

    def _warm_up(self, cancel: threading.Event) -> None:
        """A three-token prompt and two generated tokens, with the model's own sampling, before
        the first request: MLX builds its kernels now rather than in that request. On the CPU
        backend it builds them with g++ through system(), which ignores Ctrl-C while it runs, so
        a first request's build could swallow the Ctrl-C that should stop the server."""
        cache = PromptCache.new(self.model, kv=self.kv)
        prompt = self.tokenizer.encode("Hello there, friend")[:3]  # a prefill of more than one
        sampling = Sampling.from_model(self.model)
        for _ in stream_generate(self.model, self.tokenizer, prompt, max_tokens=2,
                                 sampling=sampling, prompt_cache=cache, cancel=cancel):  # fmt: skip
            pass
        mx.clear_cache()

    def _generate(self, job: Job) -> None:
        prompt = job.prompt
        cache = self.lru.take(prompt)
        if cache is None and self.disk is not None:
            cache = self.disk.take(prompt)
        cache = cache or PromptCache.new(self.model, kv=self.kv)
        max_tokens = -1 if job.max_tokens is None else job.max_tokens  # cut to the room there
        responses = _responses(self.model, self.tokenizer, cache, job, max_tokens)
        reason, cached, generated, started = "cancelled", 0, 0, False
        start = time.perf_counter()
        try:
            for r in responses:
                if not started:  # the cache was reused and the prompt prefilled
                    started, cached = True, r.cached_tokens
                    job.emit(Started(len(prompt), cached))
                if r.finish_reason is not None:  # its token, if any, came already
                    reason = r.finish_reason
                    break
                generated += 1
                job.emit(_token(r.token, r.logprobs, job.top_logprobs))
        finally:
            responses.close()  # the cache settles, however the request ended
            if self.disk is not None:
                self.disk.put(cache)
            self.lru.put(cache)
        seconds = time.perf_counter() - start
        self.records.append(Record(len(prompt), cached, generated, reason, seconds))
        job.emit(Finished(reason))


def _responses(model, tokenizer, cache, job: Job, max_tokens: int):
    """`stream_generate` for `job`: the one adapter to the generation core."""
    sampling = job.sampling
    if sampling.seed is None:  # else the last request's seed would go on
        sampling = sampling.updated(seed=secrets.randbits(63))
    processors = [*sampling.logits_processors(), *job.processors]
    return stream_generate(
        model,
        tokenizer,
        job.prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        logits_processors=processors,
        prompt_cache=cache,
        cancel=job.cancel,  # checked between prefill chunks too
    )


def _token(token: int, logprobs: mx.array | None, top: int | None) -> Token:
    """The token, with its log-probability and the `top` most likely when logprobs are asked."""
    if logprobs is None or top is None:
        return Token(token)
    chosen = logprobs[token].item()
    if not top:
        return Token(token, chosen)
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    pairs = sorted(zip(ids.tolist(), logprobs[ids].tolist(), strict=True), key=lambda p: -p[1])
    return Token(token, chosen, tuple(pairs))
