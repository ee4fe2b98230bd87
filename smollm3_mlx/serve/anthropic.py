"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on the chat path:
a request becomes the chat route's typed request, and the chat route's reply becomes a Message
and its stream (`message_start`, content blocks, `message_delta`, `message_stop`).

Imports no MLX and no HTTP stack. Thinking follows the model's default (on) unless `thinking`
says otherwise: `{"type": "enabled", "budget_tokens": N}` is the exact thinking budget, and
`{"type": "disabled"}` turns it off.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .blocks import Block, Blocks, whole_blocks
from .reply import Delta, Reply, Shape, Sse, new_id
from .request import RequestError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """An error in Anthropic's envelope."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class _Body(BaseModel):
    # Strict as the chat route is; fields that change nothing here (metadata, service_tier,
    # cache_control, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Message(_Body):
    role: Literal["user", "assistant", "system"]  # Claude Code sends system turns mid-way
    content: str | list[dict[str, Any]]


class CountTokensRequest(_Body):
    model: str
    messages: list[_Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None


def chat_body(r: CountTokensRequest) -> dict[str, Any]:
    """The chat route's body for `r`."""
    system = _system(r.system, [m for m in r.messages if m.role == "system"])
    body: dict[str, Any] = {"model": r.model, "messages": [*system, *chat_messages(r.messages)]}
    if isinstance(r, MessagesRequest):
        body |= {"max_tokens": r.max_tokens, "stream": r.stream}
        body |= {
            k: getattr(r, k) for k in ("temperature", "top_p", "top_k") if getattr(r, k) is not None
        }
        if r.stop_sequences:
            body["stop"] = r.stop_sequences
    if r.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(r.tools)]
    if r.tool_choice is not None:
        body |= _tool_choice(r.tool_choice)
    body |= _thinking(r.thinking)
    fmt = (r.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise RequestError(
                'output_config.format must be {"type": "json_schema", ...}', "output_config.format"
            )
        schema = {"name": "output", "schema": fmt.get("schema"), "strict": True}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def _system(system: str | list[dict[str, Any]] | None, turns: list[_Message]) -> list[dict]:
    """The system prompt, with the system turns among the messages joined to it: SmolLM3's
    template has one system block, at the start."""
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else system or []
    for m in turns:
        blocks += [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
    texts = [t for t in _texts(blocks, "system") if t]
    return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []


def _texts(blocks: list[dict[str, Any]], where: str) -> list[str]:
    for j, b in enumerate(blocks):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise RequestError(
                f"only text blocks are supported here, not {b.get('type')!r}", f"{where}.{j}"
            )
    return [b["text"] for b in blocks]


def chat_messages(messages: list[_Message]) -> list[dict[str, Any]]:
    """Anthropic messages as chat messages: tool results become tool messages (before the text
    that follows them), thinking and tool use go into the assistant message (system turns are
    the system prompt's)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if m.role == "user":
            out += _user(blocks, f"messages.{i}.content")
        elif m.role == "assistant":
            out.append(_assistant(blocks, f"messages.{i}.content"))
    return out


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out, texts = [], []
    for j, b in enumerate(blocks):
        if b.get("type") == "tool_result":
            content = b.get("content") or ""
            if not isinstance(content, str):
                content = "\n".join(_texts(content, f"{where}.{j}.content"))
            if b.get("is_error"):
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": content})
        else:
            texts += _texts([b], where)
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts, thoughts, calls = [], [], []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "thinking":
            thoughts.append(b.get("thinking") or "")
        elif kind == "tool_use":
            arguments = json.dumps(b.get("input") or {}, ensure_ascii=False)
            function = {"name": b.get("name"), "arguments": arguments}
            calls.append({"id": b.get("id"), "type": "function", "function": function})
        elif kind != "redacted_thinking":  # sealed by another model: nothing to read back
            texts += _texts([b], f"{where}.{j}")
    message = {"role": "assistant", "content": "\n".join(texts) or None}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    return message | ({"tool_calls": calls} if calls else {})


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
        raise RequestError(
            f"only custom tools with an input_schema are supported, not {tool.get('type')!r}",
            f"tools.{i}",
        )
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict[str, Any]) -> dict[str, Any]:
    kind = choice.get("type")
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    if mapped is None:
        raise RequestError(f"tool_choice of type {kind!r} is not supported", "tool_choice.type")
    body: dict[str, Any] = {"tool_choice": mapped}
    if choice.get("disable_parallel_tool_use"):
        body["parallel_tool_calls"] = False
    return body


def _thinking(thinking: dict[str, Any] | None) -> dict[str, Any]:
    kind = None if thinking is None else thinking.get("type")
    if kind in (None, "adaptive"):
        return {}
    if kind == "disabled":
        return {"chat_template_kwargs": {"enable_thinking": False}}
    if kind == "enabled":
        assert thinking is not None
        return {"thinking_token_budget": thinking.get("budget_tokens")}
    raise RequestError(f"thinking of type {kind!r} is not supported", "thinking.type")


class AnthropicShape(Shape):
    """A reply as a Message, or as its stream of events, as the `anthropic` SDK reads them."""

    def __init__(self, reply: Reply, model: str):
        super().__init__(reply)
        self.model, self.id, self.blocks = model, new_id("msg_"), Blocks()

    def opened(self) -> list[Sse]:
        message = {**self._message([]), "stop_reason": None, "stop_sequence": None}
        return [("message_start", {"type": "message_start", "message": message})]

    def delta(self, delta: Delta) -> list[Sse]:
        return [e for step in self.blocks.feed(delta) for e in self._step(*step)]

    def closed(self, finish: str) -> list[Sse]:
        events = [e for step in self.blocks.close() for e in self._step(*step)]
        reason, sequence = self._stop(finish)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        usage = self._usage()
        return [
            *events,
            ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            ("message_stop", {"type": "message_stop"}),
        ]

    def whole(self, finish: str) -> dict[str, Any]:
        reason, sequence = self._stop(finish)
        content = [_content(b) for b in whole_blocks(self.reply)]
        return {**self._message(content), "stop_reason": reason, "stop_sequence": sequence}

    def failed(self, status: int, message: str) -> list[Sse]:
        return [("error", error_body(status, message))]

    def _step(self, step: str, block: Block, piece: str) -> list[Sse]:
        at = {"index": block.index}
        if step == "open":
            start = _content(block, opened=True)
            return [
                (
                    "content_block_start",
                    {"type": "content_block_start", **at, "content_block": start},
                )
            ]
        if step == "close":
            return [("content_block_stop", {"type": "content_block_stop", **at})]
        delta = {
            "reasoning": {"type": "thinking_delta", "thinking": piece},
            "text": {"type": "text_delta", "text": piece},
            "tool": {"type": "input_json_delta", "partial_json": piece},
        }[block.kind]
        return [("content_block_delta", {"type": "content_block_delta", **at, "delta": delta})]

    def _stop(self, finish: str) -> tuple[str, str | None]:
        matched = self.reply.stop.matched
        if matched is not None:
            return "stop_sequence", matched
        return STOP_REASONS.get(finish, "end_turn"), None

    def _usage(self) -> dict[str, int]:
        u = self.reply.usage
        return {
            "input_tokens": u.prompt_tokens - u.cached_tokens,
            "cache_read_input_tokens": u.cached_tokens,
            "cache_creation_input_tokens": 0,
            "output_tokens": u.completion_tokens,
        }

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "usage": self._usage(),
        }


def _content(block: Block, opened: bool = False) -> dict[str, Any]:
    """A content block (`opened`: as `content_block_start` shows it, still empty)."""
    if block.kind == "reasoning":
        return {"type": "thinking", "thinking": "" if opened else block.text, "signature": ""}
    if block.kind == "text":
        return {"type": "text", "text": "" if opened else block.text}
    f = block.call["function"]
    return {
        "type": "tool_use",
        "id": block.call["id"],
        "name": f["name"],
        "input": {} if opened else json.loads(f["arguments"]),
    }
