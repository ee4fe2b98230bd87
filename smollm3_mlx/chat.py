"""The chat an app holds: history, think mode, tools, prompt-cache reuse, turns as typed events.

Each turn renders the whole conversation with the official template (the mode applies to all of it)
and prefills only the tokens past the longest prefix the prompt cache already holds. Nothing here
prints: `send` yields ThinkingDelta, AnswerDelta, ToolCall and ToolCallError events, then Done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx

from .cache import KVSettings, PromptCache, check_kv_quantization
from .chat_file import (
    SAVED_SETTINGS,
    SavedChat,
    TurnRequest,
    assistant_message,
    checked_text,
    continued,
    file_dict,
    kind,
    open_chat_cache,
    read_chat_file,
    save_chat_cache,
    tool_turn,
    user_turn,
    write_chat_file,
)
from .constrain import (
    DEFAULT_ANSWER_RESERVE,
    DEFAULT_HANDOFF,
    AnswerConstraint,
    ConstraintError,
    ThinkBudget,
    ToolChoice,
    make_turn_processors,
)
from .events import (
    Done,
    Error,
    Event,
    EventParser,
    ToolCall,
    ToolCallError,
    TurnStats,
)
from .generate import GenerationResponse, stream_generate
from .memory import out_of_memory
from .off_loop import Either, off_loop
from .sample import Sampling
from .step import prefill_cache
from .tools import Tool, run_tool, tool_schemas

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

__all__ = ["Chat", "ChatBusyError"]


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
            raise TypeError(f"the system message must be a str or None, not {kind(text)}")
        text = text and checked_text(text, "the system message")
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
        return self._turn(*user_turn(text, prefill, response_format, think_budget, tool_choice))

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
        return self._turn(*tool_turn(results, response_format, tool_choice))

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
        async for event in self._off_loop(*user_turn(text, **options)):
            yield event

    async def acontinue_answer(self) -> AsyncIterator[Event]:
        """`continue_answer` off the event loop."""
        async for event in self._off_loop(*self._continue_turn()):
            yield event

    async def asend_tool_result(self, *results: object, **options: Any) -> AsyncIterator[Event]:
        """`send_tool_result` off the event loop."""
        async for event in self._off_loop(*tool_turn(results, **options)):
            yield event

    def _continue_turn(self) -> tuple[list[dict[str, Any]], TurnRequest]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("nothing to continue: the last message is not the assistant's")
        return [], TurnRequest(open_answer=True)

    def _off_loop(self, new: list[dict[str, Any]], turn: TurnRequest) -> AsyncIterator[Event]:
        # A thread per turn, ended with it: MLX gives each thread its own streams, which a thread
        # must clear before it ends, or the process may abort at exit.
        return off_loop(
            lambda stop: self._turn(new, turn, stop),
            name="smollm3-chat",
            before_exit=mx.clear_streams,
        )

    def _turn(
        self,
        new: list[dict[str, Any]],
        turn: TurnRequest,
        stop: threading.Event | None = None,
    ) -> Generator[Event, None, None]:
        with self._turn_lock():
            self._cancel.clear()
            self._answer_now.clear()
            try:
                yield from self._generate(new, turn, stop or self._cancel)
            finally:
                self.thinking = False

    @contextmanager
    def _turn_lock(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise ChatBusyError(
                "this Chat is generating a turn already (in another thread, or a stream not "
                "finished); use one Chat per thread, or finish or close the stream first"
            )
        try:
            yield
        finally:
            self._busy.release()

    def _generate(
        self, new: list[dict[str, Any]], turn: TurnRequest, stop: threading.Event
    ) -> Iterator[Event]:
        """One turn; with turn.open_answer, the final message is an answer to continue."""
        open_answer = turn.open_answer
        self.messages += new
        try:
            prompt = self.render(continue_final_message=open_answer)
            parser = EventParser(self.tokenizer, prompt)  # its ids say where an open answer is
            given = continued(parser, self.messages[-1]) if open_answer else []  # shown if new
            processors, constraint = self._processors(turn, len(prompt))
        except Exception:
            self._undo(len(new))
            raise
        if self.prompt_cache is None:
            self.prompt_cache = self._new_cache(prompt)
        errors: list[ToolCallError] = []  # calls the model wrote that are not calls
        last, failed = None, None
        start = time.perf_counter()
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            sampling=self.sampling,
            prompt_cache=self.prompt_cache,
            logits_processors=processors,
            cancel=Either(stop, self._cancel),
            prompt_lookup=self.prompt_lookup,
            prompt_progress=self.prompt_progress,
        )
        # stop_thinking needs the budget processor, and acts once `<think>` is written
        can_stop = any(isinstance(p, ThinkBudget) for p in processors)
        try:
            for last in responses:
                yield from given if new else ()  # a prefill streams once the prompt is read
                given = []
                if last.finish_reason is None and last.token is not None:
                    for event in parser.feed(last.token, last.text):
                        errors += [event] if isinstance(event, ToolCallError) else []
                        yield event
                    self.thinking = can_stop and parser.state.thinking
        except GeneratorExit:  # the caller closed the stream: a cancel too
            self._record(len(new), parser, errors, "cancelled", open_answer)
            raise
        except BaseException as e:  # an error: the history is left as before the turn
            self._undo(len(new))
            if not out_of_memory(e):
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
        yield from self._record(
            len(new), parser, errors, last.finish_reason, open_answer, last.text
        )
        self.last = self._stats(last, parser, time.perf_counter() - start)
        parsed = None
        if constraint is not None and last.finish_reason == "stop" and not parser.calls:
            try:
                parsed = constraint.parse()
            except ValueError:  # no format given, or a model class's own check refused it
                parsed = None
        yield parser.done(self.last, last.finish_reason, parsed)

    def _processors(
        self, turn: TurnRequest, prompt_tokens: int
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
        if self.prompt_cache is None:
            self.prefill()
        with self._turn_lock():
            assert self.prompt_cache is not None
            return save_chat_cache(
                path,
                self.model,
                self.tokenizer,
                self.prompt_cache,
                messages=self.messages,
                think=self.think,
                tools=self.tools,
            )

    def _open_prompt_cache(self, path: str | Path, mismatch: str, *, keep_system: bool) -> None:
        if mismatch not in ("error", "recompute"):
            raise ValueError(
                f"prompt_cache_mismatch must be 'error' or 'recompute', not {mismatch!r}"
            )
        self.prompt_cache, saved = open_chat_cache(
            path,
            self.model,
            self.tokenizer,
            kv=self.kv,
            window=self.max_context,
            recompute=mismatch == "recompute",
            tool_choice=self.tool_choice,
        )
        if keep_system:  # the given system message wins; the cache still serves what matches
            return
        self.messages = saved.messages
        self.think = self.think if saved.think is None else saved.think
        if saved.tools is not None and self.tools is None:
            self.tools = saved.tools

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

    def _undo(self, n_new: int) -> None:
        if n_new:
            del self.messages[-n_new:]

    def _record(
        self,
        n_new: int,
        parser: EventParser,
        errors: list[ToolCallError],
        finish: str,
        open_answer: bool,
        text: str = "",
    ) -> list[Event]:
        """Add the assistant message (or replace the open one by its whole), marked if
        interrupted; or drop a cancelled turn. Returns the events the parser still held.

        The message keeps the turn's structure as the ids had it: the thinking, the answer and
        the calls the model wrote with its tag tokens. A call that did not parse is kept in
        the answer as the text it is. `text`: what generation released last."""
        tail = parser.flush(text)
        if finish == "cancelled" and self.on_cancel == "drop":
            self._undo(n_new)
            return tail
        before = self.messages.pop() if open_answer else {}
        message = assistant_message(
            parser,
            errors,
            [e for e in tail if isinstance(e, ToolCallError)],
            keep_thinking=self.keep_thinking,
            had_reasoning="reasoning_content" in before,
        )
        if finish == "cancelled":
            message["interrupted"] = True
        self.messages.append(message)
        return tail

    def to_dict(self) -> dict[str, Any]:
        """The conversation as `save` writes it (see chat_file.py for the format)."""
        return file_dict(self)

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (messages, mode, model, sampling, tools, thinking
        budget and hand-off, tool choice).

        The file is written whole or not at all: into a temporary file beside it, flushed to the
        disk, then renamed over `path`; on any error (a full disk...) an earlier file is as it was.

        Raises:
            OSError: the file could not be written.
        """
        return write_chat_file(path, self.to_dict())

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
        for key in SAVED_SETTINGS.keys() & options.keys():  # and settings given now
            setattr(chat, key, options[key])
        return chat

    def restore(self, path: str | Path) -> SavedChat:
        """Replace the conversation, mode, sampling and the settings saved with them (thinking
        budget and hand-off, tool choice; a file that has none leaves the Chat's) with a saved
        one; on error nothing changes. Returns what the file holds (`model`: saved with).

        Raises:
            ChatFileError: unreadable, not JSON, or not a conversation this program saved
                (chat_file.py: every field is checked as a turn will use it).
        """
        with self._turn_lock():
            saved = read_chat_file(path, self.tokenizer, tool_choice=self.tool_choice)
            self.messages, self.think = saved.messages, saved.think
            self.keep_thinking, self.sampling = saved.keep_thinking, saved.sampling
            self.tools, self.functions = saved.tools, {}
            for key, value in saved.settings.items():
                setattr(self, key, value)
        return saved


def _check_whole(name: str, value: object, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r:.40}")
