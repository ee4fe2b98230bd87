"""The chat an app holds: history, think mode, tools, prompt-cache reuse, turns as typed events.

Each turn renders the whole conversation with the official template (the mode applies to all of it)
and prefills only the tokens past the longest prefix the prompt cache already holds. Nothing here
prints: `send` yields ThinkingDelta, AnswerDelta, ToolCall and ToolCallError events, then Done.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx

from .cache import KVSettings, PromptCache, check_kv_quantization
from .constrain import (
    DEFAULT_ANSWER_RESERVE,
    DEFAULT_HANDOFF,
    AnswerConstraint,
    ConstraintError,
    ThinkBudget,
    ToolChoice,
    make_turn_processors,
    tool_choice_mode,
)
from .events import (
    AnswerDelta,
    Done,
    Error,
    Event,
    EventParser,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    TurnStats,
    split_thinking,
)
from .files import parse_json, write_atomic
from .generate import GenerationResponse, stream_generate
from .sample import Sampling
from .step import prefill_cache
from .tokenizer import ASSISTANT_TAGS
from .tools import Tool, as_text, run_tool, tool_schema, tool_schemas

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

__all__ = [  # the events and Sampling stay importable from here, where they used to live
    "AnswerDelta",
    "Chat",
    "ChatBusyError",
    "ChatFileError",
    "Done",
    "Error",
    "Event",
    "Sampling",
    "ThinkingDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallError",
    "TurnStats",
    "split_thinking",
    "tool_schema",
]

FILE_FORMAT, FILE_VERSION = "smollm3-mlx-chat", 1
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "interrupted"}  # all a saved message holds


class ChatFileError(ValueError):
    """A conversation file that cannot be loaded; one line naming the file and the problem."""


class ChatBusyError(RuntimeError):
    """A turn was started while another one of the same Chat is still being generated."""


class Chat:
    """A conversation with a loaded model: messages, think mode, tools, sampling, prompt cache.

    Args:
        model: as returned by `load` (it carries its tokenizer), or pass `tokenizer` too.
        think: reasoning mode for the next turns (SmolLM3's /think vs /no_think).
        system: an optional system message.
        tools: Python functions (schema from signature and docstring) or JSON schemas, offered
            through the template's `xml_tools`; calls arrive as ToolCall events.
        max_context: the cache's window in tokens (at most what the model was loaded for); past
            it the oldest turns leave the cache, never the system block.
        sampling: a Sampling; default the model folder's generation_config.json, with any of
            temperature, top_p, top_k, min_p, repetition_penalty, max_tokens given here on top.
        keep_thinking: keep past reasoning in the history (else only answers are kept).
        on_cancel: "keep" the partial answer of a cancelled turn (marked `interrupted`), or
            "drop" the whole turn so the history is as before it.
        kv_bits, kv_group_size, kv_start: quantize the KV cache to 4 or 8 bits, once it holds
            `kv_start` tokens (dense until then).
        prompt_lookup: draft up to this many tokens from n-grams already in the conversation
            and verify them in one pass (same output; see `generate_step`). 0: off. Turns
            that hold the answer to a format, bound the thinking or offer tools do not draft
            (a draft cannot pass through their token-by-token checks).
        model_name: recorded in saved conversations.
        think_budget: close the reasoning after this many thinking tokens (None: no bound);
            per turn in `send` too.
        handoff: what the model is made to write before a forced `</think>` ("" for nothing).
        tool_choice: "auto" (the model may call an offered tool; once it opens `<tool_call>`
            the call is held to {"name": an offered tool, "arguments": its parameters}),
            "none" (it cannot call), "required" (the answer is calls) or a tool's name.
            With no tools offered, or "none", `<tool_call>` cannot be written at all.
        answer_reserve: a turn whose answer has a shape (a response_format, a required or
            named tool) closes its thinking so as to keep this many of max_tokens for the
            answer; a think_budget given wins.
        prompt_cache: a file from `save_prompt_cache` (or `smollm3-mlx cache-prompt`): its cache
            is reused, and its conversation restored unless `system` is given. One made for
            another model, tokenizer, template, dtype or KV settings (window = max_context)
            raises PromptCacheMismatch, or with `prompt_cache_mismatch="recompute"` is ignored
            (the first turn prefills again). A truncated or corrupt file raises PromptCacheError.
        prompt_progress: called as (prompt ids processed, to process) during each turn's
            prefill, between forward chunks (a long prefill can show its progress; `cancel`
            stops it after the current chunk).

    Sharing: one loaded model may serve several Chats, driven one at a time. A Chat runs one
    turn at a time: starting a turn while another is being generated (from another thread, or
    an unfinished stream) raises ChatBusyError and leaves the running turn untouched. A thread
    of yours that ran turns should call `mx.clear_streams()` before it ends, as MLX asks
    (`asend` runs each turn in a thread of its own and does so).
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer | None = None,
        *,
        think: bool = True,
        system: str | None = None,
        tools: Sequence[Tool] | None = None,
        max_context: int | None = None,
        sampling: Sampling | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        max_tokens: int | None = None,
        keep_thinking: bool = True,
        on_cancel: Literal["keep", "drop"] = "keep",
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        kv_start: int = 0,
        prompt_lookup: int = 0,
        model_name: str | None = None,
        think_budget: int | None = None,
        handoff: str = DEFAULT_HANDOFF,
        tool_choice: ToolChoice = "auto",
        answer_reserve: int = DEFAULT_ANSWER_RESERVE,
        prompt_cache: str | Path | None = None,
        prompt_cache_mismatch: Literal["error", "recompute"] = "error",
        prompt_progress: Callable[[int, int], None] | None = None,
    ):
        info = model.info
        tokenizer = tokenizer or (info.tokenizer if info is not None else None)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass the one `load` returned")
        self.model, self.tokenizer = model, tokenizer
        self.think, self.keep_thinking = think, keep_thinking
        if on_cancel not in ("keep", "drop"):
            raise ValueError(f"on_cancel must be 'keep' or 'drop', not {on_cancel!r}")
        self.on_cancel = on_cancel
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        given |= dict(repetition_penalty=repetition_penalty, max_tokens=max_tokens)
        self.sampling = (sampling or Sampling.from_model(model)).updated(**given)
        self.functions: dict[str, Callable[..., Any]] = {}
        self.tools: list[dict[str, Any]] | None = None
        self.set_tools(tools)
        loaded = model.max_context
        _check_whole("max_context", max_context, 1, optional=True)
        if max_context is not None and loaded is not None and max_context > loaded:
            raise ValueError(
                f"max_context {max_context} is more than the model was loaded for ({loaded}); "
                f"load it with max_context={max_context}"
            )
        self.max_context = max_context or loaded
        self.model_name = model_name or str(info.path if info and info.path else "")
        self.messages: list[dict[str, Any]] = []
        self.last: TurnStats | None = None
        _check_whole("prompt_lookup", prompt_lookup, 0)
        _check_whole("kv_start", kv_start, 0)
        check_kv_quantization(model.args.head_dim or 0, kv_bits, kv_group_size)
        self.prompt_lookup = prompt_lookup
        self.prompt_progress = prompt_progress
        self.kv = KVSettings(kv_bits, kv_group_size, kv_start)
        self.prompt_cache: PromptCache | None = None  # made at the first turn (its kept system)
        self._cancel = threading.Event()
        self._answer_now = threading.Event()  # stop_thinking: close the reasoning now
        self.thinking = False  # whether the turn being generated is inside its think block
        self._busy = threading.Lock()
        self.system = system
        _check_whole("think_budget", think_budget, 0, optional=True)
        self.think_budget, self.handoff, self.tool_choice = think_budget, handoff, tool_choice
        _check_whole("answer_reserve", answer_reserve, 0)
        self.answer_reserve = answer_reserve
        if prompt_cache is not None:
            self._open_prompt_cache(prompt_cache, prompt_cache_mismatch, keep_system=bool(system))

    @property
    def system(self) -> str | None:
        m = self.messages[:1]
        return m[0]["content"] if m and m[0]["role"] == "system" else None

    @system.setter
    def system(self, text: str | None) -> None:
        if text is not None and not isinstance(text, str):
            raise TypeError(f"the system message must be a str or None, not {_kind(text)}")
        if self.system is not None:
            del self.messages[0]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    @property
    def cached_tokens(self) -> int:
        return self.prompt_cache.offset if self.prompt_cache is not None else 0

    def set_tools(self, tools: Sequence[Tool] | None) -> None:
        """Offer these tools (Python functions or JSON schemas) from the next turn on."""
        schemas, functions = tool_schemas(tools)
        self.tools, self.functions = schemas or None, functions

    def reset(self) -> None:
        """Forget the conversation, keeping the system message, mode and sampling."""
        with self._turn_lock():
            self.messages = self.messages[:1] if self.system is not None else []

    def cancel(self) -> None:
        """Stop the turn being generated, within one decode step (thread- and signal-safe)."""
        self._cancel.set()

    def stop_thinking(self) -> bool:
        """Answer now: close the reasoning of the turn being generated at the next step (the
        hand-off, `</think>`), and let the answer follow. Thread- and signal-safe.

        Returns:
            False if no turn is thinking or this was asked already (a second Ctrl-C may cancel).
        """
        if not self.thinking or self._answer_now.is_set():
            return False
        self._answer_now.set()
        return True

    def render(
        self, *, add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        """The ids of the conversation as the model reads it (continue_final_message: with the
        final message left open, as `Tokenizer.apply_chat_template` does)."""
        return self._render(
            self.messages,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
        )

    def _render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            enable_thinking=self.think,
            tools=self.tools,
            assistant_tags=True,
        )
        assert isinstance(ids, list)
        return ids

    def send(
        self,
        text: str,
        *,
        prefill: str | None = None,
        response_format: Any = None,
        think_budget: int | None = None,
        tool_choice: ToolChoice | None = None,
    ) -> Generator[Event, None, None]:
        """Add a user message and stream the assistant's turn as events, ending with Done.

        Args:
            text: the user's message.
            prefill: the start of the answer, which the model continues (`{` to begin a JSON
                object, a phrase to steer it, `<think>` and a first thought): streamed as the
                turn's first events and part of the answer, as if the model had written it.
            response_format: hold the answer to a JSON schema (dict, OpenAI's `response_format`
                or a Pydantic model class), a regex or a list of strings; `Done.parsed` has its
                value. See `constrain.make_response_format`. Not with `prefill`.
            think_budget: this turn's thinking budget (default: the Chat's).
            tool_choice: this turn's tool choice (default: the Chat's).

        Raises:
            ConstraintError: a format or tool choice that cannot be enforced (before any token;
                the history is left as it was).
        """
        return self._turn(*_user_turn(text, prefill, response_format, think_budget, tool_choice))

    def continue_answer(self) -> Generator[Event, None, None]:
        """Continue the last assistant message (one cut off by max_tokens, or cancelled): stream
        what the model adds to it; the message grows by that, and Done holds the whole answer.

        Raises:
            ValueError: the last message is not the assistant's.
        """
        return self._turn(*self._continue_turn())

    def send_tool_result(
        self, *results: object, response_format: Any = None, tool_choice: ToolChoice | None = None
    ) -> Generator[Event, None, None]:
        """Add tool results (strings as they are, anything else as JSON) and continue the turn."""
        return self._turn(*_tool_turn(results, response_format, tool_choice))

    def reply(self, text: str, **options: Any) -> str:
        """The answer to `text` as a plain string (thinking and tool calls left out); `options`
        as for `send`."""
        *_, done = self.send(text, **options)
        assert isinstance(done, Done)
        return done.answer

    def run_tool(self, call: ToolCall) -> str:
        """Run a tool given as a function: its result, or its error, as text for the model."""
        return run_tool(self.functions.get(call.name), call.name, call.arguments)

    async def asend(self, text: str, **options: Any) -> AsyncIterator[Event]:
        """`send` off the event loop: events arrive as generation goes, the loop stays free.

        Cancelling the task (or leaving the loop early) stops generation within one step.
        """
        async for event in self._off_loop(*_user_turn(text, **options)):
            yield event

    async def acontinue_answer(self) -> AsyncIterator[Event]:
        """`continue_answer` off the event loop."""
        async for event in self._off_loop(*self._continue_turn()):
            yield event

    async def asend_tool_result(self, *results: object, **options: Any) -> AsyncIterator[Event]:
        """`send_tool_result` off the event loop."""
        async for event in self._off_loop(*_tool_turn(results, **options)):
            yield event

    def _continue_turn(self) -> tuple[list[dict[str, Any]], _Turn]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("nothing to continue: the last message is not the assistant's")
        return [], _Turn(open_answer=True)

    async def _off_loop(self, new: list[dict[str, Any]], turn: _Turn) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | _End] = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            end = _End()
            try:
                for event in self._turn(new, turn, stop):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as e:  # handed to the awaiting task
                end = _End(e)
            mx.clear_streams()  # MLX asks threads to free their streams before they end
            loop.call_soon_threadsafe(queue.put_nowait, end)

        # A thread per turn, ended with it: MLX gives each thread its own streams, which a thread
        # must clear before it ends, or the process may abort at exit.
        worker = threading.Thread(target=pump, name="smollm3-chat", daemon=True)
        worker.start()
        item: Event | _End | None = None
        try:
            while not isinstance(item := await queue.get(), _End):
                yield item
            if item.error is not None:
                raise item.error
        finally:
            stop.set()  # no-op once the turn is over
            while not isinstance(item, _End):  # let the turn end and record itself
                item = await queue.get()
            worker.join()

    def _turn(
        self,
        new: list[dict[str, Any]],
        turn: _Turn,
        stop: threading.Event | None = None,
    ) -> Generator[Event, None, None]:
        with self._turn_lock():
            self._cancel.clear()
            self._answer_now.clear()
            try:
                yield from self._generate(new, turn, stop or self._cancel)
            finally:
                self.thinking = False

    def _turn_lock(self) -> _Held:
        if not self._busy.acquire(blocking=False):
            raise ChatBusyError(
                "this Chat is generating a turn already (in another thread, or a stream not "
                "finished); use one Chat per thread, or finish or close the stream first"
            )
        return _Held(self._busy)

    def _generate(
        self, new: list[dict[str, Any]], turn: _Turn, stop: threading.Event
    ) -> Iterator[Event]:
        """One turn; with turn.open_answer, the final message is an answer to continue."""
        open_answer = turn.open_answer
        self.messages += new
        try:
            prompt = self.render(continue_final_message=open_answer)
            parser, given = self._answer_parser(prompt, open_answer, bool(new))
            processors, constraint = self._processors(turn, len(prompt))
        except Exception:
            self._undo(len(new))
            raise
        if self.prompt_cache is None:
            self.prompt_cache = self._new_cache(prompt)
        generated: list[int] = []  # the end-of-turn id left out
        last, failed = None, None
        start = time.perf_counter()
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            sampling=self.sampling,
            prompt_cache=self.prompt_cache,
            logits_processors=processors,
            cancel=_Either(stop, self._cancel),
            prompt_lookup=self.prompt_lookup,
            prompt_progress=self.prompt_progress,
        )
        # stop_thinking needs the budget processor, and acts once `<think>` is written (during
        # the prefill, Ctrl-C stops the turn).
        can_stop = any(isinstance(p, ThinkBudget) for p in processors)
        try:
            for last in responses:
                yield from given  # a prefill streams once the prompt is read, as an answer would
                given = []
                if last.finish_reason is None and last.token is not None:
                    generated.append(last.token)
                    yield from parser.feed(last.token)
                    self.thinking = can_stop and parser.splitter.thinking
        except GeneratorExit:  # the caller closed the stream: a cancel too
            self._record(len(new), generated, "cancelled", open_answer)
            raise
        except BaseException as e:  # an error: the history is left as before the turn
            self._undo(len(new))
            if not _out_of_memory(e):
                raise
            failed = e
        finally:
            responses.close()  # the prompt cache settles, however the turn ended
        if failed is not None:
            # Arrays of the failed step may be half-computed: the next turn prefills afresh.
            self.prompt_cache = None
            mx.clear_cache()
            first = str(failed).strip().split("\n")[0] or type(failed).__name__
            yield Error(
                f"out of memory during the turn ({first}); the conversation is as before it. "
                "Try --kv-bits 4, a smaller --max-context or a shorter prompt"
            )
            return
        assert last is not None and last.finish_reason is not None
        self._record(len(new), generated, last.finish_reason, open_answer)
        yield from parser.flush()
        self.last = self._stats(last, parser, time.perf_counter() - start)
        parsed = None
        if constraint is not None and last.finish_reason == "stop" and not parser.calls:
            try:
                parsed = constraint.parse()
            except ValueError:  # no format given, or a model class's own check refused it
                parsed = None
        yield parser.done(self.last, last.finish_reason, parsed)

    def _processors(
        self, turn: _Turn, prompt_tokens: int
    ) -> tuple[list[Any], AnswerConstraint | None]:
        """The turn's logits processors: sampling's, the thinking budget (room kept for an
        answer with a shape), the answer constraint, or the ban on calls."""
        if turn.open_answer and turn.response_format is not None:
            raise ConstraintError("a response_format holds a whole answer: not with a prefill")
        budget = self.think_budget if turn.think_budget is None else turn.think_budget
        room = self.sampling.max_tokens
        if self.max_context is not None:
            room = min(room, max(self.max_context - prompt_tokens, 0))
        # stop_thinking needs the budget processor; with no budget, drafting (prompt_lookup) wins
        stop = None if budget is None and self.prompt_lookup else self._answer_now
        held, constraint = make_turn_processors(
            self.tokenizer,
            response_format=turn.response_format,
            tools=self.tools,
            tool_choice=self.tool_choice if turn.tool_choice is None else turn.tool_choice,
            think_budget=budget,
            answer_reserve=self.answer_reserve,
            room=room,
            handoff=self.handoff,
            stop=stop,
        )
        return [*self.sampling.logits_processors(), *held], constraint

    def _new_cache(self, prompt: list[int]) -> PromptCache:
        """The cache of this chat, its window and kept system block read off the first prompt."""
        window = self.max_context
        starts = [i for i, t in enumerate(prompt) if t == self.tokenizer.im_start_id]
        keep = starts[1] if len(starts) > 1 else 0  # the system block, up to the first turn
        keep = min(keep, window // 2) if window else keep
        return PromptCache.new(self.model, window=window, keep=keep, kv=self.kv)

    def prefill(self) -> int:
        """Prefill the conversation as it stands (a long system prompt, say) into the prompt
        cache without a turn; returns how many tokens the cache holds.

        Raises:
            ValueError: there is nothing to prefill (no system message, no messages).
        """
        if not self.messages:  # the template cannot render an empty conversation
            raise ValueError("nothing to prefill yet: no system message and no messages")
        with self._turn_lock():
            ids = self.render(add_generation_prompt=False)
            if self.prompt_cache is None:  # all of it is the system block when nothing follows
                marker = self.tokenizer.im_start_id  # where the next message would start
                self.prompt_cache = self._new_cache(ids if marker is None else [*ids, marker])
            prefill_cache(self.model, self.prompt_cache, ids)
            return self.prompt_cache.offset

    def save_prompt_cache(self, path: str | Path) -> Path:
        """Write the prompt cache and the conversation it stands for to `path` (safetensors,
        atomically); `Chat(model, prompt_cache=path)` takes up from it. Prefills first if no
        turn has run yet.

        Raises:
            OSError: the file could not be written (a full disk, whatever MLX's writer raised).
            ValueError: nothing to save yet (no system message, no messages).
        """
        from .cache_file import fingerprint, save_prompt_cache

        if self.prompt_cache is None:
            self.prefill()
        with self._turn_lock():
            pc = self.prompt_cache
            assert pc is not None
            fp = fingerprint(self.model, self.tokenizer, kv=pc.kv, window=pc.window, keep=pc.keep)
            conversation = {"messages": self.messages, "think": self.think, "tools": self.tools}
            return save_prompt_cache(path, pc, fp, extra={"chat": json.dumps(conversation)})

    def _open_prompt_cache(self, path: str | Path, mismatch: str, *, keep_system: bool) -> None:
        from .cache_file import PromptCacheError, fingerprint, load_prompt_cache, read_metadata

        if mismatch not in ("error", "recompute"):
            raise ValueError(
                f"prompt_cache_mismatch must be 'error' or 'recompute', not {mismatch!r}"
            )
        expect = fingerprint(self.model, self.tokenizer, kv=self.kv, window=self.max_context)
        self.prompt_cache = load_prompt_cache(
            path, self.model, expect=expect, recompute=mismatch == "recompute"
        )  # None on a mismatch, where asked: the first turn prefills the conversation again
        try:
            saved = parse_json(read_metadata(path).get("chat", "{}"))
        except ValueError as e:  # not JSON, or nested too deep for a conversation
            raise PromptCacheError(f"{path}: corrupt conversation metadata ({e})") from None
        if not isinstance(saved, dict):
            raise PromptCacheError(f"{path}: corrupt conversation metadata (not a JSON object)")
        messages, think = saved.get("messages", []), saved.get("think")
        if keep_system:  # the given system message wins; the cache still serves what matches
            return
        self.messages = list(messages)
        self.think = self.think if think is None else bool(think)
        if saved.get("tools") is not None and self.tools is None:
            self.tools = saved["tools"]

    @staticmethod
    def _stats(r: GenerationResponse, parser: EventParser, seconds: float) -> TurnStats:
        end = time.perf_counter()
        return TurnStats(
            prompt_tokens=r.prompt_tokens,
            cached_tokens=r.cached_tokens,
            prefill_tokens=r.prefill_tokens,
            generation_tokens=r.generation_tokens,
            thinking_tokens=parser.thinking_tokens,
            thinking_seconds=parser.thinking_seconds(end),
            time_to_first_token=r.time_to_first_token,
            prompt_tps=r.prompt_tps,
            generation_tps=r.generation_tps,
            seconds=seconds,
            peak_memory=r.peak_memory,
            drafted_tokens=r.lookup.drafted,
            accepted_tokens=r.lookup.accepted,
            answer_tokens=parser.answer_tokens,
        )

    def _answer_parser(
        self, prompt: list[int], open_answer: bool, shown: bool
    ) -> tuple[EventParser, list[Event]]:
        """The parser of the turn's answer, and the events of the part of it given, not
        generated: a prefill is streamed (`shown`), a continued answer's start was already."""
        if not open_answer:
            return EventParser(self.tokenizer, prompt), []
        *before, answer = self.messages
        parser = EventParser(self.tokenizer, self._render(before, add_generation_prompt=True))
        ids = self.tokenizer.encode(answer["content"], allow_special=ASSISTANT_TAGS)
        events = [event for i in ids for event in parser.feed(i)]
        return parser, events if shown else []

    def _undo(self, n_new: int) -> None:
        if n_new:
            del self.messages[-n_new:]

    def _record(self, n_new: int, generated: list[int], finish: str, open_answer: bool) -> None:
        """Add the assistant message, or grow the open one (marked if interrupted); or drop a
        cancelled turn."""
        if finish == "cancelled" and self.on_cancel == "drop":
            self._undo(n_new)
            return
        message: dict[str, Any] = self.messages.pop() if open_answer else {"role": "assistant"}
        body = message.get("content", "") + self.tokenizer.decode(generated)
        thinking, answer = split_thinking(body)
        message["content"] = answer if thinking and not self.keep_thinking else body
        message.pop("interrupted", None)
        if finish == "cancelled":
            message["interrupted"] = True
        self.messages.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model_name,
            "think": self.think,
            "keep_thinking": self.keep_thinking,
            "sampling": asdict(self.sampling),
            "tools": self.tools,
            "think_budget": self.think_budget,
            "handoff": self.handoff,
            "tool_choice": self.tool_choice,
            "messages": self.messages,
        }

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (messages, mode, model, sampling, tools, thinking
        budget and hand-off, tool choice).

        The file is written whole or not at all: into a temporary file beside it, flushed to the
        disk, then renamed over `path`; on any error (a full disk...) an earlier file is as it was.

        Raises:
            OSError: the file could not be written.
        """
        path = Path(path).expanduser()
        data = (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()
        write_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Model, **options: Any) -> Chat:
        """A Chat on `model` continuing a saved conversation; `options` as for Chat().

        Raises:
            ChatFileError: unreadable, not JSON, or not a conversation this program saved.
        """
        chat = cls(model, **options)
        chat.restore(path)
        if options.get("tools") is not None:  # functions given now win over saved schemas
            chat.set_tools(options["tools"])
        for key in _SAVED_SETTINGS.keys() & options.keys():  # and settings given now
            setattr(chat, key, options[key])
        return chat

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Replace the conversation, mode, sampling and the settings saved with them (thinking
        budget and hand-off, tool choice; a file that has none leaves the Chat's) with a saved
        one; on error nothing changes.

        Raises:
            ChatFileError: unreadable, not JSON, or not a conversation this program saved.
        """
        path = Path(path).expanduser()
        with self._turn_lock():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise ChatFileError(f"{path}: cannot read a conversation ({why})") from None
            try:
                messages, think, keep_thinking, sampling, tools = _validate(data)
                settings = _validate_settings(data)
            except ValueError as e:
                raise ChatFileError(f"{path}: not a smollm3-mlx conversation ({e})") from None
            self.messages, self.think, self.keep_thinking = messages, think, keep_thinking
            self.sampling, self.tools, self.functions = sampling, tools, {}
            for key, value in settings.items():
                setattr(self, key, value)
        return dict(data)


def _user_turn(
    text: str, prefill: str | None = None, response_format: Any = None,
    think_budget: int | None = None, tool_choice: ToolChoice | None = None,
) -> tuple[list[dict[str, Any]], _Turn]:  # fmt: skip
    """The messages a `send` adds, and what it asks of its turn (`asend` takes the same)."""
    new, open_answer = _prefilled(_user_message(text), prefill)
    return new, _Turn(response_format, think_budget, tool_choice, open_answer)


def _tool_turn(
    results: tuple[object, ...], response_format: Any = None, tool_choice: ToolChoice | None = None
) -> tuple[list[dict[str, Any]], _Turn]:
    """The messages a `send_tool_result` adds, and its turn (`asend_tool_result` too)."""
    return _tool_messages(results), _Turn(response_format, None, tool_choice)


@dataclass(frozen=True)
class _Turn:
    """What `send` asks of one turn beyond the Chat's settings."""

    response_format: Any = None
    think_budget: int | None = None
    tool_choice: ToolChoice | None = None
    open_answer: bool = False  # the final message is an answer to continue (prefill, continue)


class _Either:
    """Set when either event is set: a turn's own stop, or `Chat.cancel`."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


@dataclass
class _End:
    error: BaseException | None = None


class _Held:
    """Releases a lock already acquired when the `with` block ends."""

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _out_of_memory(e: BaseException) -> bool:
    """An allocation failure: MemoryError, or MLX's RuntimeError ("[metal::malloc] Attempting to
    allocate ...", "Insufficient Memory", "out of memory")."""
    text = str(e).lower()
    words = ("malloc", "allocate", "out of memory", "insufficient memory", "outofmemory")
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(w in text for w in words)
    )


def _prefilled(new: list[dict[str, Any]], prefill: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The turn's new messages, with the answer opened by `prefill` when one is given."""
    if prefill is None:
        return new, False
    if not isinstance(prefill, str):
        raise TypeError(f"prefill must be a str, not {_kind(prefill)}")
    return [*new, {"role": "assistant", "content": prefill}], True


def _user_message(text: str) -> list[dict[str, Any]]:
    if not isinstance(text, str):  # anything else would be saved as a file no one can load
        raise TypeError(f"the user's message must be a str, not {_kind(text)}")
    return [{"role": "user", "content": text}]


def _kind(value: object) -> str:
    """A value's type and a glimpse of it, for an error message: "int (123)"."""
    return f"{type(value).__name__} ({value!r:.40})"


def _check_whole(name: str, value: object, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r:.40}")


def _tool_messages(results: tuple[object, ...]) -> list[dict[str, Any]]:
    """Tool results as messages (strings as they are, anything else as JSON)."""
    if not results:  # a turn adds at least one message: an error removes what it added
        raise ValueError("send_tool_result needs at least one result")
    return [{"role": "tool", "content": as_text(r)} for r in results]


def _validate(
    data: Any,
) -> tuple[list[dict[str, Any]], bool, bool, Sampling, list[dict[str, Any]] | None]:
    """(messages, think, keep_thinking, sampling, tools) of a saved conversation, or a ValueError
    naming the first field that is missing or wrong."""

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ValueError(problem)

    need(isinstance(data, dict), "not a JSON object")
    need(data.get("format") == FILE_FORMAT, f'no "format": {FILE_FORMAT!r}')
    version = data.get("version")
    need(type(version) is int and version == FILE_VERSION, f"version {version!r:.20}, not 1")
    need(isinstance(data.get("model"), str), "'model' is missing or not a string")
    for key in ("think", "keep_thinking"):
        need(isinstance(data.get(key), bool), f"{key!r} is missing or not true or false")
    messages, sampling, tools = data.get("messages"), data.get("sampling"), data.get("tools")
    need(isinstance(messages, list), "'messages' is missing or not a list")
    for i, m in enumerate(messages):
        need(isinstance(m, dict), f"message {i} is not an object")
        need(m.get("role") in ROLES, f"message {i} has no known role")
        need(isinstance(m.get("content"), str), f"message {i} has no text content")
        need(type(m.get("interrupted", False)) is bool, f"message {i}: 'interrupted' is not bool")
        extra = sorted(set(m) - MESSAGE_KEYS)
        need(not extra, f"message {i} has an unknown field {extra[0]!r:.30}" if extra else "")
    need(isinstance(sampling, dict), "'sampling' is missing or not an object")
    unknown = sorted(set(sampling) - {f.name for f in fields(Sampling)})
    need(not unknown, f"unknown sampling field {unknown[0]!r:.30}" if unknown else "")
    try:
        sampling = Sampling(**sampling)  # its own checks: NaN, a negative temperature, top_p 7...
    except ValueError as e:
        raise ValueError(f"sampling: {e}") from None
    need(tools is None or isinstance(tools, list), "'tools' is not a list")
    for i, t in enumerate(tools or ()):
        need(isinstance(t, dict) and isinstance(t.get("name"), str), f"tool {i} has no name")
    return [dict(m) for m in messages], data["think"], data["keep_thinking"], sampling, tools


def _is_tool_choice(value: Any) -> bool:
    try:
        tool_choice_mode(value)
    except ConstraintError:
        return False
    return True


_SAVED_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "think_budget": (
        lambda v: v is None or (type(v) is int and v >= 0),
        "a whole number >= 0 or null",
    ),
    "handoff": (lambda v: isinstance(v, str), "a string"),
    "tool_choice": (_is_tool_choice, 'a string or {"type": "function", "function": {"name": ...}}'),
}


def _validate_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The saved Chat settings a file holds (files from before them hold none), or a
    ValueError naming the first that is wrong."""
    settings = {k: data[k] for k in _SAVED_SETTINGS if k in data}
    for key, value in settings.items():
        ok, meaning = _SAVED_SETTINGS[key]
        if not ok(value):
            raise ValueError(f"{key!r} must be {meaning}, not {value!r:.40}")
    return settings
