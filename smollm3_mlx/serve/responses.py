"""OpenAI's Responses API (`POST /v1/responses`) on the chat path: a request becomes the chat
route's typed request, and the chat route's reply becomes a Response and its typed events.

Imports no MLX and no HTTP stack. `previous_response_id` reads a bounded in-memory store of the
conversations this server answered (`store`, true by default as in OpenAI's API, keeps one).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .blocks import Block, Blocks, whole_blocks
from .reply import Delta, Reply, Shape, Sse, new_id
from .request import MAX_TOP_LOGPROBS, RequestError

DEFAULT_STORED = 64  # conversations kept for previous_response_id, least recently used dropped
TEXT_PARTS = ("input_text", "output_text", "text")
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class _Body(BaseModel):
    # Strict as the chat route is; fields that change nothing here (user, metadata,
    # prompt_cache_key, service_tier, safety_identifier, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class _Reasoning(_Body):
    effort: str | None = None
    summary: str | None = None


class _Text(_Body):
    format: dict[str, Any] | None = None
    verbosity: str | None = None


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    reasoning: _Reasoning | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: _Text | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    include: list[str] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    truncation: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None


def _refuse_unsupported(r: ResponsesRequest) -> None:
    """Options that would change the answer and that this server does not do: one line each."""
    if r.background:
        raise RequestError("background responses are not supported", "background")
    for name in ("conversation", "prompt", "max_tool_calls"):
        if getattr(r, name) is not None:
            raise RequestError(f"{name} is not supported", name)
    if r.truncation not in (None, "disabled"):
        raise RequestError('truncation must be "disabled": input is never cut', "truncation")


class ResponseStore:
    """The conversations of stored responses (chat messages, instructions excluded, as OpenAI
    does not carry them over), by response id, bounded to `size`, least recently used dropped."""

    def __init__(self, size: int = DEFAULT_STORED):
        self.size = size
        self.entries: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]]:
        if response_id not in self.entries:
            raise RequestError(
                f"Previous response with id {response_id!r} not found (this server keeps the "
                f"last {self.size} stored responses, in memory)",
                "previous_response_id",
                "previous_response_not_found",
            )
        self.entries.move_to_end(response_id)
        return self.entries[response_id]

    def put(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self.entries[response_id] = messages
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def chat_body(r: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat route's body for `r`, after the stored conversation `history`."""
    _refuse_unsupported(r)
    messages = [{"role": "system", "content": r.instructions}] if r.instructions else []
    body: dict[str, Any] = {
        "model": r.model,
        "messages": [*messages, *history, *input_messages(r.input)],
        "stream": r.stream,
    }
    body |= {k: getattr(r, k) for k in SAMPLING if getattr(r, k) is not None}
    if r.max_output_tokens is not None:
        body["max_tokens"] = r.max_output_tokens
    if r.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(r.tools)]
    if r.tool_choice is not None:
        body["tool_choice"] = _tool_choice(r.tool_choice)
    if r.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = r.parallel_tool_calls
    if r.reasoning is not None and r.reasoning.effort is not None:
        body["reasoning_effort"] = r.reasoning.effort
    if r.text is not None and r.text.format is not None:
        body["response_format"] = _response_format(r.text.format)
    if r.top_logprobs is not None or "message.output_text.logprobs" in (r.include or ()):
        body |= {"logprobs": True, "top_logprobs": r.top_logprobs or 0}
    return body


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: a function call joins the assistant message before it, a
    reasoning item goes into the assistant message after it."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []  # from reasoning items, for the next assistant message
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning += [p.get("text", "") for p in parts if isinstance(p, dict)]
            continue
        if kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": _field(item, "call_id", i),
                    "content": _text(item.get("output"), f"input.{i}.output"),
                }
            )
            continue
        if kind == "message" and item.get("role") != "assistant":
            content = _text(item.get("content"), f"input.{i}.content")
            out.append({"role": _field(item, "role", i), "content": content})
            continue
        if kind not in ("message", "function_call"):
            raise RequestError(f"input items of type {kind!r} are not supported", f"input.{i}")
        turn = out[-1] if out and out[-1]["role"] == "assistant" and kind != "message" else None
        if turn is None:
            turn = {"role": "assistant", "content": None, "tool_calls": []}
            out.append(turn)
        if reasoning:
            turn["reasoning_content"], reasoning = "\n".join(reasoning), []
        if kind == "message":
            turn["content"] = _text(item.get("content"), f"input.{i}.content")
        else:
            call = {"name": _field(item, "name", i), "arguments": _field(item, "arguments", i)}
            turn["tool_calls"].append(
                {"id": _field(item, "call_id", i), "type": "function", "function": call}
            )
    return out


def _field(item: dict[str, Any], name: str, i: int) -> Any:
    if not isinstance(item.get(name), str):
        raise RequestError(f"input.{i}.{name}: a string is required", f"input.{i}.{name}")
    return item[name]


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: a string or a list of text parts is required", where)
    pieces = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in (*TEXT_PARTS, "refusal"):
            kind = part.get("type") if isinstance(part, dict) else part
            raise RequestError(f"only text content is supported, not {kind!r}", f"{where}.{j}")
        pieces.append(part.get("text") or part.get("refusal") or "")
    return "".join(pieces)


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise RequestError(
            f"only function tools are supported, not {tool.get('type')!r}", f"tools.{i}.type"
        )
    keys = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in keys if tool.get(k) is not None}}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("type") == "allowed_tools":
        tools = [_tool(t, i)["function"] for i, t in enumerate(choice.get("tools") or [])]
        allowed = [{"type": "function", "function": {"name": t.get("name")}} for t in tools]
        return {
            "type": "allowed_tools",
            "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": allowed},
        }
    raise RequestError(
        f"tool_choice of type {choice.get('type')!r} is not supported", "tool_choice"
    )


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind == "json_schema":
        keys = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}
    if kind in ("json_object", "text"):
        return {"type": kind}
    raise RequestError(f"text.format of type {kind!r} is not supported", "text.format")


def assistant_message(reply: Reply) -> dict[str, Any]:
    """The reply as the chat message a stored conversation keeps."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(reply.content) or None}
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["tool_calls"] = [
            {k: c[k] for k in ("id", "type", "function")} for c in reply.tool_calls
        ]
    return message


class ResponsesShape(Shape):
    """A reply as a Response, or as the typed events of one (`response.created` ... one
    output item per block ... `response.completed`), as the SDK's stream helpers read them."""

    def __init__(
        self,
        reply: Reply,
        r: ResponsesRequest,
        store: ResponseStore | None = None,
        conversation: Sequence[dict[str, Any]] = (),
    ):
        """`store`: where the conversation (`conversation`, then this reply) is kept once the
        response completes; None: not kept."""
        super().__init__(reply)
        self.r, self.store, self.conversation = r, store, list(conversation)
        self.id, self.created = new_id("resp_"), time.time()
        self.blocks, self.ids = Blocks(), {}
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> Sse:
        self.sequence += 1
        return kind, {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opened(self) -> list[Sse]:
        body = self._body("in_progress", [], usage=False)
        return [self._event(k, response=body) for k in ("response.created", "response.in_progress")]

    def delta(self, delta: Delta) -> list[Sse]:
        return [e for step in self.blocks.feed(delta) for e in self._step(*step)]

    def closed(self, finish: str) -> list[Sse]:
        events = [e for step in self.blocks.close() for e in self._step(*step)]
        body = self._finish(finish, self.blocks.blocks)
        done = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return [*events, self._event(done, response=body)]

    def whole(self, finish: str) -> dict[str, Any]:
        return self._finish(finish, whole_blocks(self.reply))

    def failed(self, status: int, message: str) -> list[Sse]:
        code = "server_error" if status >= 500 else "invalid_request_error"
        return [self._event("error", code=code, message=message, param=None)]

    def _step(self, step: str, block: Block, piece: str) -> list[Sse]:
        at = {"output_index": block.index}
        if step == "open":
            self.ids[block.index] = _item_id(block)
            item = _item(block, self.ids[block.index], "in_progress", opened=True)
            events = [self._event("response.output_item.added", **at, item=item)]
            if block.kind != "tool":
                part = _part(block, "")
                events.append(
                    self._event("response.content_part.added", **at, **self._at(block), part=part)
                )
            return events
        if step == "add":
            if block.kind == "tool":
                return [
                    self._event(
                        "response.function_call_arguments.delta",
                        **at,
                        item_id=self.ids[block.index],
                        delta=piece,
                    )
                ]
            kind = "reasoning_text" if block.kind == "reasoning" else "output_text"
            fields = {"logprobs": block.added_logprobs} if kind == "output_text" else {}
            return [
                self._event(
                    f"response.{kind}.delta", **at, **self._at(block), delta=piece, **fields
                )
            ]
        return self._close(block, at)

    def _close(self, block: Block, at: dict[str, int]) -> list[Sse]:
        item = _item(block, self.ids[block.index], "completed")
        item_id = self.ids[block.index]
        if block.kind == "tool":
            f = block.call["function"]
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    **at,
                    item_id=item_id,
                    name=f["name"],
                    arguments=f["arguments"],
                )
            ]
        else:
            kind = "reasoning_text" if block.kind == "reasoning" else "output_text"
            extra = {"logprobs": block.logprobs} if kind == "output_text" else {}
            events = [
                self._event(
                    f"response.{kind}.done", **at, **self._at(block), text=block.text, **extra
                ),
                self._event(
                    "response.content_part.done",
                    **at,
                    **self._at(block),
                    part=_part(block, block.text),
                ),
            ]
        return [*events, self._event("response.output_item.done", **at, item=item)]

    def _at(self, block: Block) -> dict[str, Any]:
        return {"item_id": self.ids[block.index], "content_index": 0}

    def _finish(self, finish: str, blocks: list[Block]) -> dict[str, Any]:
        status = {"stop": "completed", "tool_calls": "completed", "length": "incomplete"}
        body = self._body(status.get(finish, "cancelled"), blocks, usage=True)
        if finish == "length":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.store is not None and body["status"] == "completed":
            self.store.put(self.id, [*self.conversation, assistant_message(self.reply)])
        return body

    def _body(self, status: str, blocks: list[Block], *, usage: bool) -> dict[str, Any]:
        r = self.r
        item_status = "completed" if status in ("completed", "in_progress") else "incomplete"
        output = [_item(b, self.ids.get(b.index) or _item_id(b), item_status) for b in blocks]
        text = r.text.model_dump(exclude_none=True) if r.text else {"format": {"type": "text"}}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "completed_at": None if status == "in_progress" else time.time(),
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": r.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id,
            "reasoning": r.reasoning.model_dump() if r.reasoning else None,
            "store": r.store,
            "temperature": r.temperature,
            "text": text,
            "tool_choice": r.tool_choice or "auto",
            "tools": r.tools or [],
            "top_p": r.top_p,
            "truncation": "disabled",
            "usage": _usage(self.reply) if usage else None,
        }


def _usage(reply: Reply) -> dict[str, Any]:
    u = reply.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _item_id(block: Block) -> str:
    return new_id({"reasoning": "rs_", "text": "msg_", "tool": "fc_"}[block.kind])


def _part(block: Block, text: str) -> dict[str, Any]:
    if block.kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    logprobs = block.logprobs if text else []
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _item(block: Block, item_id: str, status: str, opened: bool = False) -> dict[str, Any]:
    """The output item of `block` (`opened`: as `output_item.added` shows it, still empty)."""
    if block.kind == "tool":
        f = block.call["function"]
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": block.call["id"],
            "name": f["name"],
            "arguments": "" if opened else f["arguments"],
        }
    content = [] if opened else [_part(block, block.text)]
    if block.kind == "reasoning":
        return {
            "id": item_id,
            "type": "reasoning",
            "summary": [],
            "content": content,
            "status": status,
        }
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }
