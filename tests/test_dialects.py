"""The Responses and Anthropic dialects without a model: bodies mapped onto the chat route's
request, and replies (real token ids through the real tokenizer) shaped into bodies and streams
that the official SDKs' own stream accumulators rebuild into the same whole reply."""

from __future__ import annotations

import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from checkpoints import REFERENCE_MODEL_DIR, requires_reference
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from smollm3_mlx.serve import anthropic as am, responses as rs
from smollm3_mlx.serve.blocks import Blocks
from smollm3_mlx.serve.reply import Reply
from smollm3_mlx.serve.request import ChatRequest, RequestError, parse
from smollm3_mlx.tokenizer import Tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CALLED = [  # a question, the call it got (with the reasoning before it), the call's result
    {"role": "user", "content": "Wx?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Call it.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(body) -> ChatRequest:
    """The chat route's request for a dialect's mapped body (the chat route's checks pass)."""
    return parse(ChatRequest, body)


# --- Responses: requests ------------------------------------------------------------------------


def responses_body(**fields):
    return rs.chat_body(parse(rs.ResponsesRequest, {"model": "m", **fields}), [])


def test_responses_string_input_instructions_and_options_map_to_the_chat_request():
    body = responses_body(
        input="Hi",
        instructions="Be brief.",
        max_output_tokens=50,
        temperature=0,
        reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "x", "schema": WEATHER, "strict": True}},
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER}],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        top_logprobs=2,
    )
    r = chat(body)
    assert [(m.role, m.content) for m in r.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (r.max_tokens, r.temperature, r.reasoning_effort) == (50, 0, "none")
    assert r.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": WEATHER, "strict": True},
    }
    assert r.tools[0].function.name == "get_weather" and r.tools[0].function.parameters == WEATHER
    assert r.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert r.parallel_tool_calls is False and r.logprobs and r.top_logprobs == 2


def test_responses_items_become_messages_with_calls_reasoning_and_results_in_place():
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Wx?"}]},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Call it."}],
        },
        {
            "type": "function_call",
            "call_id": "c1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}],
        },
        {"role": "user", "content": "Thanks"},
    ]
    messages = rs.input_messages(items)
    assert messages == [
        {"role": "developer", "content": "Use tools."},
        *CALLED,
        {"role": "assistant", "content": "Sunny.", "tool_calls": []},
        {"role": "user", "content": "Thanks"},
    ]
    chat({"model": "m", "messages": messages})  # the chat route takes them as they are


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"input": [{"type": "input_image_call"}]}, "input items of type 'input_image_call'"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "only text"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
        ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice of type"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format of type"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "conversation": "conv_1"}, "conversation is not supported"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
    ],
)
def test_responses_options_it_cannot_honour_are_refused_in_one_line(fields, needle):
    with pytest.raises(RequestError, match=needle.replace("(", r"\(")):
        responses_body(**fields)


def test_the_response_store_is_bounded_and_an_unknown_id_is_refused():
    store = rs.ResponseStore(size=2)
    for i in range(3):
        store.put(f"resp_{i}", [{"role": "user", "content": str(i)}])
    assert store.get("resp_2") == [{"role": "user", "content": "2"}]
    with pytest.raises(RequestError, match="resp_0") as e:
        store.get("resp_0")  # the least recently used one went
    assert e.value.param == "previous_response_id"


# --- Anthropic: requests ------------------------------------------------------------------------


def messages_body(**fields):
    return am.chat_body(parse(am.MessagesRequest, {"model": "m", "max_tokens": 64, **fields}))


def test_anthropic_system_blocks_tool_use_results_and_thinking_map_to_chat_messages():
    body = messages_body(
        system=[{"type": "text", "text": "A."}, {"type": "text", "text": "B."}],
        messages=[
            {"role": "user", "content": "Wx?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Call it.", "signature": "s"},
                    {"type": "redacted_thinking", "data": "sealed"},
                    {
                        "type": "tool_use",
                        "id": "c1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "c1",
                        "content": [{"type": "text", "text": "sunny"}],
                    },
                    {"type": "text", "text": "And?"},
                ],
            },
        ],
        stop_sequences=["END"],
    )
    assert body["messages"] == [
        {"role": "system", "content": "A.\n\nB."},
        *CALLED,
        {"role": "user", "content": "And?"},
    ]
    r = chat(body)
    assert r.max_tokens == 64 and r.stop == ["END"]


@pytest.mark.parametrize(
    "fields, expect",
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 7}}, {"thinking_token_budget": 7}),
        ({"thinking": {"type": "disabled"}}, {"chat_template_kwargs": {"enable_thinking": False}}),
        ({"thinking": {"type": "adaptive"}}, {}),
        (
            {"tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
            {"tool_choice": "required", "parallel_tool_calls": False},
        ),
        (
            {"tool_choice": {"type": "tool", "name": "get_weather"}},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        ({"tool_choice": {"type": "none"}}, {"tool_choice": "none"}),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": WEATHER}}},
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": WEATHER, "strict": True},
                }
            },
        ),
    ],
    ids=["budget", "disabled", "adaptive", "any", "tool", "none", "format"],
)
def test_anthropic_thinking_tool_choice_and_format_map_exactly(fields, expect):
    tools = [{"name": "get_weather", "input_schema": WEATHER}]
    body = messages_body(messages=[{"role": "user", "content": "x"}], tools=tools, **fields)
    mapped = {
        k: v
        for k, v in body.items()
        if k not in ("model", "messages", "max_tokens", "stream", "tools")
    }
    assert mapped == expect
    chat(body)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "only custom tools"),
        ({"thinking": {"type": "sometimes"}}, "thinking of type 'sometimes'"),
        ({"tool_choice": {"type": "maybe"}}, "tool_choice of type 'maybe'"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "only text blocks"),
        ({"output_config": {"format": {"type": "grammar"}}}, "output_config.format"),
    ],
)
def test_anthropic_options_it_cannot_honour_are_refused_in_one_line(fields, needle):
    with pytest.raises(RequestError, match=needle):
        messages_body(**{"messages": [{"role": "user", "content": "x"}], **fields})


def test_anthropic_errors_come_in_anthropics_envelope():
    assert am.error_body(401, "no key") == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "no key"},
    }
    assert am.error_body(429, "busy")["error"]["type"] == "rate_limit_error"
    assert am.error_body(500, "boom")["error"]["type"] == "api_error"


# --- replies: whole and streamed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(REFERENCE_MODEL_DIR)


def replied(tok, text: str, *, stop=()):
    """A Reply fed the ids of `text`, as the server feeds it; its Deltas and its finish."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=True)
    reply = Reply(tok, prompt, stop=stop)
    reply.usage.cached_tokens = 3
    deltas = [d for t in tok.encode(text, allow_special=True) if (d := reply.feed(t))]
    if last := reply.flush():
        deltas.append(last)
    return reply, deltas, reply.finish_reason("stop")


def plain(value):
    """SDK objects as JSON data, without ids (made per shape) or the SDK's parsed values."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {
            k: plain(v) for k, v in value.items() if k not in ("id", "parsed", "parsed_arguments")
        }
    return value


GENERATED = {
    "text": "<think>\nPlan.\n</think>\nHello there.",
    "tool": f"<think>\nCall it.\n</think>\n{CALL}",
    "plain": "Just text, no thinking.",
}


@requires_reference
@pytest.mark.parametrize("kind", list(GENERATED))
def test_a_responses_stream_rebuilds_in_the_sdk_to_the_whole_response(tok, kind):
    request = parse(rs.ResponsesRequest, {"model": "m", "input": "q"})
    reply, deltas, finish = replied(tok, GENERATED[kind])
    shape = rs.ResponsesShape(reply, request)
    events = [*shape.opened(), *(e for d in deltas for e in shape.delta(d)), *shape.closed(finish)]
    assert [e[1]["sequence_number"] for e in events] == list(range(len(events)))
    assert all(name == data["type"] for name, data in events)
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    for _, data in events:
        state.handle_event(TypeAdapter(ResponseStreamEvent).validate_python(data))
    streamed = state._completed_response
    whole = Response.model_validate(rs.ResponsesShape(reply, request).whole(finish))
    assert events[-1][0] == "response.completed" and streamed.status == whole.status == "completed"
    assert streamed.output_text == whole.output_text
    assert plain(streamed.output) == plain(whole.output)
    assert whole.usage.input_tokens_details.cached_tokens == 3
    if kind == "tool":
        (call,) = whole.output[1:]
        assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


@requires_reference
@pytest.mark.parametrize("kind", list(GENERATED))
def test_an_anthropic_stream_rebuilds_in_the_sdk_to_the_whole_message(tok, kind):
    reply, deltas, finish = replied(tok, GENERATED[kind])
    shape = am.AnthropicShape(reply, "m")
    events = [*shape.opened(), *(e for d in deltas for e in shape.delta(d)), *shape.closed(finish)]
    assert all(name == data["type"] for name, data in events)
    assert [n for n, _ in events][:1] + [n for n, _ in events][-2:] == [
        "message_start",
        "message_delta",
        "message_stop",
    ]
    snapshot = None
    for _, data in events:
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs={})
    whole = Message.model_validate(shape.whole(finish))
    assert snapshot.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    kinds = [b.type for b in whole.content]
    expect = {"text": ["thinking", "text"], "tool": ["thinking", "tool_use"], "plain": ["text"]}
    assert kinds == expect[kind]
    assert whole.stop_reason == ("tool_use" if kind == "tool" else "end_turn")
    assert (whole.usage.input_tokens + whole.usage.cache_read_input_tokens) == (
        reply.usage.prompt_tokens
    )


@requires_reference
def test_an_anthropic_stop_sequence_is_named_in_the_reply(tok):
    reply, _, finish = replied(tok, GENERATED["plain"], stop=["no thinking"])
    whole = am.AnthropicShape(reply, "m").whole(finish)
    assert whole["stop_reason"] == "stop_sequence" and whole["stop_sequence"] == "no thinking"
    assert whole["content"] == [{"type": "text", "text": "Just text,"}]


def test_blocks_open_and_close_in_order_and_a_call_is_one_block():
    from smollm3_mlx.serve.reply import Delta

    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    blocks = Blocks()
    steps = [
        *blocks.feed(Delta(reasoning="a")),
        *blocks.feed(Delta(reasoning="b", content="c")),
        *blocks.feed(Delta(tool_calls=[call])),
        *blocks.close(),
    ]
    assert [(s, b.kind, p) for s, b, p in steps] == [
        ("open", "reasoning", ""),
        ("add", "reasoning", "a"),
        ("add", "reasoning", "b"),
        ("close", "reasoning", ""),
        ("open", "text", ""),
        ("add", "text", "c"),
        ("close", "text", ""),
        ("open", "tool", ""),
        ("add", "tool", "{}"),
        ("close", "tool", ""),
    ]


def test_anthropic_system_turns_among_the_messages_join_the_one_system_prompt():
    """Claude Code sends a system turn after the first user message; SmolLM3's template has one
    system block, at the start."""
    body = messages_body(
        system="A.",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Agents: none."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
        ],
    )
    assert body["messages"] == [
        {"role": "system", "content": "A.\n\nAgents: none."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    chat(body)


RECORD = {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}


@requires_reference
def test_a_tool_whose_records_name_string_keys_compiles_as_claude_code_sends_it(tok):
    """Claude Code's TaskCreate/TaskUpdate (Zod records) say `propertyNames: {"type": "string"}`,
    which every JSON key already is; llguidance has no propertyNames, so it is dropped there.
    Other property names still cannot be held: refused in one line."""
    from smollm3_mlx.constrain import ConstraintError, make_answer_constraint

    def tool(names):
        record = {**RECORD, "propertyNames": names}
        params = {"type": "object", "properties": {"metadata": record}, "required": ["metadata"]}
        return [{"name": "TaskCreate", "parameters": params}]

    for names in ({"type": "string"}, {}, True):
        assert make_answer_constraint(tok, tools=tool(names), tool_choice="required") is not None
    with pytest.raises(ConstraintError, match="propertyNames"):
        make_answer_constraint(tok, tools=tool({"pattern": "^a"}), tool_choice="required")
