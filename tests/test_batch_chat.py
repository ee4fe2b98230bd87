"""Batched chat turns on the tiny trained SmolLM3 (real think blocks, answers and tool calls):
thinking on and off, answers held to a schema, tool grammars and thinking budgets, each row
token for token what it is alone."""

import subprocess
import sys

import pytest
from checkpoints import REPO_ROOT, requires_reference
from trained_model import QUESTIONS, TOOLS, answer, trained_checkpoint

from smollm3_mlx import Sampling, load
from smollm3_mlx.batch import stream_batch
from smollm3_mlx.constrain import make_answer_constraint, make_think_budget
from smollm3_mlx.generate import stream_generate

pytestmark = requires_reference
GREEDY = Sampling(temperature=0.0, top_p=1.0)
DIGIT = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


def prompt(tokenizer, key, think, tools=None):
    messages = [{"role": "user", "content": QUESTIONS[key]}]
    return tokenizer.apply_chat_template(
        messages, tokenize=True, enable_thinking=think, tools=tools
    )


def requests(tokenizer):
    """Eight turns of mixed lengths: thinking on and off, free and constrained."""

    def tool_grammar():
        return [make_answer_constraint(tokenizer, tools=TOOLS, tool_choice="required")]

    return [
        dict(prompt=prompt(tokenizer, "math", True)),
        dict(prompt=prompt(tokenizer, "hi", False)),
        dict(prompt=prompt(tokenizer, "math", True), response_format=DIGIT),
        dict(prompt=prompt(tokenizer, "math", False), response_format=DIGIT),
        dict(prompt=prompt(tokenizer, "sing", True), max_tokens=40),
        dict(
            prompt=prompt(tokenizer, "weather", True, TOOLS),
            logits_processors=tool_grammar,
        ),
        dict(
            prompt=prompt(tokenizer, "hi", True),
            logits_processors=lambda: [make_think_budget(tokenizer, 3)],
        ),
        dict(prompt=prompt(tokenizer, "weather", False, TOOLS)),
    ]


def made(request):
    """The request with its processors made fresh (a processor serves one generation)."""
    out = dict(request)
    if callable(out.get("logits_processors")):
        out["logits_processors"] = out["logits_processors"]()
    return out


def run_alone(model, tokenizer, request):
    r = made(request)
    responses = list(stream_generate(model, tokenizer, r.pop("prompt"), sampling=GREEDY, **r))
    return [x.token for x in responses[:-1]], responses[-1]


@pytest.mark.parametrize("size", [2, 8])
def test_chat_turns_batched_are_token_for_token_the_turns_alone(loaded, size):
    model, tokenizer = loaded
    reqs = requests(tokenizer)[:size]
    got = [[] for _ in reqs]
    last = [None] * len(reqs)
    for i, r in stream_batch(model, tokenizer, [made(r) for r in reqs], sampling=GREEDY):
        if r.finish_reason is None:
            got[i].append(r.token)
        else:
            last[i] = r
    for req, tokens, end in zip(reqs, got, last, strict=True):
        want, want_end = run_alone(model, tokenizer, req)
        assert tokens == want
        assert (end.finish_reason, end.parsed) == (want_end.finish_reason, want_end.parsed)
    assert tokenizer.decode(got[1]) == answer("hi")  # the model answers as it was trained
    assert last[1].finish_reason == "stop"


def test_the_batch_example_answers_every_question_as_alone(loaded, tmp_path_factory):
    path = trained_checkpoint(tmp_path_factory)
    r = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "batch.py"),
            str(path),
            QUESTIONS["math"],
            QUESTIONS["hi"],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert f"> {QUESTIONS['hi']}\n{answer('hi')}\n" in r.stdout
    assert f"> {QUESTIONS['math']}\n{answer('math')}\n" in r.stdout
