"""The server's engine runs a batch: requests join between steps, a short one is not held behind
a long one, each answer is its own, and the batch's size comes from the memory estimate."""

import threading

import mlx.core as mx
import pytest
from checkpoints import requires_reference
from trained_model import QUESTIONS, THOUGHTS, answer, trained_checkpoint

from smollm3_mlx import load, memory
from smollm3_mlx.sample import Sampling
from smollm3_mlx.serve.engine import Engine, Finished, Job, Started, Token, default_max_batch

pytestmark = requires_reference
GREEDY = Sampling(temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


class Collect:
    """A job's items, in order, with the order of every job's Finished across jobs."""

    ends: list[str] = []

    def __init__(self, name: str):
        self.name, self.items, self.done = name, [], threading.Event()
        self.first_token = threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, Token):
            self.first_token.set()
        if isinstance(item, Finished):
            Collect.ends.append(self.name)
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [i.id for i in self.items if isinstance(i, Token)]


def chat(tokenizer, key, think=True):
    messages = [{"role": "user", "content": QUESTIONS[key]}]
    return tokenizer.apply_chat_template(messages, tokenize=True, enable_thinking=think)


def test_a_short_request_answers_while_a_long_one_runs_and_each_answer_is_its_own(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=4, cache_bytes=0)
    Collect.ends = []
    song, math, hi = Collect("song"), Collect("math"), Collect("hi")
    engine.start()
    try:
        engine.submit(Job(chat(tokenizer, "sing"), 600, GREEDY, emit=song))
        assert song.first_token.wait(60)
        engine.submit(Job(chat(tokenizer, "math"), None, GREEDY, emit=math))
        engine.submit(Job(chat(tokenizer, "hi", think=False), None, GREEDY, emit=hi))
        assert math.done.wait(120) and hi.done.wait(120)
        assert engine.running == 1 and len(engine.records) == 2  # the song goes on
    finally:
        engine.stop()
    assert sorted(Collect.ends[:2]) == ["hi", "math"] and Collect.ends[2:] == ["song"]
    assert song.items[-1] == Finished("cancelled")  # stopping the engine cancelled it
    assert tokenizer.decode(hi.ids) == answer("hi")
    think = f"<think>\n{THOUGHTS['math']}\n</think>\n{answer('math')}"
    assert tokenizer.decode(math.ids) == think
    assert isinstance(hi.items[0], Started) and hi.items[-1] == Finished("stop")


def test_beyond_max_batch_requests_wait_in_the_queue_and_run_as_rows_free(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=2, queue_size=4, cache_bytes=0)
    jobs = [Collect(f"hi{i}") for i in range(4)]
    engine.start()
    try:
        for c in jobs:
            engine.submit(Job(chat(tokenizer, "hi", think=False), None, GREEDY, emit=c))
        assert all(c.done.wait(120) for c in jobs)
    finally:
        engine.stop()
    assert all(tokenizer.decode(c.ids) == answer("hi") for c in jobs)
    assert len(engine.records) == 4 and {r.reason for r in engine.records} == {"stop"}


def test_the_default_batch_is_the_largest_the_memory_estimate_allows(loaded, monkeypatch):
    model, _ = loaded
    monkeypatch.setattr(memory, "available_memory", lambda: (0, "unknown"))
    assert default_max_batch(model) == 1
    args, weights = model.args, sum(v.nbytes for v in _leaves(model.parameters()))
    est = memory.estimate(args, weights, context=model.max_context, dtype=mx.float32)
    budget = est.total + 2 * est.kv_cache + est.kv_cache // 3  # room for 3 rows, not 4
    monkeypatch.setattr(memory, "available_memory", lambda: (budget, "test"))
    assert default_max_batch(model) == 3


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]


def test_estimate_answers_for_a_batch():
    from checkpoints import REFERENCE_MODEL_DIR
    from typer.testing import CliRunner

    from smollm3_mlx.cli import app as cli

    args = ["estimate", "-m", str(REFERENCE_MODEL_DIR), "--bits", "4", "--max-context", "4096"]
    one = CliRunner().invoke(cli.app, args)
    four = CliRunner().invoke(cli.app, [*args, "--batch", "4"])
    assert one.exit_code == four.exit_code == 0, four.output
    assert "4 rows x 4096 tokens" in four.output and "rows x" not in one.output
