"""The chat an app holds: history, think mode, tools, prompt-cache reuse, turns as typed events.

Each turn renders the whole conversation with the official template (the mode applies to all of it)
and prefills only the tokens past the longest prefix the prompt cache already holds. Nothing here
prints: `send` yields ThinkingDelta, AnswerDelta, ToolCall and ToolCallError events, then Done.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
import types
import typing
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import mlx.core as mx

from .cache import Cache, check_kv_quantization
from .generate import DEFAULT_MAX_TOKENS, LookupStats, generate_step
from .sample import make_logits_processors, make_sampler

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

FILE_FORMAT, FILE_VERSION = "smollm3-mlx-chat", 1
ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
Tool = Callable[..., Any] | dict[str, Any]


class ChatFileError(ValueError):
    """A conversation file that cannot be loaded; one line naming the file and the problem."""


class ChatBusyError(RuntimeError):
    """A turn was started while another one of the same Chat is still being generated."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS  # thinking alone can take thousands

    @classmethod
    def from_model(cls, model: Model, **overrides: Any) -> Sampling:
        """The model folder's generation_config.json defaults, then the `overrides` not None."""
        g = getattr(model, "generation_config", None)
        base = cls() if g is None else cls(**asdict(g))  # the same names
        return base.updated(**overrides)

    def updated(self, **overrides: Any) -> Sampling:
        """A copy with the `overrides` that are not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """The model wrote `<tool_call>...</tool_call>` that is not a valid call."""

    text: str  # what it wrote between the tags
    error: str


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    cached_tokens: int  # reused from the prompt cache
    prefill_tokens: int  # processed this turn: prompt_tokens - cached_tokens
    generation_tokens: int
    thinking_tokens: int  # between <think> and </think>
    thinking_seconds: float
    time_to_first_token: float
    prompt_tps: float
    generation_tps: float
    seconds: float
    peak_memory: float  # GB
    drafted_tokens: int = 0  # prompt lookup: draft tokens verified
    accepted_tokens: int = 0  # ... and accepted


@dataclass(frozen=True)
class Done:
    stats: TurnStats
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "cancelled"
    thinking: str = ""
    answer: str = ""  # tool calls cut out
    tool_calls: tuple[ToolCall, ...] = ()


Event = ThinkingDelta | AnswerDelta | ToolCall | ToolCallError | Done


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of an assistant message's text."""
    m = re.match(r"\s*<think>(.*?)(?:</think>|$)(.*)", text, re.DOTALL)
    return (m[1].strip(), m[2].lstrip()) if m else ("", text)


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
            and verify them in one pass (same output; see `generate_step`). 0: off.
        model_name: recorded in saved conversations.

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
    ):
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass the one `load` returned")
        self.model, self.tokenizer = model, tokenizer
        self.think, self.keep_thinking = think, keep_thinking
        if on_cancel not in ("keep", "drop"):
            raise ValueError(f"on_cancel must be 'keep' or 'drop', not {on_cancel!r}")
        self.on_cancel = on_cancel
        self.sampling = (sampling or Sampling.from_model(model)).updated(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            max_tokens=max_tokens,
        )
        self.functions: dict[str, Callable[..., Any]] = {}
        self.tools: list[dict[str, Any]] | None = None
        self.set_tools(tools)
        loaded: int | None = getattr(model, "max_context", None)
        if max_context is not None and loaded is not None and max_context > loaded:
            raise ValueError(
                f"max_context {max_context} is more than the model was loaded for ({loaded}); "
                f"load it with max_context={max_context}"
            )
        self.max_context = max_context or loaded
        self.model_name = model_name or str(getattr(model, "path", "") or "")
        self.messages: list[dict[str, Any]] = []
        self.last: TurnStats | None = None
        check_kv_quantization(model.args.head_dim or 0, kv_bits, kv_group_size)
        self.prompt_lookup = prompt_lookup
        self.kv: dict[str, Any] = {"bits": kv_bits, "group_size": kv_group_size, "start": kv_start}
        self._cache: list[Cache] | None = None  # made at the first turn, once the system is known
        self._full: list[int] = []  # the ids the cache stands for (it lacks the dropped ones)
        self._cancel = threading.Event()
        self._busy = threading.Lock()
        self.system = system

    @property
    def system(self) -> str | None:
        m = self.messages[:1]
        return m[0]["content"] if m and m[0]["role"] == "system" else None

    @system.setter
    def system(self, text: str | None) -> None:
        if self.system is not None:
            del self.messages[0]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    @property
    def cached_tokens(self) -> int:
        return min(c.offset for c in self._cache) if self._cache else 0

    def set_tools(self, tools: Sequence[Tool] | None) -> None:
        """Offer these tools (Python functions or JSON schemas) from the next turn on."""
        schemas, functions = [], {}
        for tool in tools or ():
            if callable(tool):
                schema = tool_schema(tool)
                functions[schema["name"]] = tool
            elif isinstance(tool, dict) and isinstance(tool.get("name"), str):
                schema = tool
            else:
                raise ValueError(
                    f"a tool must be a function or a JSON schema with a name: {tool!r}"
                )
            schemas.append(schema)
        self.tools, self.functions = schemas or None, functions

    def reset(self) -> None:
        """Forget the conversation, keeping the system message, mode and sampling."""
        with self._turn_lock():
            self.messages = self.messages[:1] if self.system is not None else []

    def cancel(self) -> None:
        """Stop the turn being generated, within one decode step (thread- and signal-safe)."""
        self._cancel.set()

    def render(self, *, add_generation_prompt: bool = True) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            self.messages,
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=self.think,
            tools=self.tools,
            assistant_tags=True,
        )
        assert isinstance(ids, list)
        return ids

    def send(self, text: str) -> Generator[Event, None, None]:
        """Add a user message and stream the assistant's turn as events, ending with Done."""
        return self._turn(_user_message(text))

    def send_tool_result(self, *results: object) -> Generator[Event, None, None]:
        """Add tool results (strings as they are, anything else as JSON) and continue the turn."""
        return self._turn(_tool_messages(results))

    def reply(self, text: str) -> str:
        """The answer to `text` as a plain string (thinking and tool calls left out)."""
        *_, done = self.send(text)
        assert isinstance(done, Done)
        return done.answer

    def run_tool(self, call: ToolCall) -> str:
        """Run a tool given as a function: its result, or its error, as text for the model."""
        function = self.functions.get(call.name)
        if function is None:
            return f"Error: there is no tool named {call.name!r}"
        try:
            return _as_text(function(**call.arguments))
        except Exception as e:  # the model reads the error and may try again
            return f"Error: {type(e).__name__}: {e}"

    async def asend(self, text: str) -> AsyncIterator[Event]:
        """`send` off the event loop: events arrive as generation goes, the loop stays free.

        Cancelling the task (or leaving the loop early) stops generation within one step.
        """
        async for event in self._off_loop(_user_message(text)):
            yield event

    async def asend_tool_result(self, *results: object) -> AsyncIterator[Event]:
        """`send_tool_result` off the event loop."""
        async for event in self._off_loop(_tool_messages(results)):
            yield event

    async def _off_loop(self, new: list[dict[str, Any]]) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | _End] = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            end = _End()
            try:
                for event in self._turn(new, stop):
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
        self, new: list[dict[str, Any]], stop: threading.Event | None = None
    ) -> Generator[Event, None, None]:
        with self._turn_lock():
            self._cancel.clear()
            yield from self._generate(new, stop or self._cancel)

    def _turn_lock(self) -> _Held:
        if not self._busy.acquire(blocking=False):
            raise ChatBusyError(
                "this Chat is generating a turn already (in another thread, or a stream not "
                "finished); use one Chat per thread, or finish or close the stream first"
            )
        return _Held(self._busy)

    def _generate(self, new: list[dict[str, Any]], stop: threading.Event) -> Iterator[Event]:
        self.messages += new
        try:
            prompt = self.render()
        except Exception:
            del self.messages[-len(new) :]
            raise
        reused = self._reuse(prompt)
        s, tok = self.sampling, self.tokenizer
        stream = _EventStream(tok, prompt)
        generated: list[int] = []
        lookup = LookupStats()
        finish = "length"
        mx.reset_peak_memory()
        start = first = time.perf_counter()
        steps = generate_step(
            mx.array(prompt[reused:], dtype=mx.uint32),
            self.model,
            max_tokens=s.max_tokens,
            sampler=make_sampler(s.temperature, s.top_p, s.top_k, s.min_p),
            logits_processors=make_logits_processors(s.repetition_penalty),
            prompt_cache=self._cache,
            prompt_lookup=self.prompt_lookup,
            lookup_context=prompt[:reused] if self.prompt_lookup else (),
            lookup_stats=lookup,
        )
        try:
            for token, _ in steps:
                if not generated:
                    first = time.perf_counter()
                generated.append(token)
                if token in tok.eos_token_ids:
                    finish = "stop"
                    break
                yield from stream.feed(token)
                if stop.is_set() or self._cancel.is_set():
                    finish = "cancelled"
                    break
        except GeneratorExit:  # the caller closed the stream: a cancel too
            self._record(len(new), generated, "cancelled")
            raise
        except BaseException:  # an error: the history is left as before the turn
            del self.messages[-len(new) :]
            raise
        finally:
            steps.close()
            self._settle(prompt + generated)
        self._record(len(new), generated, finish)
        yield from stream.flush()

        end, n = time.perf_counter(), len(generated)
        ttft = first - start
        self.last = TurnStats(
            prompt_tokens=len(prompt),
            cached_tokens=reused,
            prefill_tokens=len(prompt) - reused,
            generation_tokens=n,
            thinking_tokens=stream.thinking_tokens,
            thinking_seconds=stream.thinking_seconds(end),
            time_to_first_token=ttft,
            prompt_tps=(len(prompt) - reused) / ttft if ttft > 0 else 0.0,
            generation_tps=(n - 1) / (end - first) if n > 1 and end > first else 0.0,
            seconds=end - start,
            peak_memory=mx.get_peak_memory() / 1e9,
            drafted_tokens=lookup.drafted,
            accepted_tokens=lookup.accepted,
        )
        yield Done(
            self.last,
            finish,
            "".join(stream.thinking).strip(),
            "".join(stream.answer).strip(),
            tuple(stream.calls),
        )

    def _record(self, n_new: int, generated: list[int], finish: str) -> None:
        """Add the assistant message (marked if interrupted), or drop a cancelled turn."""
        if finish == "cancelled" and self.on_cancel == "drop":
            del self.messages[-n_new:]
            return
        body = self.tokenizer.decode(generated[:-1] if finish == "stop" else generated)
        thinking, answer = split_thinking(body)
        message: dict[str, Any] = {"role": "assistant", "content": body}
        if thinking and not self.keep_thinking:
            message["content"] = answer
        if finish == "cancelled":
            message["interrupted"] = True
        self.messages.append(message)

    def _reuse(self, prompt: list[int]) -> int:
        """Trim the cache to its common prefix with `prompt`; returns how many ids need no prefill.

        The cache holds full[:keep] + full[keep + dropped:]. A change past the dropped span trims
        back to it; a change inside it keeps only the system block.
        """
        if self._cache is None:
            window = self.max_context
            starts = [i for i, t in enumerate(prompt) if t == self.tokenizer.im_start_id]
            keep = starts[1] if len(starts) > 1 else 0  # the system block, up to the first turn
            keep = min(keep, window // 2) if window else keep
            self._cache = self.model.make_cache(
                window,
                keep,
                bits=self.kv["bits"],
                group_size=self.kv["group_size"],
                quantize_after=self.kv["start"],
            )
        n = 0
        for a, b in zip(self._full, prompt[:-1], strict=False):  # leave one id to prefill
            if a != b:
                break
            n += 1
        keep, dropped = self._cache[0].keep, self._cache[0].dropped
        if dropped and n < keep + dropped:
            n, dropped = min(n, keep), 0
        for c in self._cache:
            c.trim(c.offset - (n - dropped))
            c.dropped = dropped
        self._full = prompt[:n]
        return n

    def _settle(self, ids: list[int]) -> None:
        """Record what the cache holds after a turn, however it ended (all layers alike)."""
        assert self._cache is not None
        n = min(c.offset for c in self._cache)
        for c in self._cache:
            c.trim(c.offset - n)
        self._full = ids[: n + self._cache[0].dropped]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "model": self.model_name,
            "think": self.think,
            "keep_thinking": self.keep_thinking,
            "sampling": asdict(self.sampling),
            "tools": self.tools,
            "messages": self.messages,
        }

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (messages, mode, model, sampling, tools)."""
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
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
        return chat

    def restore(self, path: str | Path) -> dict[str, Any]:
        """Replace the conversation, mode and sampling with a saved one; on error nothing changes.

        Raises:
            ChatFileError: unreadable, not JSON, or not a conversation this program saved.
        """
        path = Path(path).expanduser()
        with self._turn_lock():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ChatFileError(f"{path}: cannot read a conversation ({e})") from None
            try:
                messages, think, keep_thinking, sampling, tools = _validate(data)
            except ValueError as e:
                raise ChatFileError(f"{path}: not a smollm3-mlx conversation ({e})") from None
            self.messages, self.think, self.keep_thinking = messages, think, keep_thinking
            self.sampling, self.tools, self.functions = sampling, tools, {}
        return dict(data)


class _EventStream:
    """Generated ids -> events: thinking and answer by the think tag ids, tool calls cut out."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int]):
        self.detokenizer = tokenizer.detokenizer()
        self.splitter = tokenizer.think_splitter(prompt)
        self.call_start = tokenizer.token_to_id(TOOL_CALL_START)
        self.call_end = tokenizer.token_to_id(TOOL_CALL_END)
        self.call: str | None = None  # the text of an open tool call
        self.thinking: list[str] = []
        self.answer: list[str] = []
        self.calls: list[ToolCall] = []
        self.thinking_tokens = 0
        self.think_start: float | None = None
        self.think_end: float | None = None

    def feed(self, token: int) -> list[Event]:
        self.detokenizer.add_token(token)
        was_thinking = self.splitter.thinking
        events = self._events(token, self.detokenizer.last_segment)
        if was_thinking and self.splitter.thinking:  # inside the block, tags excluded
            self.thinking_tokens += 1
        elif self.splitter.thinking != was_thinking:  # a think tag
            now = time.perf_counter()
            self.think_start, self.think_end = (
                (now, None) if self.splitter.thinking else (self.think_start, now)
            )
        return events

    def flush(self) -> list[Event]:
        self.detokenizer.finalize()
        events = self._events(-1, self.detokenizer.last_segment)
        if self.call is not None:
            events.append(ToolCallError(self.call.strip(), "the turn ended inside the tool call"))
            self.call = None
        return events

    def thinking_seconds(self, end: float) -> float:
        if not self.thinking_tokens or self.think_start is None:
            return 0.0
        return (self.think_end or end) - self.think_start

    def _events(self, token: int, text: str) -> list[Event]:
        events: list[Event] = []
        for kind, piece in self.splitter.feed(token, text):
            if kind == "thinking":
                self.thinking.append(piece)
                events.append(ThinkingDelta(piece))
                continue
            if token == self.call_start and self.call is None:
                before, _, self.call = piece.partition(TOOL_CALL_START)
                piece = before
            elif token == self.call_end and self.call is not None:
                inside, _, piece = piece.partition(TOOL_CALL_END)
                events.append(self._parse(self.call + inside))
                self.call = None
            elif self.call is not None:
                self.call += piece
                piece = ""
            if piece:
                self.answer.append(piece)
                events.append(AnswerDelta(piece))
        return events

    def _parse(self, raw: str) -> ToolCall | ToolCallError:
        try:
            call = json.loads(raw)
        except ValueError as e:
            return ToolCallError(raw.strip(), f"not JSON: {e}")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ToolCallError(raw.strip(), 'not {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments") or {}
        if not isinstance(arguments, dict):
            return ToolCallError(raw.strip(), "its arguments are not a JSON object")
        self.calls.append(ToolCall(call["name"], arguments))
        return self.calls[-1]


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


def _user_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _tool_messages(results: tuple[object, ...]) -> list[dict[str, Any]]:
    """Tool results as messages (strings as they are, anything else as JSON)."""
    if not results:  # a turn adds at least one message: an error removes what it added
        raise ValueError("send_tool_result needs at least one result")
    return [{"role": "tool", "content": _as_text(r)} for r in results]


def _as_text(result: object) -> str:
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


def _json_type(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [_json_type(a) for a in args if a is not type(None)]
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"type": _JSON_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (list, tuple, Sequence) and args:
        return {"type": "array", "items": _json_type(args[0])}
    if hint in _JSON_TYPES or origin in _JSON_TYPES:
        return {"type": _JSON_TYPES[origin or hint]}
    raise ValueError(f"no JSON type for {hint!r}")


def tool_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a Python function, from its type hints and Google-style docstring.

    Raises:
        ValueError: a parameter without a type hint, of a type JSON has no name for, or *args.
    """
    name = function.__name__
    doc = inspect.getdoc(function) or ""
    summary = " ".join(doc.split("\n\n")[0].split()) if doc else ""
    args_doc = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    described = dict(
        re.findall(
            r"^[ \t]+(\w+)(?: \([^)]*\))?:[ \t]*(.*)$", args_doc[1] if args_doc else "", re.M
        )
    )
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for p in inspect.signature(function).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"tool {name}: *{p.name} cannot be described to the model")
        if p.name not in hints:
            raise ValueError(f"tool {name}: parameter {p.name} has no type hint")
        try:
            properties[p.name] = _json_type(hints[p.name])
        except ValueError as e:
            raise ValueError(f"tool {name}: parameter {p.name}: {e}") from None
        if p.name in described:
            properties[p.name]["description"] = described[p.name]
        if p.default is p.empty:
            required.append(p.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"name": name, "description": summary, "parameters": parameters}


def _validate(
    data: Any,
) -> tuple[list[dict[str, Any]], bool, bool, Sampling, list[dict[str, Any]] | None]:
    """(messages, think, keep_thinking, sampling, tools) of a saved conversation, or ValueError."""

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ValueError(problem)

    need(isinstance(data, dict) and data.get("format") == FILE_FORMAT, f"no {FILE_FORMAT!r}")
    need(data.get("version") == FILE_VERSION, f"version {data.get('version')!r}, not 1")
    messages, sampling, tools = data.get("messages"), data.get("sampling"), data.get("tools")
    need(isinstance(messages, list), "'messages' is not a list")
    for i, m in enumerate(messages):
        need(isinstance(m, dict) and m.get("role") in ROLES, f"message {i} has no known role")
        need(isinstance(m.get("content"), str), f"message {i} has no text content")
    for key in ("think", "keep_thinking"):
        need(isinstance(data.get(key), bool), f"{key!r} is not true or false")
    types_ = {f.name: f.type for f in fields(Sampling)}
    need(isinstance(sampling, dict) and set(sampling) <= set(types_), "'sampling' is not known")
    for k, v in sampling.items():
        need(type(v) in (int, float), f"sampling {k!r} is not a number")
    need(tools is None or isinstance(tools, list), "'tools' is not a list")
    for i, t in enumerate(tools or ()):
        need(isinstance(t, dict) and isinstance(t.get("name"), str), f"tool {i} has no name")
    values: dict[str, Any] = {
        k: (int if types_[k] == "int" else float)(v) for k, v in sampling.items()
    }
    sampling = Sampling(**values)
    return [dict(m) for m in messages], data["think"], data["keep_thinking"], sampling, tools
