"""The examples run as a user runs them, against the trained tiny SmolLM3."""

import json
import subprocess
import sys

import pytest
from checkpoints import REPO_ROOT, requires_reference
from trained_model import QUESTIONS, THOUGHTS, TOOL_RESULT, answer, trained_checkpoint

pytestmark = requires_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def example(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_long_document_reads_past_the_trained_window_with_yarn(model_dir, tmp_path):
    # The trained model's window is 2048 tokens; a ~3000-token document needs YaRN (factor 2).
    doc = tmp_path / "doc.txt"
    doc.write_text("The audit found nothing unusual in the ledgers. " * 300)
    r = example("long_document.py", model_dir, doc, "What did the audit find?",
                "--max-context", 4096, "--max-tokens", 8)  # fmt: skip
    assert r.returncode == 0, r.stderr
    n = int(r.stderr.split(" prompt tokens")[0].lstrip("["))
    assert 2048 < n < 4096
    r = example("long_document.py", model_dir, doc, "What did the audit find?",
                "--max-context", 2048)  # fmt: skip
    assert r.returncode == 1 and "no room left to answer in the 2048 allowed" in r.stderr
    r = example("long_document.py", model_dir, doc, "What did the audit find?",
                "--max-context", 4097)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "max_context 4097 is outside what this model supports (1 to 4096)" in r.stderr


def test_quickstart_prints_the_answer(model_dir):
    r = example("quickstart.py", model_dir, QUESTIONS["math"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == answer("math") + "\n"


def test_streaming_separates_thinking_and_answer(model_dir):
    r = example("streaming.py", model_dir, QUESTIONS["math"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == answer("math")
    assert THOUGHTS["math"] in r.stderr and "[stop: thought for" in r.stderr


def test_async_app_answers_while_its_loop_runs(model_dir):
    r = example("async_app.py", model_dir, QUESTIONS["math"], QUESTIONS["hi"])
    assert r.returncode == 0, r.stderr
    assert answer("math") in r.stdout and answer("hi") in r.stdout
    assert int(r.stdout.split("the loop ran ")[1].split()[0]) > 0


def test_cancellation_stops_the_song_and_keeps_the_history(model_dir):
    r = example("cancellation.py", model_dir, QUESTIONS["sing"])
    assert r.returncode == 0, r.stderr
    assert "[cancelled after " in r.stdout
    assert "[history: 4 messages, last interrupted: True]" in r.stdout


def test_tools_calls_the_python_function_and_answers(model_dir):
    r = example("tools.py", model_dir, QUESTIONS["weather"])
    assert r.returncode == 0, r.stderr
    assert "[get_weather({'city': 'Paris'}) -> " + TOOL_RESULT + "]" in r.stdout
    assert r.stdout.rstrip().endswith("It is sunny and 22 degrees in Paris.")


def test_structured_output_prints_values_that_validate(model_dir):
    r = example("structured_output.py", model_dir, QUESTIONS["math"])
    assert r.returncode == 0, r.stderr
    city, capital = r.stdout.splitlines()
    value = json.loads(city)
    assert {"name", "country", "landmarks"} <= set(value) and len(value["landmarks"]) <= 3
    assert capital in ("capital: yes", "capital: no")


def test_think_budget_stops_the_reasoning_at_the_budget(model_dir):
    for budget in (1, 3):
        r = example("think_budget.py", model_dir, QUESTIONS["math"], budget)
        assert r.returncode == 0, r.stderr
        assert f"[stop: thought for {budget} tokens (budget {budget}), answered in " in r.stderr
        assert r.stdout.strip()


def test_openai_client_streams_reasoning_and_answer_from_the_server(model_dir):
    server = subprocess.Popen(
        [sys.executable, "-m", "smollm3_mlx.cli", "serve", "--model", str(model_dir),
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        ready = server.stdout.readline()
        assert ready.startswith("ready: "), server.stderr.read()
        r = example("openai_client.py", QUESTIONS["math"], "--base-url", ready.split()[1])
        assert r.returncode == 0, r.stderr
        assert r.stdout == answer("math") + "\n"
        assert THOUGHTS["math"] in r.stderr and "of them thinking]" in r.stderr
        assert f"[no thinking] {answer('math')}" in r.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
