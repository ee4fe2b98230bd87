"""The rules every held answer follows, in the Python API (the server holds the same ones,
tests/test_server_clients.py): references resolved wherever they point, objects closed, values
bounded, room kept for the answer when thinking, no call where none may be made, one call when
parallel calls are off. A random SmolLM3 with the real vocabulary: the model cannot help."""

import json

import jsonschema
import mlx.core as mx
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference
from shapes import MODELS, SCHEMAS

from smollm3_mlx.chat import Chat
from smollm3_mlx.constrain import (
    DEFAULT_ANSWER_RESERVE,
    ConstraintError,
    make_answer_constraint,
    reserved_think_budget,
)
from smollm3_mlx.events import Done, ToolCall
from smollm3_mlx.grammar import (
    DEFAULT_FRACTION_DIGITS,
    DEFAULT_MAX_DIGITS,
    DEFAULT_MAX_STRING,
    held_schema,
    tool_call_schema,
    tool_choice_mode,
)
from smollm3_mlx.loading import load
from smollm3_mlx.sample import Sampling

pytestmark = requires_reference
MAX_TOKENS = 300  # thinking gets what the reserve leaves: 300 - 256 - 3 = 41 tokens


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("rules") / "m",
        with_tokenizer=True,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
    )
    return load(path)


def done(events) -> Done:
    *_, last = list(events)
    assert isinstance(last, Done), last
    return last


def test_held_schema_closes_objects_bounds_values_and_keeps_what_is_said():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "n": {"type": ["number", "null"]},
            "i": {"type": "integer", "minimum": 0},
            "open": {"type": "object", "additionalProperties": True},
            "e": {"enum": [{"type": "object"}]},  # a value, not a schema: left alone
            "properties": {"type": "string", "maxLength": 3},  # a property so named
        },
    }
    held = held_schema(schema)
    top = 10**DEFAULT_MAX_DIGITS - 1
    assert held["additionalProperties"] is False
    props = held["properties"]
    assert props["s"]["maxLength"] == DEFAULT_MAX_STRING
    assert props["n"]["maximum"] == top and props["n"]["minimum"] == -top
    assert props["n"]["multipleOf"] == 10.0**-DEFAULT_FRACTION_DIGITS
    assert props["i"] == {"type": "integer", "minimum": 0, "maximum": top}
    assert props["open"]["additionalProperties"] is True
    assert props["e"] == {"enum": [{"type": "object"}]}
    assert props["properties"] == {"type": "string", "maxLength": 3}
    assert "additionalProperties" not in schema and "maxLength" not in schema["properties"]["s"]


def test_tool_parameters_with_refs_resolve_where_they_are_placed():
    params = MODELS[0].model_json_schema()  # Person: its Address is a "#/$defs/Address"
    schema = tool_call_schema([{"name": "f", "parameters": params}])
    args = schema["$defs"]["tool0"]
    assert schema["properties"]["arguments"] == {"$ref": "#/$defs/tool0"}
    assert args["properties"]["home"]["$ref"] == "#/$defs/tool0/$defs/Address"
    assert args["$defs"]["Address"]["additionalProperties"] is False


def test_tool_choice_forms_and_their_errors_name_tool_choice():
    allowed = {"mode": "required", "tools": [{"type": "function", "function": {"name": "a"}}]}
    assert tool_choice_mode({"type": "allowed_tools", "allowed_tools": allowed}) == (
        "required",
        ("a",),
    )
    flat = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "b"}]}
    assert tool_choice_mode(flat) == ("auto", ("b",))
    assert tool_choice_mode({"type": "function", "function": {"name": "c"}}) == ("required", ("c",))
    for bad in ({"type": "allowed_tools", "allowed_tools": {"mode": "any"}}, 3, {"type": "x"}):
        with pytest.raises(ConstraintError) as e:
            tool_choice_mode(bad)
        assert e.value.param == "tool_choice"


def test_reserve_leaves_room_for_the_answer_and_a_given_budget_wins():
    assert reserved_think_budget(None, 400) == 400 - DEFAULT_ANSWER_RESERVE - 3
    assert reserved_think_budget(None, 100) == 0
    assert reserved_think_budget(None, 400, reserve=100) == 297
    assert reserved_think_budget(50, 400) == 50
    assert reserved_think_budget(None, None) is None


def test_every_shape_parses_and_validates_while_thinking_on_a_random_model(random_model):
    model, tok = random_model
    assert len(SCHEMAS) >= 20
    thought = 0
    for i, schema in enumerate(SCHEMAS):
        mx.random.seed(i)
        chat = Chat(model, think=True, max_tokens=MAX_TOKENS)  # default sampling and reserve
        last = done(chat.send("Answer in JSON.", response_format=schema))
        where = f"schema {i}: {last.answer!r}"
        assert last.finish_reason == "stop", where
        assert last.stats.thinking_tokens <= MAX_TOKENS - DEFAULT_ANSWER_RESERVE - 3, where
        thought += last.stats.thinking_tokens > 0
        jsonschema.validate(json.loads(last.answer), schema)
        assert last.parsed == json.loads(last.answer)
    assert thought >= 5  # the random model opened its think block in many of them


def test_a_pydantic_answer_parses_into_its_model_every_run(random_model):
    model, tok = random_model
    for seed in range(2):
        mx.random.seed(seed)
        chat = Chat(model, think=True, max_tokens=MAX_TOKENS)
        last = done(chat.send("Who?", response_format=MODELS[0]))
        assert last.finish_reason == "stop" and isinstance(last.parsed, MODELS[0])


def test_no_tools_or_tool_choice_none_writes_no_call(random_model, monkeypatch):
    model, tok = random_model
    call_id = tok.token_to_id("<tool_call>")
    tool = {"name": "f", "parameters": MODELS[4].model_json_schema()}  # Weather

    def urge(tokens, logits):  # a model that wants nothing but calls
        return logits + 50.0 * (mx.arange(logits.shape[-1]) == call_id)

    monkeypatch.setattr(Sampling, "logits_processors", lambda self: [urge])
    for tools, choice in ((None, "auto"), ([tool], "none"), ([tool], "auto")):
        mx.random.seed(0)
        chat = Chat(model, think=False, max_tokens=30, tools=tools, tool_choice=choice)
        last = done(chat.send("Call it."))
        if choice == "auto" and tools:  # the control: calls come when they may
            assert last.tool_calls
        else:
            assert last.tool_calls == () and "<tool_call>" not in last.answer


def test_parallel_tool_calls_off_closes_the_answer_after_one_call(random_model):
    _, tok = random_model
    tool = {"name": "f", "parameters": MODELS[10].model_json_schema()}  # Choice
    call = (
        '<tool_call>\n{"name": "f", "arguments": {"answer": "no", "confidence": 1}}\n</tool_call>'
    )
    for choice in ("required", "auto"):
        for parallel in (True, False):
            c = make_answer_constraint(
                tok, tools=[tool], tool_choice=choice, parallel_tool_calls=parallel
            )
            for t in tok.encode(call, allow_special=True):
                c._advance(t)
            allowed = c.mask()
            assert c.complete and allowed[tok.im_end_id]
            # another call ("\n<tool_call>" in required mode, text then a call in auto) or not
            assert bool(allowed[tok.encode("\n")[0]]) == parallel or choice == "auto"
            if choice == "auto":
                for t in tok.encode(" ok "):
                    c._advance(t)
                assert bool(c.mask()[tok.token_to_id("<tool_call>")]) == parallel


def test_a_required_call_with_nested_refs_is_valid_every_run(random_model):
    model, tok = random_model
    tool = {"name": "order", "parameters": MODELS[1].model_json_schema()}
    for seed in range(2):
        mx.random.seed(seed)
        chat = Chat(model, think=True, max_tokens=MAX_TOKENS, tools=[tool], tool_choice="required")
        events = list(chat.send("Order something."))
        last = events[-1]
        assert last.finish_reason == "stop" and last.tool_calls, last
        for call in last.tool_calls:
            assert isinstance(call, ToolCall) and call.name == "order"
            MODELS[1].model_validate(call.arguments)
