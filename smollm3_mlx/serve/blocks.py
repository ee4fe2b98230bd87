"""A reply as content blocks (reasoning, text, tool call) opened, extended and closed in order,
as the Responses and Anthropic streams both send it. Imports no MLX and no HTTP stack."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from .reply import Delta, Reply

Kind = Literal["reasoning", "text", "tool"]


@dataclass
class Block:
    """One block of the reply: its kind, its place, and what it holds so far."""

    kind: Kind
    index: int
    text: str = ""  # the reasoning or the text
    call: dict[str, Any] = field(default_factory=dict)  # a tool call, as chat's tool_calls hold it
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    added_logprobs: list[dict[str, Any]] = field(default_factory=list)  # the last piece's


Step = tuple[Literal["open", "add", "close"], Block, str]


class Blocks:
    """Deltas -> steps ("open" | "add" | "close", block, piece): a block opens when its kind
    first comes, and closes when another kind comes or the reply ends. A tool call is one block,
    opened, given its whole arguments and closed at once."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.current: Block | None = None

    def feed(self, delta: Delta) -> Iterator[Step]:
        if delta.reasoning:
            yield from self._add("reasoning", delta.reasoning)
        if delta.content:
            yield from self._add("text", delta.content, delta.logprobs)
        for call in delta.tool_calls:
            yield from self.close()
            block = Block("tool", len(self.blocks), call=call)
            self.blocks.append(block)
            yield "open", block, ""
            yield "add", block, call["function"]["arguments"]
            yield "close", block, ""

    def close(self) -> Iterator[Step]:
        if self.current is not None:
            block, self.current = self.current, None
            yield "close", block, ""

    def _add(self, kind: Kind, piece: str, logprobs=()) -> Iterator[Step]:
        if self.current is None or self.current.kind != kind:
            yield from self.close()
            self.current = Block(kind, len(self.blocks))
            self.blocks.append(self.current)
            yield "open", self.current, ""
        self.current.text += piece
        self.current.added_logprobs = list(logprobs)
        self.current.logprobs += logprobs
        yield "add", self.current, piece


def whole_blocks(reply: Reply) -> list[Block]:
    """The blocks of a reply that was not streamed: its reasoning, its text, its tool calls."""
    blocks = []
    reasoning, text = "".join(reply.reasoning), "".join(reply.content)
    if reasoning:
        blocks.append(Block("reasoning", 0, reasoning))
    if text:
        blocks.append(Block("text", len(blocks), text, logprobs=reply.logprobs))
    for call in reply.tool_calls:
        blocks.append(Block("tool", len(blocks), call=call))
    return blocks
