"""OpenAI replies from generated ids: reasoning and answer split, tool calls with ids, stop
strings, logprobs, usage; the `Shape` every dialect gives its replies (the server's one answer
path drives it), and chat's and completions' shapes.

Imports no MLX and no HTTP stack.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..events import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    AnswerDelta,
    EventParser,
    ThinkingDelta,
    ToolCall,
    ToolCallError,
)
from .request import Settings, error_body

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass
class Delta:
    """What one step adds to the reply."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls or self.logprobs)

    def chat(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.reasoning:
            d["reasoning_content"] = d["reasoning"] = self.reasoning
        if self.content:
            d["content"] = self.content
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        return d


class _StopMatcher:
    """Cuts text at the first stop string, holding back a tail that may still begin one."""

    def __init__(self, stop: Sequence[str]):
        self.stop, self.pending, self.hit = tuple(stop), "", False
        self.matched: str | None = None  # the stop string met

    def feed(self, text: str) -> str:
        if self.hit or not self.stop:
            return "" if self.hit else text
        self.pending += text
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.hit = True
            out, self.pending = self.pending[:at], ""
            return out
        keep = max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
             if s.startswith(self.pending[-k:])),
            default=0,
        )  # fmt: skip
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class _Trim:
    """Streams a text with its leading and trailing whitespace removed, as the whole would be."""

    def __init__(self, on: bool = True):
        self.on, self.started, self.held = on, False, ""

    def feed(self, text: str) -> str:
        if not self.on:
            return text
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = (self.held + text).rstrip()
        self.held = (self.held + text)[len(body) :]
        return body


class Reply:
    """Generated ids -> Deltas: reasoning and answer split by the think tags, tool calls cut out
    and given ids, stop strings applied to the answer, logprobs of the answer's tokens.

    Args:
        tokenizer: the model's tokenizer.
        prompt: the prompt's ids (a prompt that ends inside <think> starts in reasoning).
        stop: stop strings, applied to the answer text.
        top_logprobs: None for no logprobs, else how many alternatives per token.
        chat: split reasoning and tool calls (chat completions); False: plain text.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt: Sequence[int],
        *,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
        chat: bool = True,
    ):
        self.tokenizer, self.top_logprobs, self.chat = tokenizer, top_logprobs, chat
        self.parser = EventParser(tokenizer, prompt) if chat else None
        self.detokenizer = tokenizer.detokenizer()
        self.thinking = chat and tokenizer.think_splitter(prompt).thinking
        self.tags = {tokenizer.think_start_id, tokenizer.think_end_id} if chat else set()
        self.stop = _StopMatcher(stop)
        self.trim_content, self.trim_reasoning = _Trim(chat), _Trim(chat)
        self.usage = Usage(prompt_tokens=len(prompt))
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        # Logprobs wait until the content holds their token's text (a trimmed, held or cut text
        # never gets one): (entry, characters of content it stands for).
        self._pending: list[tuple[dict[str, Any], int]] = []
        self._content_chars = self._logprob_chars = 0

    @property
    def stopped(self) -> bool:
        """A stop string was met: generation should end."""
        return self.stop.hit

    def feed(self, token: int, logprob: float | None = None, top: Sequence = ()) -> Delta:
        """One generated id (end of turn excluded), with its logprob and top alternatives."""
        delta = Delta()
        if self.stopped:
            return delta
        self.usage.completion_tokens += 1
        entry = None
        if token in self.tags:
            self.thinking = token == self.tokenizer.think_start_id
        elif self.thinking:
            self.usage.reasoning_tokens += 1
        elif logprob is not None and self.top_logprobs is not None:
            entry = self._logprob(token, logprob, top)
        started = self.trim_content.started
        if self.parser is None:
            self.detokenizer.add_token(token)
            self._answer(delta, self.detokenizer.last_segment)
        else:
            self._events(delta, self.parser.feed(token))
            calls = (self.parser.call_start, self.parser.call_end)
            if token in calls or self.parser.call is not None:
                entry = None  # a tool call's token: not content
        if entry is not None:
            text = entry["token"] if started else entry["token"].lstrip()
            if text:  # leading whitespace, which the content trims, has no logprob either
                self._pending.append((entry, len(text)))
        self._release(delta)
        return delta

    def flush(self) -> Delta:
        """The text still held back, once generation has ended."""
        delta = Delta()
        if self.parser is None:
            self.detokenizer.finalize()
            self._answer(delta, self.detokenizer.last_segment)
        else:
            self._events(delta, self.parser.flush(), closed=False)
        text = self.trim_content.feed(self.stop.flush())
        delta.content += text
        self.content.append(text)
        self._content_chars += len(text)
        self._release(delta)
        self._pending = []  # their text never reached the content (trimmed, or past a stop)
        return delta

    def _release(self, delta: Delta) -> None:
        """The pending logprobs whose text the content now holds, in order."""
        while self._pending:
            entry, size = self._pending[0]
            if self._logprob_chars + size > self._content_chars:
                return
            self._pending.pop(0)
            self._logprob_chars += size
            delta.logprobs.append(entry)
            self.logprobs.append(entry)

    def finish_reason(self, engine_reason: str) -> str:
        if self.stopped:
            return "stop"
        if self.tool_calls and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    def _events(self, delta: Delta, events: Sequence[Any], closed: bool = True) -> None:
        """Events into the delta; `closed=False`: at the end, where a call error is a call the
        turn ended inside (its `</tool_call>` never written)."""
        for e in events:
            if isinstance(e, ThinkingDelta):
                text = self.trim_reasoning.feed(e.text)
                delta.reasoning += text
                self.reasoning.append(text)
            elif isinstance(e, AnswerDelta):
                self._answer(delta, e.text)
            elif isinstance(e, ToolCall) and not self.stopped:
                call = {
                    "index": len(self.tool_calls),
                    "id": new_id("call_"),
                    "type": "function",
                    "function": {
                        "name": e.name,
                        "arguments": json.dumps(e.arguments, ensure_ascii=False),
                    },
                }
                self.tool_calls.append(call)
                delta.tool_calls.append(call)
            elif isinstance(e, ToolCallError):  # not a valid call: the client sees what was written
                end = TOOL_CALL_END if closed else ""
                self._answer(delta, f"{TOOL_CALL_START}\n{e.text}\n{end}".rstrip())

    def _answer(self, delta: Delta, text: str) -> None:
        text = self.trim_content.feed(self.stop.feed(text))
        delta.content += text
        self.content.append(text)
        self._content_chars += len(text)

    def _logprob(self, token: int, logprob: float, top: Sequence) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            s = self.tokenizer.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}


def chat_response(meta: dict[str, Any], reply: Reply, finish: str) -> dict[str, Any]:
    """A whole chat.completion."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content) or None}
    if reply.reasoning:
        message["reasoning_content"] = message["reasoning"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in c.items() if k != "index"} for c in reply.tool_calls
        ]
    logprobs = {"content": reply.logprobs} if reply.top_logprobs is not None else None
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": reply.usage.body()}


def chat_chunk(
    meta: dict[str, Any], delta: Delta | None, finish: str | None, usage: bool
) -> dict[str, Any]:
    """A chat.completion.chunk (with "usage": null when the last chunk will carry usage)."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": delta.chat() if delta else {},
        "logprobs": {"content": delta.logprobs} if delta and delta.logprobs else None,
        "finish_reason": finish,
    }
    chunk = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    return {**chunk, "usage": None} if usage else chunk


def text_response(meta: dict[str, Any], reply: Reply, finish: str) -> dict[str, Any]:
    """A whole text_completion."""
    choice = {
        "index": 0,
        "text": "".join(reply.content),
        "logprobs": legacy_logprobs(reply, reply.logprobs),
        "finish_reason": finish,
    }
    return {**meta, "object": "text_completion", "choices": [choice], "usage": reply.usage.body()}


def text_chunk(
    meta: dict[str, Any], reply: Reply, delta: Delta | None, finish: str | None, usage: bool
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "text": delta.content if delta else "",
        "logprobs": legacy_logprobs(reply, delta.logprobs) if delta and delta.logprobs else None,
        "finish_reason": finish,
    }
    chunk = {**meta, "object": "text_completion", "choices": [choice]}
    return {**chunk, "usage": None} if usage else chunk


def legacy_logprobs(reply: Reply, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """/v1/completions' older logprobs layout."""
    if reply.top_logprobs is None:
        return None
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


Sse = tuple[
    str | None, Any
]  # a server-sent event: its name (None: none), its JSON data or "[DONE]"


class Shape:
    """One reply in one dialect: `opened` once the prompt is in, `delta` for each Delta of the
    reply, then `closed` with the finish reason; or `whole` once, for a reply not streamed.
    `failed` is an error met once the stream began (its status line is sent already)."""

    def __init__(self, reply: Reply):
        self.reply = reply

    def opened(self) -> list[Sse]:
        return []

    def delta(self, delta: Delta) -> list[Sse]:
        raise NotImplementedError

    def closed(self, finish: str) -> list[Sse]:
        raise NotImplementedError

    def whole(self, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def failed(self, status: int, message: str) -> list[Sse]:
        raise NotImplementedError


@dataclass(frozen=True)
class Plan:
    """What every answering route runs, whichever dialect its body came in: the prompt's ids,
    the settings, the constraints' processors and the reply that reads the generated ids."""

    prompt: list[int]
    settings: Settings
    processors: list[Any]
    reply: Reply


class ChatShape(Shape):
    """A chat.completion, or its chunks: the role first, usage last when asked, then [DONE]."""

    def __init__(self, reply: Reply, meta: dict[str, Any], usage: bool):
        super().__init__(reply)
        self.meta, self.usage = meta, usage

    def chunk(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        return chat_chunk(self.meta, delta, finish, self.usage)

    def opened(self) -> list[Sse]:
        first = self.chunk(None, None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return [(None, first)]

    def delta(self, delta: Delta) -> list[Sse]:
        return [(None, self.chunk(delta, None))]

    def closed(self, finish: str) -> list[Sse]:
        usage = {**self.chunk(None, None), "choices": [], "usage": self.reply.usage.body()}
        return [
            (None, self.chunk(None, finish)),
            *([(None, usage)] if self.usage else []),
            (None, "[DONE]"),
        ]

    def whole(self, finish: str) -> dict[str, Any]:
        return chat_response(self.meta, self.reply, finish)

    def failed(self, status: int, message: str) -> list[Sse]:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return [(None, error_body(message, kind))]


class TextShape(ChatShape):
    """A text_completion, or its chunks."""

    def chunk(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        return text_chunk(self.meta, self.reply, delta, finish, self.usage)

    def opened(self) -> list[Sse]:
        return []

    def whole(self, finish: str) -> dict[str, Any]:
        return text_response(self.meta, self.reply, finish)
