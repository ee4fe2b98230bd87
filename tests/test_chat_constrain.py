"""Thinking budgets, "answer now", structured answers and tool choice through Chat and the CLI,
on the tiny trained SmolLM3 (real think blocks, answers and tool calls)."""

import json
import subprocess
import sys

import jsonschema
import pytest
from checkpoints import REPO_ROOT, requires_reference
from trained_model import QUESTIONS, THOUGHTS, TOOLS, answer, assistant, trained_checkpoint

from smollm3_mlx import (
    AnswerDelta,
    Chat,
    ConstraintError,
    Sampling,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    load,
)
from smollm3_mlx.cli.repl import interrupt
from smollm3_mlx.constrain import DEFAULT_HANDOFF

pytestmark = requires_reference
GREEDY = Sampling(temperature=0.0, top_p=1.0)
DIGIT = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir)[0]


def turn(chat, text, **options):
    events = list(chat.send(text, **options))
    return events, events[-1]


@pytest.mark.parametrize(
    "budget, handoff, thought",
    [
        (3, DEFAULT_HANDOFF, "Two plus"),  # no room for the hand-off: closed as it stood
        (5, "\n", "Two plus two"),
        (None, DEFAULT_HANDOFF, DEFAULT_HANDOFF.strip()),  # 1 + the hand-off's tokens
    ],
)
def test_thinking_budget_holds_exactly_and_an_answer_follows(model, budget, handoff, thought):
    tok = model.info.tokenizer
    if budget is None:
        budget = 1 + len(tok.encode(handoff))
    chat = Chat(model, sampling=GREEDY, think_budget=budget, handoff=handoff)
    _, done = turn(chat, QUESTIONS["math"])
    assert done.stats.thinking_tokens == budget and done.thinking == thought
    assert done.finish_reason == "stop" and (done.answer or done.tool_calls)
    message = chat.messages[-1]  # the think block closed, its text kept apart from the answer
    assert message["reasoning_content"].startswith("\n") and "reasoning_open" not in message
    assert message["reasoning_content"].strip() == thought
    s = done.stats  # <think>, the thinking, </think>, the answer, end of turn
    assert s.generation_tokens == 1 + s.thinking_tokens + 1 + s.answer_tokens + 1


@pytest.mark.parametrize("think", [True, False], ids=["think", "no-think"])
def test_after_a_forced_close_the_history_is_valid_and_the_cache_reused(model, think):
    chat = Chat(model, sampling=GREEDY, think_budget=3)
    _, first = turn(chat, QUESTIONS["math"])
    assert first.stats.thinking_tokens == 3
    chat.think = think
    _, second = turn(chat, QUESTIONS["hi"])
    assert second.answer == answer("hi") and second.finish_reason == "stop"
    if think:  # the first turn, forced close included, is reused (the mode is unchanged)
        closed = first.stats.prompt_tokens + 1 + first.stats.thinking_tokens + 2  # </think>\n
        assert closed <= second.stats.cached_tokens


def test_a_per_turn_budget_overrides_the_chats(model):
    chat = Chat(model, sampling=GREEDY, think_budget=2)
    _, done = turn(chat, QUESTIONS["math"], think_budget=5)
    assert done.stats.thinking_tokens == 5
    _, done = turn(chat, QUESTIONS["hi"])
    assert done.stats.thinking_tokens == 2
    with pytest.raises(ValueError, match="whole number"):
        turn(chat, QUESTIONS["hi"], think_budget=-1)
    assert len(chat.messages) == 4  # the refused turn left no message behind


def test_stop_thinking_answers_now_and_ctrl_c_in_the_answer_stops_the_turn(model):
    chat = Chat(model, sampling=GREEDY)
    assert chat.stop_thinking() is False  # no turn
    asked = []
    for event in chat.send(QUESTIONS["math"]):
        if isinstance(event, ThinkingDelta) and not asked:
            asked = [chat.stop_thinking(), chat.stop_thinking()]
        done = event
    assert asked == [True, False]  # a second request is refused (the CLI then cancels)
    assert done.thinking.endswith(DEFAULT_HANDOFF.strip()) and done.finish_reason == "stop"
    assert done.stats.thinking_tokens < len(chat.tokenizer.encode(THOUGHTS["math"])) + 40
    assert done.answer or done.tool_calls
    _, after = turn(chat, QUESTIONS["hi"])  # the history stays a valid transcript
    assert after.answer == answer("hi")

    # Ctrl-C in the terminal: while thinking, answer now; during the answer, stop the turn.
    chat = Chat(model, sampling=GREEDY, think=False)
    for event in chat.send(QUESTIONS["sing"]):
        if isinstance(event, AnswerDelta) and event.text.strip():
            interrupt(chat)
        done = event
    assert done.finish_reason == "cancelled" and chat.messages[-1]["interrupted"]
    chat = Chat(model, sampling=GREEDY)
    pressed = False
    for event in chat.send(QUESTIONS["math"]):
        if isinstance(event, ThinkingDelta) and not pressed:
            interrupt(chat)
            pressed = True
        done = event
    assert done.finish_reason == "stop" and done.thinking.endswith(DEFAULT_HANDOFF.strip())


def test_with_prompt_lookup_and_no_budget_the_turn_drafts_and_cannot_stop_thinking(model):
    chat = Chat(model, sampling=GREEDY, prompt_lookup=4)
    asked = [
        chat.stop_thinking() for e in chat.send(QUESTIONS["math"]) if e.__class__ is ThinkingDelta
    ]
    assert asked and not any(asked)
    assert chat.messages[-1] == assistant("math", True)


def test_a_structured_answer_comes_after_free_thinking(model):
    chat = Chat(model, sampling=GREEDY)
    _, done = turn(chat, QUESTIONS["math"], response_format=DIGIT)
    assert done.thinking == THOUGHTS["math"]  # the thinking is the model's own
    jsonschema.validate(done.parsed, DIGIT)
    assert json.loads(done.answer) == done.parsed and done.finish_reason == "stop"
    _, done = turn(chat, QUESTIONS["hi"], response_format=["yes", "no"], think_budget=2)
    assert done.parsed in ("yes", "no") and done.answer == done.parsed
    assert done.stats.thinking_tokens == 2
    _, done = turn(chat, QUESTIONS["hi"])  # the next turn is free again
    assert done.parsed is None and done.answer == answer("hi")


def test_a_cut_answer_has_no_parsed_value_and_a_bad_format_no_turn(model):
    chat = Chat(model, sampling=GREEDY, think=False, max_tokens=2)
    _, done = turn(chat, QUESTIONS["math"], response_format=DIGIT)
    assert done.finish_reason == "length" and done.parsed is None
    with pytest.raises(ConstraintError, match="Invalid type"):
        turn(chat, QUESTIONS["hi"], response_format={"type": "strin"})
    assert len(chat.messages) == 2


def test_tool_calls_validate_and_tool_choice_is_obeyed(model):
    chat = Chat(model, sampling=GREEDY, think=False, tools=TOOLS)
    events, done = turn(chat, QUESTIONS["weather"])  # "auto": the model's own call
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert done.tool_calls == (ToolCall("get_weather", {"city": "Paris"}),)
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
    assert events.index(deltas[-1]) < events.index(done.tool_calls[0])
    chat.reset()
    _, done = turn(chat, QUESTIONS["weather"], tool_choice="none")
    assert done.tool_calls == () and done.answer
    # A question the model answers without tools: the calls it is made to write are the
    # constraint's work alone, so their values are bounded for the turn to end.
    bounded = json.loads(json.dumps(TOOLS))
    bounded[0]["parameters"]["properties"]["city"]["maxLength"] = 8
    bounded[1]["parameters"]["properties"]["celsius"] = {
        "type": "integer",
        "minimum": 0,
        "maximum": 99,
    }
    schemas = {t["name"]: t["parameters"] for t in bounded}
    chat = Chat(model, sampling=GREEDY, think=False, tools=bounded, max_tokens=80)
    for choice, names in [("required", set(schemas)), ("to_fahrenheit", {"to_fahrenheit"})]:
        chat.reset()
        _, done = turn(chat, QUESTIONS["math"], tool_choice=choice)
        assert done.tool_calls and done.finish_reason == "stop"
        for call in done.tool_calls:
            assert call.name in names
            jsonschema.validate(call.arguments, schemas[call.name])


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_generate_think_budget_and_json_schema(model_dir, tmp_path):
    m = ["generate", "-m", str(model_dir), "--temp", "0"]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(DIGIT))
    r = cli(*m, "--think-budget", "3", "--json-schema", schema, "--format", "json", "What?")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["stats"]["thinking_tokens"] == 3 and data["parsed"] == json.loads(data["answer"])
    jsonschema.validate(data["parsed"], DIGIT)
    r = cli(*m, "--json-schema", schema, "--no-think", "--max-tokens", "2", QUESTIONS["hi"])
    assert r.returncode == 1 and "cut by --max-tokens" in r.stderr
    assert r.stdout.startswith('{"')  # what came, as text mode prints it
    for text in ('{"type": "strin"}', "not json"):
        schema.write_text(text)
        r = cli(*m, "--json-schema", schema, QUESTIONS["hi"])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stdout == "", r.stderr
        assert str(schema) in r.stderr
