"""Where a turn stands, read from its token ids, and where its text meets a stop string.

The one answer to "are we inside `<think>`?" that generation, Chat's events, the constraints and
the server's replies share: SmolLM3 marks the turn with its own ids (`<|im_start|>`, `<think>`,
`</think>`, `<tool_call>`, `</tool_call>`), so the state follows the ids, never the text.
Imports no MLX and nothing of the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# "start": an assistant header in think mode (the model may open `<think>`); "thinking": inside
# `<think>`; "close": right after `</think>`, where the template writes a newline; "answer": past
# that (or a prompt with no chat markup); "tool_call": inside `<tool_call>`, in the answer.
Phase = Literal["start", "thinking", "close", "answer", "tool_call"]


@dataclass(frozen=True)
class TurnIds:
    """The ids that mark a turn (None where the vocabulary has no such token)."""

    header: int | None = None  # <|im_start|>
    think_start: int | None = None
    think_end: int | None = None
    call_start: int | None = None
    call_end: int | None = None
    eos: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer: Any) -> TurnIds:
        """The marks of a `Tokenizer` (or anything with its ids and `token_to_id`)."""
        return cls(
            header=tokenizer.im_start_id,
            think_start=tokenizer.think_start_id,
            think_end=tokenizer.think_end_id,
            call_start=tokenizer.token_to_id(TOOL_CALL_START),
            call_end=tokenizer.token_to_id(TOOL_CALL_END),
            eos=frozenset(tokenizer.eos_token_ids),
        )

    @property
    def think_tags(self) -> frozenset[int]:
        return frozenset(i for i in (self.think_start, self.think_end) if i is not None)


class TurnState:
    """The phase of a turn (see `Phase`), advanced one id at a time.

    The prompt sets where it starts: its last header or think tag decides. Fed ids then move it:
    `<think>` opens a block from anywhere, `</think>` closes it, `<tool_call>` opens a call in
    the answer and `</tool_call>` ends it; an end-of-sequence id changes nothing.

    Attributes:
        phase: where the turn stands now.
        think_count: tokens in the current (or last) think block, its part in the prompt included
            (what a thinking budget counts).
        closed: past a think block: one closed in the prompt or since (or no chat markup at all).
        thinking_tokens: fed ids inside think blocks, tags excluded.
        answer_tokens: fed ids outside them, think tags and end-of-sequence ids excluded.
    """

    def __init__(self, ids: TurnIds, prompt: Sequence[int] = ()):
        self.ids = ids
        self.phase: Phase = "answer"
        self.think_count = 0
        marks = (ids.header, ids.think_start, ids.think_end)
        for i in range(len(prompt) - 1, -1, -1):
            if prompt[i] in marks:
                if prompt[i] == ids.think_start:
                    self.phase, self.think_count = "thinking", len(prompt) - i - 1
                elif prompt[i] == ids.think_end:
                    self.phase = "close" if i == len(prompt) - 1 else "answer"
                else:
                    self.phase = "start"
                break
        self.closed = self.phase in ("close", "answer")
        self.thinking_tokens = self.answer_tokens = 0

    @property
    def thinking(self) -> bool:
        return self.phase == "thinking"

    @property
    def answering(self) -> bool:
        """In the answer, a tool call's text included."""
        return self.phase in ("answer", "tool_call")

    def feed(self, token: int) -> Phase:
        """Advance past one generated id; returns the new phase."""
        ids = self.ids
        if token == ids.think_start:
            self.phase, self.think_count = "thinking", 0
        elif token == ids.think_end:
            self.phase, self.closed = "close", True
        elif self.phase == "thinking":
            self.think_count += 1
            self.thinking_tokens += 1
        elif token in ids.eos:
            pass
        else:
            self.answer_tokens += 1
            if token == ids.call_start and self.phase != "tool_call":
                self.phase = "tool_call"
            elif token == ids.call_end and self.phase == "tool_call":
                self.phase = "answer"
            elif self.phase != "tool_call":
                self.phase = "answer"
        return self.phase

    def split(self, token: int | None, text: str) -> list[tuple[str, str]]:
        """Feed `token` and label `text`, the text it released, "thinking" or "answer"; a think
        tag's own text is dropped (held-back text of earlier ids may arrive with it). With no
        token (None: the text held back at the end) the text is only labelled."""
        if token is None:
            return self._label(text)
        ids = self.ids
        tag = {ids.think_start: THINK_START, ids.think_end: THINK_END}.get(token)
        if tag is None:
            self.feed(token)  # only think tags change which side of the block we are on
            return self._label(text)
        before, _, after = text.partition(tag)
        out = self._label(before)
        self.feed(token)
        return out + self._label(after)

    def _label(self, text: str) -> list[tuple[str, str]]:
        return [("thinking" if self.thinking else "answer", text)] if text else []


class StopStrings:
    """Streamed text cut before the first stop string; a tail that may still begin one is held
    back until the next text shows whether it does.

    Args:
        stop: the stop strings (none: text passes as it comes).
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(stop)
        self.pending = ""  # received, not yet released
        self.hit = False  # a stop string was met: nothing more is released
        self.matched: str | None = None  # the stop string met

    def feed(self, text: str) -> str:
        """The text now safe to release (all of it, up to a stop string once one is met)."""
        if self.hit:
            return ""
        if not self.stop:
            return text
        self.pending += text
        hits = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.hit = True
            out, self.pending = self.pending[:at], ""
            return out
        cut = len(self.pending) - self._held_back()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail (it began no stop string): the text ended, or what follows is
        not searched."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out

    def _held_back(self) -> int:
        """How many trailing characters could still begin a stop string."""
        text = self.pending
        return max(
            (
                k
                for s in self.stop
                for k in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-k:])
            ),
            default=0,
        )
