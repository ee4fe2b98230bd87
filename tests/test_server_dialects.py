"""The Responses API and Anthropic's Messages API, driven by the official `openai` and
`anthropic` SDKs against the real server and the tiny trained SmolLM3 (it thinks, answers and
calls tools): streamed and not, with tools, structured output, and thinking on and off."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import httpx
import openai
import pytest
import test_server_clients
from checkpoints import requires_reference
from pydantic import BaseModel
from serving import MODEL, running
from shapes import SCHEMAS
from test_server_clients import MAX_TOKENS, closed
from trained_model import QUESTIONS, THOUGHTS, TOOL_RESULT, TOOLS, answer, trained_checkpoint

from smollm3_mlx.loading import load

pytestmark = requires_reference
RESPONSES_TOOLS = [{"type": "function", **t} for t in TOOLS]
ANTHROPIC_TOOLS = [
    {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
    for t in TOOLS
]
noise = test_server_clients.noise  # the fixture: a server on a random SmolLM3
GREEDY = {"temperature": 0}  # the anthropic SDK has no temperature argument: sent as extra_body


class Unit(BaseModel):
    name: Literal["none", "apples"]


class Sum(BaseModel):  # nested: its JSON schema has $defs
    answer: Literal["four", "five"]
    unit: Unit


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


@pytest.fixture(scope="module")
def srv(loaded):
    with running(loaded) as s:
        yield s


def oai(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def claude(srv, key="unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def user(key):
    return {"role": "user", "content": QUESTIONS[key]}


def rendered(srv, messages, *, think=True, tools=None) -> int:
    ids = srv.tokenizer.apply_chat_template(
        messages, tokenize=True, enable_thinking=think, tools=tools
    )
    return len(ids)


def chat(srv, messages, **kwargs):
    return oai(srv).chat.completions.create(model=MODEL, messages=messages, **GREEDY, **kwargs)


# --- Responses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("think", [True, False])
def test_responses_create_and_stream_carry_the_same_reply_reasoning_and_usage(srv, think):
    effort = {} if think else {"reasoning": {"effort": "none"}}
    r = oai(srv).responses.create(model=MODEL, input=QUESTIONS["math"], **GREEDY, **effort)
    assert r.status == "completed" and r.output_text == answer("math")
    reasoning = [c.text for o in r.output if o.type == "reasoning" for c in o.content]
    assert reasoning == ([THOUGHTS["math"]] if think else [])
    assert r.usage.input_tokens == rendered(srv, [user("math")], think=think)
    assert (r.usage.output_tokens_details.reasoning_tokens > 0) == think
    with oai(srv).responses.stream(model=MODEL, input=QUESTIONS["math"], **GREEDY, **effort) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == answer("math")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == (THOUGHTS["math"] if think else "")
    assert final.usage.output_tokens == r.usage.output_tokens
    assert final.usage.input_tokens_details.cached_tokens > 0  # the same prompt, again


def test_responses_tool_call_round_trip_by_items_and_by_previous_response_id(srv):
    client = oai(srv)
    r = client.responses.create(
        model=MODEL, input=QUESTIONS["weather"], tools=RESPONSES_TOOLS, **GREEDY
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}
    replayed = [user("weather"), *(o.model_dump(exclude_none=True) for o in r.output), result]
    by_items = client.responses.create(model=MODEL, input=replayed, tools=RESPONSES_TOOLS, **GREEDY)
    assert by_items.output_text == answer("after_tool")
    by_id = client.responses.create(
        model=MODEL, previous_response_id=r.id, input=[result], tools=RESPONSES_TOOLS, **GREEDY
    )
    assert by_id.output_text == answer("after_tool")
    assert by_id.usage.input_tokens == by_items.usage.input_tokens
    assert by_id.usage.input_tokens_details.cached_tokens > 0

    with client.responses.stream(
        model=MODEL, input=QUESTIONS["weather"], tools=RESPONSES_TOOLS, **GREEDY
    ) as s:
        deltas = [e.delta for e in s if e.type == "response.function_call_arguments.delta"]
        final = s.get_final_response()
    (streamed,) = [o for o in final.output if o.type == "function_call"]
    assert json.loads("".join(deltas)) == json.loads(streamed.arguments) == {"city": "Paris"}


def test_previous_response_id_unknown_or_not_stored_is_refused_in_one_line(srv):
    client = oai(srv)
    with pytest.raises(openai.BadRequestError, match="resp_nothing"):
        client.responses.create(model=MODEL, previous_response_id="resp_nothing", input="hi")
    kept = client.responses.create(
        model=MODEL, input=QUESTIONS["hi"], store=False, max_output_tokens=5
    )
    with pytest.raises(openai.BadRequestError, match="not found") as e:
        client.responses.create(model=MODEL, previous_response_id=kept.id, input="hi")
    assert e.value.body["param"] == "previous_response_id"


def test_responses_structured_output_parses_whole_and_streamed(srv):
    client = oai(srv)
    r = client.responses.parse(
        model=MODEL, input=QUESTIONS["math"], text_format=Sum, max_output_tokens=200, **GREEDY
    )
    assert isinstance(r.output_parsed, Sum)
    with client.responses.stream(
        model=MODEL, input=QUESTIONS["math"], text_format=Sum, max_output_tokens=200, **GREEDY
    ) as s:
        final = s.get_final_response()
    assert final.output_parsed == r.output_parsed


def test_responses_length_limit_is_an_incomplete_response(srv):
    r = oai(srv).responses.create(
        model=MODEL, input=QUESTIONS["sing"], max_output_tokens=5, reasoning={"effort": "none"}
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


# --- Anthropic ----------------------------------------------------------------------------------

THINKING = {
    "default": {},
    "disabled": {"thinking": {"type": "disabled"}},
    "budget": {"thinking": {"type": "enabled", "budget_tokens": 3}},
}


@pytest.mark.parametrize("mode", list(THINKING))
def test_anthropic_create_and_stream_with_thinking_default_off_and_budgeted(srv, mode):
    ask = {"model": MODEL, "max_tokens": 200, "messages": [user("math")], **THINKING[mode]}
    m = claude(srv).messages.create(**ask, extra_body=GREEDY)
    with claude(srv).messages.stream(**ask, extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        streamed = s.get_final_message()
    assert m.stop_reason == streamed.stop_reason == "end_turn"
    assert [b.model_dump(exclude={"id"}) for b in streamed.content] == [
        b.model_dump(exclude={"id"}) for b in m.content
    ]
    assert (kinds[0], kinds[-1]) == ("message_start", "message_stop")
    thinking = [b.thinking for b in m.content if b.type == "thinking"]
    text = [b.text for b in m.content if b.type == "text"]
    if mode == "budget":  # the same budget as the chat route's thinking_token_budget
        r = chat(srv, [user("math")], extra_body={"thinking_token_budget": 3})
        assert thinking == [r.choices[0].message.reasoning_content]
        assert text == [r.choices[0].message.content]
        assert r.usage.completion_tokens_details.reasoning_tokens <= 3
    else:
        assert thinking == ([] if mode == "disabled" else [THOUGHTS["math"]])
        assert text == [answer("math")]
    u = m.usage
    think = mode != "disabled"
    assert u.input_tokens + u.cache_read_input_tokens == rendered(srv, [user("math")], think=think)


def test_anthropic_tool_use_round_trip_streamed_and_not(srv):
    ask = {"model": MODEL, "max_tokens": 200, "tools": ANTHROPIC_TOOLS, "extra_body": GREEDY}
    m = claude(srv).messages.create(messages=[user("weather")], **ask)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    with claude(srv).messages.stream(messages=[user("weather")], **ask) as s:
        partial = "".join(e.partial_json for e in s if e.type == "input_json")
        final = s.get_final_message()
    assert json.loads(partial) == final.content[-1].input == {"city": "Paris"}
    back = [
        user("weather"),
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": TOOL_RESULT}],
        },
    ]
    after = claude(srv).messages.create(messages=back, **ask)
    assert [b.text for b in after.content if b.type == "text"] == [answer("after_tool")]
    assert after.usage.cache_read_input_tokens > 0  # the call turn was cached


def test_anthropic_stop_sequences_structured_output_and_count_tokens(srv):
    client = claude(srv)
    m = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=[user("math")],
        stop_sequences=["= 4"],
        extra_body=GREEDY,
    )
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "= 4")
    assert m.content[-1].text == "2 + 2"
    parsed = client.messages.parse(
        model=MODEL, max_tokens=200, messages=[user("math")], output_format=Sum, extra_body=GREEDY
    )
    assert isinstance(parsed.parsed_output, Sum)
    system = "Be brief."
    count = client.messages.count_tokens(
        model=MODEL, messages=[user("hi")], system=system, tools=ANTHROPIC_TOOLS
    )
    messages = [{"role": "system", "content": system}, user("hi")]
    assert count.input_tokens == rendered(srv, messages, tools=TOOLS)


def test_a_tool_with_nested_pydantic_parameters_is_called_through_both_dialects(srv):
    schema = Sum.model_json_schema()
    assert "$defs" in schema
    tool = {"name": "record", "description": "Record the sum.", "parameters": schema}
    r = oai(srv).responses.create(
        model=MODEL,
        input=QUESTIONS["math"],
        max_output_tokens=200,
        tools=[{"type": "function", **tool}],
        tool_choice="required",
        **GREEDY,
    )
    (call,) = [o for o in r.output if o.type == "function_call"][:1]
    Sum.model_validate_json(call.arguments)
    m = claude(srv).messages.create(
        model=MODEL,
        max_tokens=200,
        messages=[user("math")],
        tools=[{"name": "record", "input_schema": schema}],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    )
    (use,) = [b for b in m.content if b.type == "tool_use"][:1]
    Sum.model_validate(use.input)


def test_anthropic_errors_come_in_its_envelope_and_x_api_key_is_accepted(loaded):
    with running(loaded, api_key="sesame") as s:
        ok = claude(s, key="sesame").messages.create(
            model=MODEL,
            max_tokens=20,
            messages=[user("hi")],
            thinking={"type": "disabled"},
            extra_body=GREEDY,
        )
        assert ok.content[0].text == answer("hi")
        with pytest.raises(anthropic.AuthenticationError) as e:
            claude(s, key="wrong").messages.create(
                model=MODEL, max_tokens=20, messages=[user("hi")]
            )
        assert e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.BadRequestError) as e:
            claude(s, key="sesame").messages.create(
                model="claude-x", max_tokens=20, messages=[user("hi")]
            )
        assert e.value.body["type"] == "error" and "claude-x" in e.value.body["error"]["message"]
        raw = httpx.post(
            s.url + "/v1/messages",
            json={"model": MODEL, "messages": []},
            headers={"x-api-key": "sesame", "anthropic-version": "2023-06-01"},
        )
        assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
        bearer = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        assert bearer.responses.create(model=MODEL, input=QUESTIONS["hi"], **GREEDY).output_text


# --- every shape, on noise ----------------------------------------------------------------------


def shaped_by_responses(srv, schema, seed, stream):
    fmt = {"type": "json_schema", "name": "s", "schema": schema, "strict": True}
    ask = {
        "model": MODEL,
        "input": QUESTIONS["hi"],
        "text": {"format": fmt},
        "extra_body": {"seed": seed},
        "max_output_tokens": MAX_TOKENS,
    }
    if not stream:
        r = oai(srv).responses.create(**ask)
        return r.status, r.output_text
    with oai(srv).responses.stream(**ask) as s:
        text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert text == final.output_text
    return final.status, text


def shaped_by_anthropic(srv, schema, seed, stream):
    ask = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [user("hi")],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "extra_body": {"seed": seed},
    }
    if not stream:
        m = claude(srv).messages.create(**ask)
    else:
        with claude(srv).messages.stream(**ask) as s:
            text = "".join(s.text_stream)
            m = s.get_final_message()
        assert text == "".join(b.text for b in m.content if b.type == "text")
    status = {"end_turn": "completed"}.get(m.stop_reason, m.stop_reason)
    return status, "".join(b.text for b in m.content if b.type == "text")


@pytest.mark.xfail(
    strict=False,
    reason="known limit (issue 21 stays open): an array of objects has no default item bound and "
    "the 256-token answer reserve is a heuristic, so on noise the Address list can run past "
    "max_tokens; the fix is a wrap-up that steers the grammar to its shortest completion",
)
@pytest.mark.parametrize("dialect", ["responses", "anthropic"])
def test_every_shape_holds_within_max_tokens_through_each_dialect_with_thinking_on(noise, dialect):
    """A random model, thinking at its default (on): the answer still parses and validates
    within MAX_TOKENS, for every schema, half of them streamed."""
    shaped = shaped_by_responses if dialect == "responses" else shaped_by_anthropic
    for seed, schema in enumerate(SCHEMAS):
        status, text = shaped(noise, schema, seed, stream=seed % 2 == 1)
        assert status == "completed", (schema, text)
        closed(json.loads(text), schema)


# --- other clients, as their docs show them ------------------------------------------------------


def test_langchain_openai_on_the_responses_api_answers_streams_and_calls_tools(srv):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=srv.url + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        use_responses_api=True,
    )
    r = llm.invoke(QUESTIONS["math"])
    assert [b["text"] for b in r.content if b["type"] == "text"] == [answer("math")]
    assert r.usage_metadata["output_token_details"]["reasoning"] > 0
    chunks = list(llm.stream(QUESTIONS["math"]))
    whole = sum(chunks[1:], chunks[0])
    assert [b["text"] for b in whole.content if b["type"] == "text"] == [answer("math")]
    tools = [{"type": "function", "function": t} for t in TOOLS]
    (call,) = llm.bind_tools(tools).invoke(QUESTIONS["weather"]).tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})


def pydantic_ai_model(srv, dialect):
    if dialect == "responses":
        from pydantic_ai.models.openai import OpenAIResponsesModel
        from pydantic_ai.providers.openai import OpenAIProvider

        provider = OpenAIProvider(base_url=srv.url + "/v1", api_key="unused")
        return OpenAIResponsesModel(MODEL, provider=provider)
    from pydantic_ai.models.anthropic import AnthropicModel
    from pydantic_ai.providers.anthropic import AnthropicProvider

    return AnthropicModel(MODEL, provider=AnthropicProvider(base_url=srv.url, api_key="unused"))


@pytest.mark.parametrize(
    "dialect",
    [
        "responses",
        pytest.param(
            "anthropic",
            marks=pytest.mark.xfail(
                strict=False,
                reason="open (issue 21): after the merges the trained model calls get_weather "
                "a second time after its tool_result through /v1/messages",
            ),
        ),
    ],
)
def test_a_pydantic_ai_agent_runs_its_tool_and_answers_through_each_dialect(srv, dialect):
    from pydantic_ai import Agent

    agent = Agent(
        pydantic_ai_model(srv, dialect), model_settings={"temperature": 0, "max_tokens": 200}
    )
    called = []

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: The city's name, for example Paris.
        """
        called.append(city)
        return TOOL_RESULT

    run = agent.run_sync(QUESTIONS["weather"])
    assert called == ["Paris"] and run.output == answer("after_tool")
    parts = [type(p).__name__ for m in run.all_messages() for p in m.parts]
    assert parts == [
        "UserPromptPart",
        "ThinkingPart",
        "ToolCallPart",
        "ToolReturnPart",
        "ThinkingPart",
        "TextPart",
    ]


def test_a_pydantic_ai_agent_gets_native_structured_output_from_the_responses_api(srv):
    from pydantic_ai import Agent, NativeOutput

    agent = Agent(
        pydantic_ai_model(srv, "responses"),
        output_type=NativeOutput(Sum),
        model_settings={"temperature": 0, "max_tokens": 200},
    )
    assert isinstance(agent.run_sync(QUESTIONS["math"]).output, Sum)
