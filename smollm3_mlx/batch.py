"""Continuous batching: many requests decoded together, each exactly as it would run alone.

`BatchGenerator` holds rows (requests). Each `step()` runs one prefill chunk of the oldest row
still prefilling, then one forward pass for every decoding row, and returns the responses of that
step: the same `GenerationResponse`s `stream_generate` yields, row by row. Rows join between steps
and leave as soon as they finish or are cancelled. A row keeps its own sampler (its own random
stream when seeded: `make_sampler(seed=...)`), logits processors (repetition penalty, response
format, tool grammars, thinking budgets), stop strings, logprobs, usage and `cached_tokens`.

One identity rule: a row's tokens do not depend on what else runs. Each row is prefilled alone,
in the chunks `stream_generate` uses; in a batched step its attention reads only its own cache
(batch_cache.py) and its logits are processed and sampled alone. The projections and the MLP run
for all rows at once; MLX's CPU backend computes each row of a matmul the same at any batch
size (tested), so on the CPU a row's logits are bit-identical alone and batched. A GPU kernel may
sum in another order at another batch size: there the logits agree to float rounding (bounded in
the tests on the CPU side only), and a greedy tie could break differently.

Prompt lookup is off in a batch: a row's draft would make its step longer than the others'.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .batch_cache import BatchCache
from .cache import PromptCache
from .generate import GREEDY, Cancel, GenerationResponse, _fit_context, _TextStream
from .sample import LogitsProcessor, Sampler, Sampling, make_sampler
from .step import LookupStats, default_prefill_step

DEFAULT_MAX_BATCH = 8


@dataclass
class _Row:
    """One request in the batch: its ids, cache, sampling and where it stands."""

    uid: int
    ids: list[int]
    cache: PromptCache
    reused: int
    max_tokens: int
    sampler: Sampler
    processors: list[LogitsProcessor]
    text: _TextStream
    cancel: Cancel | None
    constraint: Any = None
    tokens: mx.array | None = None  # every id so far, while processors need them
    done: int = 0  # ids of ids[reused:] prefilled
    next: int = 0  # the id the next decode step feeds
    generated: list[int] = field(default_factory=list)
    closing: str | None = None  # a finish reason whose last token is still to be fed
    stats: LookupStats = field(default_factory=LookupStats)
    start: float = 0.0
    first: float = 0.0

    @property
    def todo(self) -> int:
        """Prompt ids still to prefill (all but the last: its logits start the answer)."""
        return len(self.ids) - 1 - self.reused - self.done


class BatchGenerator:
    """Requests decoded together, joining and leaving between steps.

    Args:
        model, tokenizer: as returned by `load`.
        max_batch: the most rows prefilled or decoded at once; more wait in order.
        prefill_step_size: prompt ids per prefill chunk (`default_prefill_step` by default, what
            `stream_generate` uses: the chunks, and so the caches, are the same).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_step_size: int | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.prefill_step_size = prefill_step_size or default_prefill_step(model)
        self.waiting: deque[_Row] = deque()
        self.prefilling: deque[_Row] = deque()
        self.decoding: list[_Row] = []
        self._uids = itertools.count()

    def __len__(self) -> int:
        """Rows not finished: waiting, prefilling or decoding."""
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    @property
    def active(self) -> int:
        """Rows prefilling or decoding (at most `max_batch`)."""
        return len(self.prefilling) + len(self.decoding)

    def insert(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = None,
        sampling: Sampling | None = None,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        stop_strings: Sequence[str] = (),
        prompt_cache: PromptCache | None = None,
        cancel: Cancel | None = None,
        response_format: Any = None,
    ) -> int:
        """Add a request; returns its id (its responses carry it). The keywords are
        `stream_generate`'s, and mean the same; a seeded `sampling` draws from a random stream
        of its own, the one `stream_generate` draws from after seeding MLX's generator."""
        model, tokenizer = self.model, self.tokenizer
        if sampling is None:
            sampling = model.info.sampling if model.info is not None else GREEDY
        if sampler is None:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            s = sampling
            sampler = make_sampler(s.temperature, s.top_p, s.top_k, s.min_p, seed=seed)
        processors = list(
            sampling.logits_processors() if logits_processors is None else logits_processors
        )
        constraint = None
        if response_format is not None:
            from .constrain import make_answer_constraint  # the grammar engine, only when asked

            constraint = make_answer_constraint(tokenizer, response_format)
            processors += [constraint] if constraint else []
        ids = tokenizer.encode(prompt, allow_special=True) if isinstance(prompt, str) else prompt
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        limit = sampling.max_tokens if max_tokens is None else max_tokens
        cache = prompt_cache if prompt_cache is not None else PromptCache.new(model)
        row = _Row(
            uid=next(self._uids),
            ids=ids,
            cache=cache,
            reused=0,
            max_tokens=_fit_context(model, len(ids), limit, None, cache),
            sampler=sampler,
            processors=processors,
            text=_TextStream(tokenizer, stop_strings),
            cancel=cancel,
            constraint=constraint,
        )
        self.waiting.append(row)
        return row.uid

    def remove(self, uid: int) -> GenerationResponse | None:
        """Cancel request `uid` now; its last response ("cancelled"), or None if it is gone."""
        for rows in (self.waiting, self.prefilling, self.decoding):
            for row in rows:
                if row.uid == uid:
                    return self._leave(row, "cancelled")
        return None

    def step(self) -> list[tuple[int, GenerationResponse | Exception]]:
        """One prefill chunk (of the oldest row prefilling) and one decode step for all rows
        decoding; the responses of this step as (request id, response).

        A request that fails (its logits processor raised, say) leaves with its error in place
        of a response; the others go on. An error in the batch's forward pass fails its rows.
        """
        out: list[tuple[int, GenerationResponse | Exception]] = [
            (r.uid, self._leave(r, "cancelled")) for r in self._cancelled()
        ]
        self._admit()
        if self.prefilling:
            row = self.prefilling[0]
            try:
                self._prefill_chunk(row)
            except Exception as e:
                out.append((row.uid, self._fail(row, e)))
        if self.decoding:
            try:
                out += self._decode()
            except Exception as e:
                out += [(r.uid, self._fail(r, e)) for r in list(self.decoding)]
        return out

    def _fail(self, row: _Row, error: Exception) -> Exception:
        self._leave(row, "cancelled")
        return error

    def _cancelled(self) -> list[_Row]:
        rows = [*self.waiting, *self.prefilling, *self.decoding]
        return [r for r in rows if r.cancel is not None and r.cancel.is_set() and not r.closing]

    def _admit(self) -> None:
        while self.waiting and self.active < self.max_batch:
            row = self.waiting.popleft()
            row.start = time.perf_counter()
            row.reused = row.cache.reuse(row.ids)  # what a cached prefix spares
            if row.processors:  # they see every id so far, the cached ones included
                row.tokens = mx.array(row.ids, dtype=mx.uint32)
            self.prefilling.append(row)
            if row.todo == 0:
                self._joined(row)

    def _prefill_chunk(self, row: _Row) -> None:
        """Run one chunk of `row`'s prompt on its own cache, as `stream_generate` would."""
        layers = row.cache.layers
        size = self.prefill_step_size
        if layers[0].window is not None:  # a prefill chunk must fit beside the kept tokens
            size = min(size, layers[0].window - layers[0].keep)
        start = row.reused + row.done
        n = min(size, row.todo)
        self.model(mx.array(row.ids[start : start + n], dtype=mx.uint32)[None], cache=layers)
        mx.eval([c.state for c in layers])
        row.done += n
        if row.todo == 0:
            self._joined(row)

    def _joined(self, row: _Row) -> None:
        self.prefilling.remove(row)
        row.next = row.ids[-1]
        self.decoding.append(row)

    def _decode(self) -> list[tuple[int, GenerationResponse | Exception]]:
        rows = self.decoding
        batch = BatchCache([r.cache for r in rows])
        inputs = mx.array([[r.next] for r in rows], dtype=mx.uint32)
        logits = self.model(inputs, cache=batch.layers)[:, -1, :]
        picked, out = [], []
        for i, r in enumerate(list(rows)):
            r.stats.passes += 1
            if r.closing is None:
                try:
                    picked.append((r, *self._pick(r, logits[i : i + 1])))
                except Exception as e:  # this request fails, not the batch
                    out.append((r.uid, self._fail(r, e)))
        mx.eval([p[1:] for p in picked], [c.state for c in batch.layers])
        for r in [r for r in rows if r.closing is not None]:  # their last token is in now
            out.append((r.uid, self._leave(r, r.closing)))
        for r, y, logprobs in picked:
            out += [(r.uid, response) for response in self._took(r, y.item(), logprobs)]
        return out

    def _pick(self, row: _Row, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The row's next token (queued) and its log-probabilities, as `Decoder.step` makes them."""
        for processor in row.processors:
            logits = processor(row.tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y = row.sampler(logprobs)
        if row.tokens is not None:
            row.tokens = mx.concatenate([row.tokens, y.astype(row.tokens.dtype)])
        return y, logprobs.squeeze(0)

    def _took(self, row: _Row, token: int, logprobs: mx.array) -> list[GenerationResponse]:
        """A row's new token: its response, and its last one when it ends here. A token that
        ends the turn (end of turn, a stop string) is fed next step, as `stream_generate`
        feeds it, so that the cache holds it; the row leaves then."""
        if not row.generated:
            row.first = time.perf_counter()
        row.generated.append(token)
        row.next = token
        if token in self.tokenizer.eos_token_ids:
            row.closing = "stop"
            return []
        piece, stopped = row.text.add(token)
        if stopped:
            row.closing = "stop"
            return []
        out = [self._response(row, piece, token, None, logprobs)]
        if len(row.generated) == row.max_tokens:
            out.append(self._leave(row, "length"))
        return out

    def _leave(self, row: _Row, finish: str) -> GenerationResponse:
        """Take `row` out wherever it is, settle its cache; its last response."""
        if row in self.waiting:  # its cache is as it came: nothing to settle
            self.waiting.remove(row)
        else:
            (self.prefilling if row in self.prefilling else self.decoding).remove(row)
            row.cache.settle(row.ids + row.generated)
        return self._final(row, finish)

    def _final(self, row: _Row, finish: str) -> GenerationResponse:
        token = row.generated[-1] if finish == "length" and row.generated else None
        piece, finish = row.text.end(finish)
        last = self._response(row, piece, token, finish, None)
        c = row.constraint
        if c is not None and finish == "stop" and c.complete:
            last.parsed = c.parse() if c.response_format else None
        return last

    def _response(
        self, row: _Row, piece: str, token: int | None, finish: str | None, logprobs
    ) -> GenerationResponse:
        now = time.perf_counter()
        first = row.first or now
        prompt_time, decode_time = first - row.start, now - first
        n = len(row.generated)
        prefilled = len(row.ids) - row.reused if n else row.done  # fewer if cancelled meanwhile
        return GenerationResponse(
            text=piece,
            token=token,
            prompt_tokens=len(row.ids),
            prompt_tps=prefilled / prompt_time if prompt_time > 0 else 0.0,
            generation_tokens=n,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            time_to_first_token=prompt_time,
            finish_reason=finish,
            cached_tokens=row.reused,
            prefill_tokens=prefilled,
            lookup=LookupStats(passes=row.stats.passes),
            logprobs=logprobs,
        )


def stream_batch(
    model,
    tokenizer,
    requests: Sequence[str | Sequence[int] | dict[str, Any]],
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    prefill_step_size: int | None = None,
    **shared: Any,
) -> Generator[tuple[int, GenerationResponse], None, None]:
    """Run `requests` together; yield (index of the request, response) as tokens come.

    Each request is a prompt, or a dict of `BatchGenerator.insert`'s keywords with its
    "prompt"; `shared` keywords apply to every request that does not set them. Each request's
    last response has its `finish_reason`. Closing the generator cancels what is left.

    Example:
        >>> texts = batch_generate(model, tokenizer, ["Hi", "2+2?"], max_tokens=32)
    """
    gen = BatchGenerator(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size)
    index = {}
    for i, request in enumerate(requests):
        options = dict(request) if isinstance(request, dict) else {"prompt": request}
        index[gen.insert(**{**shared, **options})] = i
    try:
        while len(gen):
            for uid, response in gen.step():
                if isinstance(response, Exception):
                    raise response  # as stream_generate would raise it
                yield index[uid], response
    finally:
        for uid in list(index):
            gen.remove(uid)


def batch_generate(
    model, tokenizer, requests: Sequence[str | Sequence[int] | dict[str, Any]], **kwargs: Any
) -> list[str]:
    """Each request's whole completion, in order; see `stream_batch` for the options."""
    texts = [""] * len(requests)
    for i, response in stream_batch(model, tokenizer, requests, **kwargs):
        texts[i] += response.text
    return texts
