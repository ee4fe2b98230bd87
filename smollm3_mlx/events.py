"""The typed events an app receives from a turn, and the parser that makes them from token ids.

Nothing here imports MLX: a server or UI can match on these types without loading a model.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .turn import TOOL_CALL_END, TOOL_CALL_START, TurnIds, TurnState

if TYPE_CHECKING:
    from .tokenizer import StreamingDetokenizer, Tokenizer


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class AnswerDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call's arguments (JSON text) as it is generated; the complete ToolCall
    follows. The pieces of one call (same `index`, the call's place in the turn) add up to its
    arguments' JSON text."""

    index: int
    name: str
    arguments: str


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
    prefill_tokens: int  # read this turn: prompt_tokens - cached_tokens, fewer if cancelled
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
    answer_tokens: int = 0  # after the think block (tool calls included), end of turn excluded


@dataclass(frozen=True)
class Done:
    stats: TurnStats
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens) or "cancelled"
    thinking: str = ""
    answer: str = ""  # tool calls cut out
    tool_calls: tuple[ToolCall, ...] = ()
    parsed: Any = None  # the value of an answer held to a response format, once complete


@dataclass(frozen=True)
class Error:
    """A turn that failed and ends here, in place of Done: the conversation is as before it.

    kind "memory": an allocation failed (MLX's "[metal::malloc] ..." or MemoryError); the prompt
    cache was dropped (the next turn prefills again) and the process goes on.
    """

    message: str
    kind: str = "memory"


Event = ThinkingDelta | AnswerDelta | ToolCallDelta | ToolCall | ToolCallError | Done | Error
# The start of a call as SmolLM3 writes it (and a constraint holds it): name, then arguments.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of an assistant message's text."""
    m = re.match(r"\s*<think>(.*?)(?:</think>|$)(.*)", text, re.DOTALL)
    return (m[1].strip(), m[2].lstrip()) if m else ("", text)


class EventParser:
    """Generated ids -> events: thinking and answer split where the turn state says, tool calls
    cut out.

    Feed it every id generated after `prompt` (the end-of-turn id excluded) with its text, then
    `flush()` at the end of the turn; `done(stats, finish_reason)` gives the closing event with
    the whole text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int]):
        self.tokenizer = tokenizer
        self.detokenizer: StreamingDetokenizer | None = None  # for ids fed without their text
        self.state = TurnState(TurnIds.of(tokenizer), prompt)
        self.call_start, self.call_end = self.state.ids.call_start, self.state.ids.call_end
        self.call: str | None = None  # the text of an open tool call
        self.call_name: str | None = None  # its name, once written
        self.call_args = 0  # where its arguments start in self.call
        self.call_sent = 0  # how much of them went out as ToolCallDelta
        self.thinking: list[str] = []
        self.answer: list[str] = []
        self.calls: list[ToolCall] = []
        self.think_start: float | None = None
        self.think_end: float | None = None

    @property
    def thinking_tokens(self) -> int:
        return self.state.thinking_tokens

    @property
    def answer_tokens(self) -> int:
        return self.state.answer_tokens

    def feed(self, token: int, text: str | None = None) -> list[Event]:
        """The events of one id and the text it released (`GenerationResponse.text`, decoded
        where generation runs); without text, the parser decodes the id itself."""
        if text is None:
            if self.detokenizer is None:
                self.detokenizer = self.tokenizer.detokenizer()
            self.detokenizer.add_token(token)
            text = self.detokenizer.last_segment
        was_thinking = self.state.thinking
        events = self._events(token, text)
        if self.state.thinking != was_thinking:  # a think tag
            now = time.perf_counter()
            self.think_start, self.think_end = (
                (now, None) if self.state.thinking else (self.think_start, now)
            )
        return events

    def flush(self, text: str = "") -> list[Event]:
        """The events of the text released at the end (the last response's), and an unclosed
        tool call's error."""
        if self.detokenizer is not None:
            self.detokenizer.finalize()
            text += self.detokenizer.last_segment
        events = self._events(None, text)
        if self.call is not None:
            events.append(ToolCallError(self.call.strip(), "the turn ended inside the tool call"))
            self.call = None
        return events

    def done(self, stats: TurnStats, finish_reason: str, parsed: Any = None) -> Done:
        """The turn's last event: the thinking and the answer (tool calls cut out) in full."""
        return Done(
            stats,
            finish_reason,
            "".join(self.thinking).strip(),
            "".join(self.answer).strip(),
            tuple(self.calls),
            parsed,
        )

    def thinking_seconds(self, end: float) -> float:
        if not self.thinking_tokens or self.think_start is None:
            return 0.0
        return (self.think_end or end) - self.think_start

    def _events(self, token: int | None, text: str) -> list[Event]:
        events: list[Event] = []
        for kind, piece in self.state.split(token, text):
            if kind == "thinking":
                self.thinking.append(piece)
                events.append(ThinkingDelta(piece))
                continue
            if token == self.call_start and self.call is None:
                before, _, self.call = piece.partition(TOOL_CALL_START)
                self.call_name, piece = None, before
            elif token == self.call_end and self.call is not None:
                inside, _, piece = piece.partition(TOOL_CALL_END)
                self.call += inside
                events += self._call_delta(end=True)
                events.append(self._parse(self.call))
                self.call = None
            elif self.call is not None:
                self.call += piece
                events += self._call_delta()
                piece = ""
            if piece:
                self.answer.append(piece)
                events.append(AnswerDelta(piece))
        return events

    def _call_delta(self, end: bool = False) -> list[Event]:
        """The open call's arguments written since the last delta. Trailing braces and spaces
        wait for what follows: the call's own closing brace is not part of its arguments."""
        assert self.call is not None
        if self.call_name is None:
            m = _CALL_HEAD.match(self.call)
            if m is None:
                return []
            self.call_name, self.call_args, self.call_sent = json.loads(m[1]), m.end(), 0
        args = self.call[self.call_args :]
        if end:
            args = args.rstrip()
            args = args[:-1].rstrip() if args.endswith("}") else args
        else:
            args = args.rstrip("} \t\r\n")
        if len(args) <= self.call_sent:
            return []
        piece, self.call_sent = args[self.call_sent :], len(args)
        return [ToolCallDelta(len(self.calls), self.call_name, piece)]

    def _parse(self, raw: str) -> ToolCall | ToolCallError:
        from .files import parse_json  # the model wrote it: its nesting is bounded too

        try:
            call = parse_json(raw)
        except ValueError as e:
            return ToolCallError(raw.strip(), f"not JSON: {e}")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ToolCallError(raw.strip(), 'not {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments") or {}
        if not isinstance(arguments, dict):
            return ToolCallError(raw.strip(), "its arguments are not a JSON object")
        self.calls.append(ToolCall(call["name"], arguments))
        return self.calls[-1]
