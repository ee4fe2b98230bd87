"""Constrained answers, tool calls and thinking budgets where the model cannot help: a random
SmolLM3 with the real 128,256-token vocabulary, sampled at temperature > 0."""

import json
import re
import threading

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference

from smollm3_mlx.constrain import (
    DEFAULT_HANDOFF,
    ConstraintError,
    make_answer_constraint,
    make_call_ban,
    make_think_budget,
)
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load
from smollm3_mlx.sample import make_sampler

pytestmark = requires_reference

SCHEMAS = [  # each bounded (maxLength, maxItems, ranges, enums) so that a random model finishes
    {"type": "boolean"},
    {"type": "null"},
    {"type": "integer", "minimum": -50, "maximum": 50},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
    {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    {"enum": ["red", "green", "blue"]},
    {"enum": ["é", "日本語", '"quoted"', "back\\slash", "tab\there", "new\nline", 3, None]},
    {"const": "fixed"},
    {"type": "string", "maxLength": 6},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"type": "string", "format": "date"},
    {"type": ["string", "null"], "maxLength": 4},
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "string", "maxLength": 3},
        ]
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 3},
    {
        "type": "array",
        "prefixItems": [
            {"type": "integer", "minimum": 0, "maximum": 99},
            {"type": "string", "maxLength": 3},
        ],
        "items": False,
    },
    {
        "$defs": {"tag": {"type": "string", "maxLength": 4}},
        "type": "array",
        "items": {"$ref": "#/$defs/tag"},
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "required": ["point"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": [1, 2, 3]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "maxItems": 2,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 99},
                "ok": {"type": "boolean"},
            },
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
    },
    {
        "type": "object",
        "properties": {
            "flag": {"type": "boolean"},
            "level": {"enum": ["low", "high"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "note": {"type": ["string", "null"], "maxLength": 5},
        },
        "required": ["flag", "level"],
        "additionalProperties": False,
    },
    {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "kind": {"const": "cat"},
                    "lives": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["kind", "lives"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
                "required": ["kind", "good"],
                "additionalProperties": False,
            },
        ]
    },
]
TOOLS = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
    {
        "type": "function",  # OpenAI's spelling is accepted too
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 9},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
            },
        },
    },
]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    # One small layer: the real vocabulary is what matters (a mask over all 128,256 tokens).
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("constrain") / "m",
        with_tokenizer=True,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    return load(path)


def no_think_prompt(tokenizer, text="Answer in JSON.", **kwargs):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, enable_thinking=False, **kwargs
    )


def run(model, tokenizer, prompt, processors, *, seed, max_tokens=48, temperature=2.0):
    """(generated ids, end of turn included, finish_reason)."""
    mx.random.seed(seed)
    ids, finish = [], None
    for r in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=make_sampler(temperature),
        logits_processors=processors,
    ):
        finish = r.finish_reason
        if r.token is not None:
            ids.append(r.token)
    if finish == "stop":
        ids.append(tokenizer.im_end_id)
    return ids, finish


def test_every_answer_parses_and_validates_on_a_random_model(random_model):
    model, tok = random_model
    assert len(SCHEMAS) >= 20 and tok.vocab_size == 128256
    # A no-think turn's last tokens: the answer starts at once (and prefill stays short).
    prompt = tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n", allow_special=True)
    for i, schema in enumerate(SCHEMAS):
        for seed in (i, 100 + i):
            constraint = make_answer_constraint(tok, schema)
            ids, finish = run(model, tok, prompt, [constraint], seed=seed)
            where = f"schema {i}, seed {seed}: {tok.decode(ids)!r}"
            # The bounds make every answer complete: "length" would be a value cut short.
            assert finish == "stop" and ids[-1] == tok.im_end_id, where
            text = tok.decode(ids[:-1])
            assert constraint.complete and constraint.text() == text, where
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
            assert constraint.parse() == json.loads(text)


def test_think_budget_holds_exactly_then_the_constrained_answer_comes(random_model):
    model, tok = random_model
    schema = SCHEMAS[19]
    # The prompt opens the think block, so the random model is thinking from the first token.
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    prompt += tok.encode("<think>\n", allow_special=True)
    handoff = tok.encode(DEFAULT_HANDOFF)
    for budget, seed in ((len(handoff) + 6, 0), (len(handoff) + 2, 1), (3, 2)):
        constraint = make_answer_constraint(tok, schema)
        budgeted = make_think_budget(tok, budget)
        ids, finish = run(model, tok, prompt, [budgeted, constraint], seed=seed, max_tokens=80)
        close = ids.index(tok.think_end_id)
        assert 1 + close == budget  # the prompt's "\n" after <think> is thinking too
        if budget > len(handoff):
            assert ids[close - len(handoff) : close] == handoff
        else:
            assert budget < len(handoff)  # no room for the hand-off: closed as it stood
        assert ids[close + 1] == tok.encode("\n")[0]
        assert finish == "stop"
        jsonschema.validate(json.loads(tok.decode(ids[close + 2 : -1])), schema)


def test_think_mode_answers_after_the_think_block_and_never_ends_inside_it(random_model):
    model, tok = random_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    constraint = make_answer_constraint(tok, SCHEMAS[6])
    logits = mx.zeros((1, tok.vocab_size))
    # At the start of a think-mode turn: <think> or the value's first tokens, never end of turn.
    allowed = np.array(constraint(mx.array(prompt), logits)[0]) > -np.inf
    assert allowed[tok.think_start_id] and not allowed[tok.im_end_id]
    assert allowed[tok.encode('"')[0]] and not allowed[tok.encode("x")[0]]
    thinking = prompt + [tok.think_start_id] + tok.encode("Hmm")
    allowed = np.array(constraint(mx.array(thinking), logits)[0]) > -np.inf
    assert allowed.sum() == tok.vocab_size - len(tok.eos_token_ids)
    assert not any(allowed[i] for i in tok.eos_token_ids)
    closed = thinking + [tok.think_end_id]
    out = np.array(constraint(mx.array(closed), logits)[0])
    assert np.flatnonzero(out > -np.inf).tolist() == tok.encode("\n")  # the template's newline


def test_budget_is_exact_with_and_without_hand_off_and_stop_answers_now(random_model):
    _, tok = random_model
    logits = mx.zeros((1, tok.vocab_size))
    start = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    word = tok.encode(" word")[0]

    def drive(processor, steps, stop_at=None):
        ids = list(start)
        for k in range(steps):
            if stop_at is not None and k == stop_at:
                processor.stop.set()
            out = np.array(processor(mx.array(ids), logits)[0])
            forced = np.flatnonzero(out > -np.inf)
            ids.append(
                int(forced[0]) if forced.size == 1 else tok.think_start_id if k == 0 else word
            )
        return ids[len(start) :]

    def thought(ids):
        return ids[ids.index(tok.think_start_id) + 1 : ids.index(tok.think_end_id)]

    handoff = tok.encode("\nDone thinking.\n")
    ids = drive(make_think_budget(tok, 7, handoff="\nDone thinking.\n"), 12)
    assert thought(ids) == [word] * (7 - len(handoff)) + handoff
    assert ids[ids.index(tok.think_end_id) + 1] == tok.encode("\n")[0]
    ids = drive(make_think_budget(tok, 2, handoff="\nDone thinking.\n"), 6)  # no room for it
    assert thought(ids) == [word, word]
    ids = drive(make_think_budget(tok, 0), 4)
    assert thought(ids) == []
    stop = threading.Event()
    ids = drive(make_think_budget(tok, stop=stop, handoff=""), 8, stop_at=4)
    assert thought(ids) == [word] * 3  # <think>, 3 words, then the flag: </think> at once
    with pytest.raises(ValueError, match="whole number"):
        make_think_budget(tok, -1)
    assert make_think_budget(tok) is None


def test_a_model_that_closes_its_thinking_itself_is_left_alone_but_cannot_reopen_it(
    random_model,
):
    _, tok = random_model
    budget = make_think_budget(tok, 5)
    logits = mx.zeros((1, tok.vocab_size))
    ids = tok.encode("<|im_start|>assistant\n<think>\nok\n</think>\n", allow_special=True)
    for more in ("", " more text"):
        ids += tok.encode(more)
        out = np.array(budget(mx.array(ids), logits)[0])
        tags = [tok.think_start_id, tok.think_end_id]
        assert (out[tags] == -np.inf).all()  # one think block a turn
        assert (np.delete(out, tags) == 0).all()


@pytest.mark.parametrize(
    "response_format, check",
    [
        ({"type": "regex", "pattern": r"[A-Z]{2}-\d{3}"}, r"[A-Z]{2}-\d{3}"),
        (re.compile(r"(yes|no), (because|since) [a-z]{1,6}"), None),
        ({"type": "choice", "choices": ['say "hi"', "naïve\\", "日本"]}, None),
        (['say "hi"', "naïve\\", "日本"], None),
    ],
)
def test_regex_and_choice_answers_match(random_model, response_format, check):
    model, tok = random_model
    for seed in (0, 1):
        constraint = make_answer_constraint(tok, response_format)
        ids, finish = run(model, tok, no_think_prompt(tok), [constraint], seed=seed)
        text = tok.decode(ids[:-1])
        assert finish == "stop" and constraint.parse() == text
        if isinstance(response_format, list):
            assert text in response_format
        elif isinstance(response_format, dict) and "choices" in response_format:
            assert text in response_format["choices"]
        else:
            pattern = check or response_format.pattern
            assert re.fullmatch(pattern, text), text


def test_openai_and_pydantic_response_formats(random_model):
    pydantic = pytest.importorskip("pydantic")
    model, tok = random_model

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        population: int = pydantic.Field(ge=0, le=999)
        capital: bool

    openai = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[19]}}
    for response_format, seed in ((City, 0), (openai, 1)):
        constraint = make_answer_constraint(tok, response_format)
        ids, finish = run(model, tok, no_think_prompt(tok), [constraint], seed=seed)
        assert finish == "stop"
        value = constraint.parse()
        if response_format is City:
            assert isinstance(value, City) and 0 <= value.population <= 999
        else:
            jsonschema.validate(value, SCHEMAS[19])
    constraint = make_answer_constraint(tok, {"type": "json_object"})
    assert constraint.matcher.consume_tokens(tok.encode('{"any": [1, {"b": null}]}'))
    assert constraint.matcher.is_accepting()
    assert make_answer_constraint(tok, {"type": "text"}) is None
    assert make_answer_constraint(tok, None) is None


def test_a_cut_answer_is_not_parsed(random_model):
    model, tok = random_model
    constraint = make_answer_constraint(tok, SCHEMAS[22])
    ids, finish = run(model, tok, no_think_prompt(tok), [constraint], seed=0, max_tokens=3)
    assert finish == "length" and not constraint.complete
    with pytest.raises(ValueError, match="not complete"):
        constraint.parse()


def calls_in(tok, ids):
    """The JSON of each <tool_call>...</tool_call> block, and the text outside them."""
    start, end = tok.token_to_id("<tool_call>"), tok.token_to_id("</tool_call>")
    calls, outside, open_at = [], [], None
    for i, t in enumerate(ids):
        if t == start:
            open_at = i
        elif t == end:
            calls.append(json.loads(tok.decode(ids[open_at + 1 : i])))
            open_at = None
        elif open_at is None:
            outside.append(t)
    assert open_at is None
    return calls, outside


def check_call(call, only=None):
    schemas = {"get_weather": TOOLS[0]["parameters"], "add": TOOLS[1]["function"]["parameters"]}
    assert set(call) == {"name", "arguments"} and call["name"] in (only or schemas)
    jsonschema.validate(call["arguments"], {**schemas[call["name"]], "additionalProperties": False})


@pytest.mark.parametrize(
    "tool_choice, only",
    [
        ("required", None),
        ("add", ["add"]),
        ({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"]),
    ],
)
def test_required_and_named_tool_choice_answer_with_valid_calls(random_model, tool_choice, only):
    model, tok = random_model
    prompt = no_think_prompt(tok, "Weather in Paris?", tools=TOOLS)
    for seed in (0, 1):
        constraint = make_answer_constraint(tok, tools=TOOLS, tool_choice=tool_choice)
        ids, finish = run(model, tok, prompt, [constraint], seed=seed, max_tokens=200)
        assert finish == "stop", tok.decode(ids)
        calls, outside = calls_in(tok, ids[:-1])
        assert calls and set(tok.decode(outside)) <= {"\n"}
        for call in calls:
            check_call(call, only)


def test_auto_tool_call_once_opened_is_valid_and_none_forbids_it(random_model):
    model, tok = random_model
    prompt = no_think_prompt(tok, "Weather in Paris?", tools=TOOLS)
    call_id = tok.token_to_id("<tool_call>")

    def open_call(tokens, logits):  # the random model would rarely open one by itself
        return logits + 100 * (mx.arange(logits.shape[-1]) == call_id) * (
            tokens.size == len(prompt)
        )

    for seed in (0, 1):
        constraint = make_answer_constraint(tok, tools=TOOLS)  # "auto"
        ids, _ = run(model, tok, prompt, [open_call, constraint], seed=seed, max_tokens=40)
        assert ids[0] == call_id
        end = ids.index(tok.token_to_id("</tool_call>"))
        check_call(calls_in(tok, ids[: end + 1])[0][0])
    assert make_answer_constraint(tok, tools=TOOLS, tool_choice="none") is None
    assert make_call_ban(tok, TOOLS) is None  # "auto": a call may come
    for none in (make_call_ban(tok, TOOLS, "none"), make_call_ban(tok)):  # no tools: the same
        out = np.array(none(mx.array(prompt), mx.zeros((1, tok.vocab_size)) + 1)[0])
        assert out[call_id] == -np.inf and (out > -np.inf).sum() == tok.vocab_size - 1
        ids, _ = run(model, tok, prompt, [open_call, none], seed=0, max_tokens=4)
        assert call_id not in ids


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
        ({"type": "object", "if": {"type": "object"}}, "if"),
        ({"type": "regex", "pattern": "[a-"}, "cannot constrain"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
        ({"type": "choice", "choices": []}, "non-empty strings"),
        ("just a string", "not str"),
    ],
)
def test_an_invalid_or_unsupported_format_is_an_error_before_any_token(
    random_model, response_format, message
):
    model, tok = random_model
    with pytest.raises(ConstraintError, match=re.escape(message)) as e:
        make_answer_constraint(tok, response_format)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    steps = stream_generate(model, tok, "Hi", max_tokens=4, response_format=response_format)
    with pytest.raises(ConstraintError):
        next(steps)  # before the first token


def test_stream_generate_holds_a_plain_prompt_and_parses_the_value(random_model):
    model, tok = random_model
    mx.random.seed(3)
    *_, last = stream_generate(
        model,
        tok,
        "Numbers:",
        max_tokens=48,
        sampler=make_sampler(2.0),
        response_format=SCHEMAS[15],
    )
    assert last.finish_reason == "stop"
    jsonschema.validate(last.parsed, SCHEMAS[15])


def test_a_tool_choice_that_cannot_be_met_is_an_error(random_model):
    _, tok = random_model
    with pytest.raises(ConstraintError, match="not an offered tool"):
        make_answer_constraint(tok, tools=TOOLS, tool_choice="send_email")
    with pytest.raises(ConstraintError, match="needs tools"):
        make_answer_constraint(tok, tool_choice="required")
    with pytest.raises(ConstraintError, match="auto, none, required"):
        make_answer_constraint(tok, tools=TOOLS, tool_choice=3)
    with pytest.raises(ConstraintError, match="tool_choice must be") as e:  # was AttributeError
        make_answer_constraint(tok, tools=TOOLS, tool_choice={"function": "get_weather"})
    assert e.value.param == "tool_choice"
