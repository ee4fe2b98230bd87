"""The generation worker behind the server: one thread runs MLX, a batch of requests at a time.

Requests join the running batch between decode steps (batch.py), up to `max_batch` rows (by
default the largest batch the memory estimate allows); beyond it they wait in a bounded queue,
and beyond the queue `Busy`. A joining prompt is prefilled one chunk per step, so no running
answer stalls for more than one chunk. Each request runs on a prompt cache taken from an LRU of
prefix caches bounded in bytes, so a follow-up turn prefills only its new tokens, and goes back
into it afterwards, however the request ended. A set `cancel` event takes a request out at the
next step. Results go to the request through its `emit` callback, called on the worker thread.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..batch import BatchGenerator
from ..cache import KVSettings, PromptCache, is_prefix, longest_shared
from ..generate import GenerationResponse
from ..sample import Sampling
from .cache_dir import DEFAULT_DIR_BYTES, CacheDir

DEFAULT_QUEUE = 8
DEFAULT_CACHE_BYTES = 2 * 1024**3
MOST_ROWS = 64  # the default batch never goes past this, however much memory there is


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


@dataclass
class _Running:
    """A job in the batch: its cache (back to the LRU when it ends) and its counts."""

    job: Job
    cache: PromptCache
    start: float = field(default_factory=time.perf_counter)
    cached: int | None = None  # set when its first response (the end of its prefill) came
    generated: int = 0


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


def default_max_batch(model, kv_bits: int | None = None) -> int:
    """The largest batch the memory estimate allows on this machine: the weights, each row's KV
    cache at the model's whole context, and the activations (memory.py); at least 1, at most
    `MOST_ROWS`."""
    from mlx.utils import tree_flatten

    from ..memory import available_memory, estimate, largest_batch

    args = model.args
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    context = model.max_context or args.max_position_embeddings
    dtype = model.model.norm.weight.dtype  # the compute dtype: norms are never quantized
    est = estimate(args, weights, context=context, kv_bits=kv_bits, dtype=dtype)
    budget, _ = available_memory()
    return largest_batch(est, budget, most=MOST_ROWS) if budget > 0 else 1


class Engine:
    """Runs jobs in a batch on a thread of its own (start / stop around the server's life).

    Args:
        model, tokenizer: as `load` returns them.
        queue_size: how many requests may wait while the batch is full; more get `Busy`.
        cache_bytes: the prompt-cache LRU's budget.
        kv_bits: quantize the KV cache to 4 or 8 bits (None: dense).
        cache_dir: a folder where prompt caches persist across restarts (None: memory only).
        cache_dir_bytes: that folder's budget.
        max_batch: the most requests decoded together; None: `default_max_batch`.
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
        max_batch: int | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.context: int = model.max_context
        self.kv = KVSettings(bits=kv_bits)
        self.max_batch = max_batch or default_max_batch(model, kv_bits)
        self.lru = PromptCacheLRU(cache_bytes)
        self.disk = None if cache_dir is None else CacheDir(
            cache_dir, model, tokenizer, kv=self.kv, max_bytes=cache_dir_bytes
        )  # fmt: skip
        self.records: deque[Record] = deque(maxlen=64)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max(queue_size, 0) or 1)
        self._queue_size = queue_size
        self._running: dict[int, _Running] = {}
        self._taking = False  # a job is between the queue and the batch
        self._closed = False
        self._mean_seconds = 1.0
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return bool(self._running) or self._taking

    @property
    def running(self) -> int:
        """Requests in the batch now (prefilling or decoding)."""
        return len(self._running)

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
        """Take no more jobs; cancel the running ones and those waiting (the thread stays)."""
        self._closed = True
        for r in list(self._running.values()):
            r.job.cancel.set()
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
        full = len(self._running) >= self.max_batch
        if self._closed or (self._queue_size == 0 and full):
            raise Busy(self._retry_after())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy(self._retry_after()) from None

    def _retry_after(self) -> int:
        per_row = self._mean_seconds / max(1, min(self.max_batch, len(self._running)))
        return max(1, math.ceil((self.waiting + 1) * per_row))

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
            self._serve(BatchGenerator(self.model, self.tokenizer, max_batch=self.max_batch))
        finally:
            mx.clear_streams()  # MLX asks a thread that ran MLX work to free its streams

    def _serve(self, gen: BatchGenerator) -> None:
        """Steps the batch, taking jobs in between, until `stop`."""
        try:
            while self._take(gen):
                for uid, response in gen.step():
                    self._route(uid, response)
                if not self._running:
                    mx.clear_cache()  # what the requests used goes back; the LRU's caches stay
        finally:
            for uid in list(self._running):  # the thread ends: no request is left hanging
                self._route(uid, gen.remove(uid))

    def _take(self, gen: BatchGenerator) -> bool:
        """Move waiting jobs into the batch while it has room (waiting for one when nothing
        runs); False once the engine stops."""
        while len(self._running) < self.max_batch:
            try:
                job = self._jobs.get() if not self._running else self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._taking = True  # busy, though not yet in the batch
            try:
                self._join(gen, job)
            finally:
                self._taking = False
        return True

    def _join(self, gen: BatchGenerator, job: Job) -> None:
        if self._closed:  # close() ran between the get and now: it missed this job
            job.cancel.set()
        if job.cancel.is_set():  # its client left while it waited
            self.records.append(Record(len(job.prompt), 0, 0, "cancelled", 0.0))
            job.emit(Finished("cancelled"))
            return
        cache = self.lru.take(job.prompt)
        if cache is None and self.disk is not None:
            cache = self.disk.take(job.prompt)
        cache = cache or PromptCache.new(self.model, kv=self.kv)
        max_tokens = -1 if job.max_tokens is None else job.max_tokens  # cut to the room there
        try:
            uid = gen.insert(
                job.prompt,
                max_tokens=max_tokens,
                sampling=job.sampling,
                logits_processors=[*job.sampling.logits_processors(), *job.processors],
                prompt_cache=cache,
                cancel=job.cancel,
            )
        except Exception as e:  # this request fails; the server goes on
            self.lru.put(cache)
            job.emit(Failed(e))
            return
        self._running[uid] = _Running(job, cache)
        if self._closed:  # close() ran while it joined: the batch drops it at the next step
            job.cancel.set()

    def _route(self, uid: int, response: GenerationResponse | Exception | None) -> None:
        """One response of the batch, to its job: Started with the first, a Token each, and
        Finished (or Failed) with the last, once the cache is back in the LRU."""
        r = self._running[uid]
        job = r.job
        if isinstance(response, GenerationResponse) and r.cached is None:
            r.cached = response.cached_tokens  # the cache was reused and the prompt prefilled
            job.emit(Started(len(job.prompt), r.cached))
        if isinstance(response, GenerationResponse) and response.finish_reason is None:
            r.generated += 1
            job.emit(_token(response.token, response.logprobs, job.top_logprobs))
            return
        del self._running[uid]
        if self.disk is not None:
            self.disk.put(r.cache)
        self.lru.put(r.cache)
        seconds = time.perf_counter() - r.start
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds
        if not isinstance(response, GenerationResponse):
            job.emit(Failed(response or RuntimeError("the engine stopped")))
            return
        reason = response.finish_reason
        self.records.append(Record(len(job.prompt), r.cached or 0, r.generated, reason, seconds))
        job.emit(Finished(reason))

    def _warm_up(self, cancel: threading.Event) -> None:
        """Two rows of a three-token prompt and two generated tokens each, with the model's own
        sampling, before the first request: MLX builds its kernels now rather than in that
        request. On the CPU backend it builds them with g++ through system(), which ignores
        Ctrl-C while it runs, so a first request's build could swallow the Ctrl-C that should
        stop the server."""
        prompt = self.tokenizer.encode("Hello there, friend")[:3]  # a prefill of more than one
        gen = BatchGenerator(self.model, self.tokenizer, max_batch=2)
        sampling = Sampling.from_model(self.model)
        for _ in range(2):
            gen.insert(prompt, max_tokens=2, sampling=sampling, cancel=cancel,
                       prompt_cache=PromptCache.new(self.model, kv=self.kv))  # fmt: skip
        while len(gen):
            for _, response in gen.step():
                if isinstance(response, Exception):
                    raise response
        mx.clear_cache()


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
