"""A conversation's messages and saved file: the messages a Chat adds (the text boundary for the
API: what is not text becomes U+FFFD, with one NotTextWarning), the file's format, the checks
every field passes, and how a chat file or a prompt-cache file's conversation is read.

A chat file is JSON (`Chat.save`). Version 2 keeps each assistant turn's structure apart, as
`Chat` holds it: `content` (the answer), `reasoning_content` (the thinking), `tool_calls`
([{"name": ..., "arguments": {...}}]) and `reasoning_open` (the turn stopped inside its
thinking). The chat template writes the tags from that structure (`tokenizer.assistant_text`);
every text in it, like every other text of the file, is plain text, never a control token.
Version 1 files still load: their assistant messages are one text, read as plain text.

A file is refused in one line (`ChatFileError`), the conversation untouched, when it is not a
regular file (a FIFO, a device), larger than MAX_FILE_BYTES, nested deeper than MAX_DEPTH, not
UTF-8 JSON, or any field is missing or wrong: the tools and tool choice are checked by the
functions a turn uses, so that a file that loads can go on. Lone surrogates (`"\\ud800"`) in its
strings are read as U+FFFD (`tokenizer.valid_text`).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .files import parse_json, write_atomic
from .sample import Sampling
from .tokenizer import CALL_END, CALL_START, STRUCTURE_KEYS, check_assistant, valid_text
from .tools import as_text, tool_schemas
from .turn import THINK_END, THINK_START

if TYPE_CHECKING:
    from .cache import KVSettings, PromptCache
    from .constrain import ToolChoice
    from .events import Event, EventParser, ToolCallError
    from .model import Model
    from .tokenizer import Tokenizer

FILE_FORMAT, FILE_VERSION = "smollm3-mlx-chat", 2
READ_VERSIONS = (1, 2)
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "interrupted"})  # what any saved message may hold
ASSISTANT_KEYS = MESSAGE_KEYS | set(STRUCTURE_KEYS)  # and an assistant's, from version 2
MAX_FILE_BYTES = 64 * 2**20  # a 128K-token conversation is well under 1 MB
MAX_DEPTH = 64  # objects and lists, one inside another (tool schemas nest a few levels)


class ChatFileError(ValueError):
    """A conversation file that cannot be loaded; one line naming the file and the problem."""


@dataclass(frozen=True)
class SavedChat:
    """What a chat file holds, checked."""

    model: str  # the model it was saved with
    messages: list[dict[str, Any]]
    think: bool
    keep_thinking: bool
    sampling: Sampling
    tools: list[dict[str, Any]] | None
    settings: dict[str, Any]  # those of SAVED_SETTINGS the file holds (older files hold none)


class Saving(Protocol):
    """What a saved conversation is made of (a Chat's attributes)."""

    model_name: str
    think: bool
    keep_thinking: bool
    sampling: Sampling
    tools: list[dict[str, Any]] | None
    messages: list[dict[str, Any]]


def file_dict(chat: Saving) -> dict[str, Any]:
    """The JSON object `Chat.save` writes (the SAVED_SETTINGS read off `chat` too)."""
    return {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "model": chat.model_name,
        "think": chat.think,
        "keep_thinking": chat.keep_thinking,
        "sampling": asdict(chat.sampling),
        "tools": chat.tools,
        **{key: getattr(chat, key) for key in SAVED_SETTINGS},
        "messages": chat.messages,
    }


def write_chat_file(path: str | Path, data: dict[str, Any]) -> Path:
    """Write `data` (from `file_dict`) as JSON, whole or not at all (`files.write_atomic`).

    Raises:
        OSError: the file could not be written; an earlier file is as it was.
    """
    path = Path(path).expanduser()
    text = json.dumps(_valid(data), indent=2, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode())
    return path


def read_chat_file(
    path: str | Path, tokenizer: Tokenizer, *, tool_choice: Any = "auto"
) -> SavedChat:
    """The conversation saved in `path`, every field checked.

    Args:
        path: a file `Chat.save` wrote.
        tokenizer: the model's tokenizer (the tools and tool choice are checked against it).
        tool_choice: the tool choice the chat goes on with if the file holds none.

    Raises:
        ChatFileError: unreadable, not JSON, or not a conversation this program saved.
    """
    path = Path(path).expanduser()
    data = read_json(path, ChatFileError, "a conversation")
    try:
        return check_chat(data, tokenizer, tool_choice=tool_choice)
    except ValueError as e:
        raise ChatFileError(f"{path}: not a smollm3-mlx conversation ({e})") from None


def read_json(path: Path, error: type[ValueError], what: str) -> Any:
    """The JSON value of a file we did not write: refused in one line (`error`) if it is not a
    regular file, larger than MAX_FILE_BYTES, not UTF-8 JSON, or nested past MAX_DEPTH."""
    try:
        raw = _read_regular(path)
        return loads_bounded(raw.decode("utf-8"))
    except OSError as e:
        why = e.strerror or str(e)
        raise error(f"{path}: cannot read {what} ({why})") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError among them
        raise error(f"{path}: cannot read {what} ({_one_line(e)})") from None


def loads_bounded(text: str) -> Any:
    """JSON we did not write, within MAX_FILE_BYTES and MAX_DEPTH (`files.parse_json`), a
    ValueError otherwise; lone surrogates in its strings become U+FFFD."""
    if len(text) > MAX_FILE_BYTES:
        raise ValueError(f"more than {MAX_FILE_BYTES} characters")
    return _valid(parse_json(text, max_depth=MAX_DEPTH))


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file of at most MAX_FILE_BYTES: a FIFO or a
    device is refused before a byte is read (opening does not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(0, f"larger than {MAX_FILE_BYTES // 2**20} MiB")
    return data


def _valid(value: Any) -> Any:
    """A JSON value with every string (keys too) made valid text (`valid_text`)."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, dict):
        return {_valid(k): _valid(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid(v) for v in value]
    return value


def _one_line(e: BaseException) -> str:
    return str(e).strip().split("\n")[0] or type(e).__name__


def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def check_chat(data: Any, tokenizer: Tokenizer, *, tool_choice: Any = "auto") -> SavedChat:
    """A saved conversation checked field by field, or a ValueError naming the first field
    that is missing or wrong."""
    _need(isinstance(data, dict), "not a JSON object")
    _need(data.get("format") == FILE_FORMAT, f'no "format": {FILE_FORMAT!r}')
    version = data.get("version")
    _need(type(version) is int and version in READ_VERSIONS, f"version {version!r:.20}, not 2")
    _need(isinstance(data.get("model"), str), "'model' is missing or not a string")
    for key in ("think", "keep_thinking"):
        _need(isinstance(data.get(key), bool), f"{key!r} is missing or not true or false")
    messages = check_messages(data.get("messages"), structured=version >= 2)
    sampling = data.get("sampling")
    _need(isinstance(sampling, dict), "'sampling' is missing or not an object")
    unknown = sorted(set(sampling) - {f.name for f in fields(Sampling)})
    _need(not unknown, f"unknown sampling field {unknown[0]!r:.30}" if unknown else "")
    try:
        sampling = Sampling(**sampling)  # its own checks: NaN, a negative temperature, top_p 7...
    except ValueError as e:
        raise ValueError(f"sampling: {e}") from None
    settings = check_settings(data)
    tools = check_tools(data.get("tools"), settings.get("tool_choice", tool_choice), tokenizer)
    return SavedChat(
        data["model"], messages, data["think"], data["keep_thinking"], sampling, tools, settings
    )


def check_messages(messages: Any, *, structured: bool = True) -> list[dict[str, Any]]:
    """Copies of saved messages, or a ValueError naming the first that is wrong. `structured`:
    assistant messages may keep reasoning and tool calls apart (version 2)."""
    _need(isinstance(messages, list), "'messages' is missing or not a list")
    for i, m in enumerate(messages):
        _need(isinstance(m, dict), f"message {i} is not an object")
        _need(m.get("role") in ROLES, f"message {i} has no known role")
        _need(isinstance(m.get("content"), str), f"message {i} has no text content")
        _need(type(m.get("interrupted", False)) is bool, f"message {i}: 'interrupted' is not bool")
        allowed = ASSISTANT_KEYS if structured and m["role"] == "assistant" else MESSAGE_KEYS
        extra = sorted(set(m) - allowed)
        _need(not extra, f"message {i} has an unknown field {extra[0]!r:.30}" if extra else "")
        if m["role"] == "assistant":
            try:
                check_assistant(m)
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
    return [json.loads(json.dumps(m)) for m in messages]  # nothing shared with the caller


def check_tools(tools: Any, tool_choice: Any, tokenizer: Tokenizer) -> list[dict[str, Any]] | None:
    """Saved tool schemas, checked as a turn will use them with `tool_choice` (the grammar of
    their calls is built now), or a ValueError."""
    from .constrain import ConstraintError, make_answer_constraint

    _need(tools is None or isinstance(tools, list), "'tools' is not a list")
    for i, t in enumerate(tools or ()):
        _need(isinstance(t, dict) and isinstance(t.get("name"), str), f"tool {i} has no name")
    try:
        schemas, _ = tool_schemas(tools)
        make_answer_constraint(tokenizer, None, tools=schemas or None, tool_choice=tool_choice)
    except (ConstraintError, TypeError, ValueError) as e:
        raise ValueError(f"tools: {_one_line(e)}"[:200]) from None
    return schemas or None


def _whole_or_none(v: Any) -> bool:
    return v is None or (type(v) is int and v >= 0)


def _is_tool_choice(value: Any) -> bool:
    from .constrain import ConstraintError, tool_choice_mode

    try:
        tool_choice_mode(value)
    except ConstraintError:
        return False
    return True


SAVED_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "think_budget": (_whole_or_none, "a whole number >= 0 or null"),
    "handoff": (lambda v: isinstance(v, str), "a string"),
    "tool_choice": (_is_tool_choice, 'a string or {"type": "function", "function": {"name": ...}}'),
}


def check_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The saved Chat settings a file holds (files from before them hold none), or a
    ValueError naming the first that is wrong."""
    settings = {k: data[k] for k in SAVED_SETTINGS if k in data}
    for key, value in settings.items():
        ok, meaning = SAVED_SETTINGS[key]
        if not ok(value):
            raise ValueError(f"{key!r} must be {meaning}, not {value!r:.40}")
    return settings


# The messages a Chat adds, in the shape the file keeps


class NotTextWarning(UserWarning):
    """Text given to a Chat held what is not text (lone surrogates: bytes that were not UTF-8,
    or half a pair); it was read with U+FFFD in their place (`tokenizer.valid_text`)."""


def checked_text(value: str, what: str) -> str:
    """`value` as valid text; where it was not, one NotTextWarning (Python shows a warning once
    per place it comes from)."""
    text = valid_text(value)
    if text != value:
        warnings.warn(
            f"{what} is not valid text (bytes that are not UTF-8, or a lone surrogate): "
            "read with U+FFFD in their place",
            NotTextWarning,
            stacklevel=2,
        )
    return text


def kind(value: object) -> str:
    """A value's type and a glimpse of it, for an error message: "int (123)"."""
    return f"{type(value).__name__} ({value!r:.40})"


def user_message(text: str) -> list[dict[str, Any]]:
    if not isinstance(text, str):  # anything else would be saved as a file no one can load
        raise TypeError(f"the user's message must be a str, not {kind(text)}")
    return [{"role": "user", "content": checked_text(text, "the user's message")}]


def tool_messages(results: tuple[object, ...]) -> list[dict[str, Any]]:
    """Tool results as messages (strings as they are, anything else as JSON)."""
    if not results:  # a turn adds at least one message: an error removes what it added
        raise ValueError("send_tool_result needs at least one result")
    return [{"role": "tool", "content": checked_text(as_text(r), "a tool result")} for r in results]


def user_turn(
    text: str,
    prefill: str | None = None,
    response_format: Any = None,
    think_budget: int | None = None,
    tool_choice: ToolChoice | None = None,
) -> tuple[list[dict[str, Any]], TurnRequest]:
    """The messages a `send` adds, and what it asks of its turn (`asend` takes the same)."""
    new = user_message(text)
    if prefill is not None:
        new.append(opened_answer(prefill))
    return new, TurnRequest(response_format, think_budget, tool_choice, prefill is not None)


def tool_turn(
    results: tuple[object, ...], response_format: Any = None, tool_choice: ToolChoice | None = None
) -> tuple[list[dict[str, Any]], TurnRequest]:
    """The messages a `send_tool_result` adds, and its turn (`asend_tool_result` too)."""
    return tool_messages(results), TurnRequest(response_format, None, tool_choice)


@dataclass(frozen=True)
class TurnRequest:
    """What a call asks of one turn beyond the Chat's settings."""

    response_format: Any = None
    think_budget: int | None = None
    tool_choice: ToolChoice | None = None
    open_answer: bool = False  # the final message is an answer to continue (prefill, continue)


def opened_answer(prefill: str) -> dict[str, Any]:
    """The assistant message a prefill opens: the app writes the think tags it names (`<think>`
    and a first thought, `</think>`), as the model would; any other text is the answer."""
    if not isinstance(prefill, str):
        raise TypeError(f"prefill must be a str, not {kind(prefill)}")
    prefill = checked_text(prefill, "the prefill")
    head, think, rest = prefill.lstrip().partition(THINK_START)
    if not think or head:
        return {"role": "assistant", "content": prefill}
    reasoning, closed, answer = rest.partition(THINK_END)
    message = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
    return message if closed else {**message, "reasoning_open": True}


def assistant_message(
    parser: EventParser,
    errors: list[ToolCallError],
    unfinished: list[ToolCallError],
    *,
    keep_thinking: bool,
    had_reasoning: bool,
) -> dict[str, Any]:
    """The assistant message of a turn, with its structure as the ids had it: the thinking, the
    answer and the calls the model wrote with its tag tokens. A call that did not parse
    (`errors`), or that the turn left open (`unfinished`), stays in the answer as plain text.

    Args:
        parser: the turn's parser, flushed (a continued answer's start given to it).
        keep_thinking: keep the reasoning (else the answer alone, its leading space cut).
        had_reasoning: the continued answer had a think block (it may be empty).
    """
    message: dict[str, Any] = {"role": "assistant"}
    is_open, reasoning = parser.state.thinking, "".join(parser.thinking)
    wrote = reasoning or is_open or parser.think_start is not None or had_reasoning
    if keep_thinking and wrote:
        message["reasoning_content"] = reasoning
        message |= {"reasoning_open": True} if is_open else {}
    not_calls = [f"{CALL_START}\n{e.text}\n{CALL_END}" for e in errors]  # spaced as written
    not_calls += [f"{CALL_START}\n{e.text}" for e in unfinished]
    answer = "".join(parser.answer)
    answer = answer.lstrip() if wrote and "reasoning_content" not in message else answer
    message["content"] = answer + "\n".join(not_calls)
    if calls := parser.calls:
        message["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in calls]
    return message


def continued(parser: EventParser, answer: dict[str, Any]) -> list[Event]:
    """Give `parser` the assistant message `answer` that a turn continues (a prefill, a cut-off
    answer), as if it had parsed it; returns that message's events."""
    from .events import AnswerDelta, ThinkingDelta, ToolCall

    reasoning, content = answer.get("reasoning_content") or "", answer.get("content", "")
    calls = [ToolCall(c["name"], c["arguments"]) for c in answer.get("tool_calls") or ()]
    parser.thinking += [reasoning] if reasoning else []
    parser.answer += [content] if content else []
    parser.calls += calls
    events: list[Event] = [ThinkingDelta(reasoning)] if reasoning else []
    events += [AnswerDelta(content)] if content else []
    return [*events, *calls]


# A prompt-cache file's conversation


@dataclass(frozen=True)
class CachedConversation:
    """The conversation a prompt-cache file stands for; `think` None: not saved."""

    messages: list[dict[str, Any]]
    think: bool | None
    tools: list[dict[str, Any]] | None


def save_chat_cache(
    path: str | Path,
    model: Model,
    tokenizer: Tokenizer,
    pc: PromptCache,
    *,
    messages: list[dict[str, Any]],
    think: bool,
    tools: list[dict[str, Any]] | None,
) -> Path:
    """Write `pc` with the conversation it stands for (its "chat" metadata), atomically."""
    from .cache_file import fingerprint, save_prompt_cache

    fp = fingerprint(model, tokenizer, kv=pc.kv, window=pc.window, keep=pc.keep)
    conversation = json.dumps(_valid({"messages": messages, "think": think, "tools": tools}))
    return save_prompt_cache(path, pc, fp, extra={"chat": conversation})


def open_chat_cache(
    path: str | Path,
    model: Model,
    tokenizer: Tokenizer,
    *,
    kv: KVSettings,
    window: int | None,
    recompute: bool,
    tool_choice: Any,
) -> tuple[PromptCache | None, CachedConversation]:
    """The prompt cache a file holds (None on a mismatch, where `recompute`) and its
    conversation, checked as a chat file's is; the file is read once.

    Raises:
        PromptCacheMismatch, PromptCacheError: see `cache_file.open_prompt_cache`; corrupt
            conversation metadata is a PromptCacheError.
    """
    from .cache_file import PromptCacheError, fingerprint, open_prompt_cache

    expect = fingerprint(model, tokenizer, kv=kv, window=window)
    cache, meta = open_prompt_cache(path, model, expect=expect, recompute=recompute)
    try:
        saved = loads_bounded(meta.get("chat", '{"messages": []}'))
        _need(isinstance(saved, dict), "not a JSON object")
        think = saved.get("think")
        _need(think is None or isinstance(think, bool), "'think' is not true or false")
        messages = check_messages(saved.get("messages", []))
        tools = check_tools(saved.get("tools"), tool_choice, tokenizer)
    except ValueError as e:
        raise PromptCacheError(f"{path}: corrupt conversation metadata ({e})") from None
    return cache, CachedConversation(messages, think, tools)
