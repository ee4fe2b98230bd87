"""The terminal as a person meets it: the chat's line editor in a pseudo-terminal, help, options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pexpect
import pytest
from checkpoints import REFERENCE_MODEL_DIR, requires_reference
from trained_model import QUESTIONS, trained_checkpoint
from typer.testing import CliRunner

from smollm3_mlx.cli import app as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = r"›(?:\x1b\[[0-9;]*m)* "
EDITOR_DONE = "\x1b[?2004l"  # the line editor hands a message over: bracketed paste off
LEFT, UP, ALT_ENTER = "\x1b[D", "\x1b[A", "\x1b\r"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def _env(state):
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "XDG_STATE_HOME": str(state), "TERM": "xterm",
            "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip


def _chat(model_dir, state, *args):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "smollm3_mlx.cli", "chat", "-m", str(model_dir), "--temp", "0", *args],
        env=_env(state),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 120),
    )
    child.expect(PROMPT)
    return child


def _enter(child, keys):
    """Type `keys` then Enter; wait until the editor has handed the message to the chat."""
    child.send(keys + "\r")
    child.expect_exact(EDITOR_DONE)
    child.expect(PROMPT)


def _saved(child, path):
    _enter(child, f"/save {path}")
    return json.loads(path.read_text())


def _exit(child):
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@requires_reference
def test_line_editor_edits_recalls_history_across_sessions_and_keeps_pastes_whole(
    model_dir, tmp_path
):
    state = tmp_path / "state"
    child = _chat(model_dir, state, "--max-tokens", "2", "--no-think")
    # Arrow keys move the cursor (they used to reach the model as ^[[D).
    _enter(child, "/system Be brif." + LEFT * 2 + "e")
    assert _saved(child, tmp_path / "a.json")["messages"][0]["content"] == "Be brief."
    # Esc then Enter (Alt+Enter) starts a new line instead of sending.
    _enter(child, "/system one" + ALT_ENTER + "two")
    assert _saved(child, tmp_path / "b.json")["messages"][0]["content"] == "one\ntwo"
    # A 10,000-character line arrives whole (the terminal's canonical mode cut it at 4095).
    long = "/system " + "".join(f"{i:05d} " for i in range(1666))[:9992]
    assert len(long) == 10_000
    _enter(child, long)
    assert _saved(child, tmp_path / "c.json")["messages"][0]["content"] == long[len("/system ") :]
    _enter(child, "/reset")
    _enter(child, "/system")
    # A multi-line paste is one message, sent with Enter.
    pasted = "line one\nline two\nline three"
    _enter(child, PASTE_START + pasted + PASTE_END)
    users = [m for m in _saved(child, tmp_path / "d.json")["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == [pasted]
    _exit(child)

    history = (state / "smollm3-mlx" / "history").read_text()
    assert (
        "+line two" in history
        and oct((state / "smollm3-mlx" / "history").stat().st_mode)[-3:] == "600"
    )
    # Up recalls what was typed in the earlier session: "/exit", "/save …d.json", the paste.
    child = _chat(model_dir, state, "--max-tokens", "2", "--no-think")
    _enter(child, UP * 3)
    users = [m for m in _saved(child, tmp_path / "e.json")["messages"] if m["role"] == "user"]
    assert [m["content"] for m in users] == [pasted]
    _exit(child)


@requires_reference
def test_generate_without_a_prompt_on_a_terminal_says_what_it_expects(model_dir, tmp_path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "smollm3_mlx.cli", "generate", "-m", str(model_dir), "--temp", "0"],
        env=_env(tmp_path / "state"),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 120),
    )
    child.expect("no prompt given: type it here")
    child.expect(PROMPT)
    child.send(QUESTIONS["math"] + "\r")
    child.expect_exact("2 + 2 = 4.")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


COMMANDS = ["chat", "generate", "convert", "bench"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_shows_what_values_mean_not_python_types(command):
    r = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert not re.search(r"<(bool|str|int|float|path)>", r.output), r.output
    if command in (["chat"], ["generate"]):
        text = " ".join(r.output.split())
        assert "--max-tokens N" in text and "--model -m FOLDER|REPO" in text
        assert "131072" not in text and "max_position_embeddings" in text


def test_version_prints_the_package_and_mlx_versions():
    from smollm3_mlx import __version__

    r = CliRunner().invoke(cli.app, ["--version"])
    assert r.exit_code == 0
    assert re.fullmatch(rf"smollm3-mlx {re.escape(__version__)} \(mlx [\d.]+\)\n", r.output)


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "--prompt-lookup", "-3"], "--prompt-lookup must be at least 0, not -3"),
        (["generate", "--seed", "-1", "hi"], "--seed must be from 0 to"),
        (["generate", "--temp", "-1", "hi"], "--temp must be at least 0, not -1.0"),
        (["generate", "--temp", "nan", "hi"], "--temp must be at least 0, not nan"),
        (["generate", "--top-p", "2", "hi"], "--top-p must be more than 0 and at most 1, not 2.0"),
        (["generate", "--top-p", "0", "hi"], "--top-p must be more than 0"),
        (["generate", "--max-tokens", "-5", "hi"], "--max-tokens must be at least 1, not -5"),
        (["chat", "--max-context", "0"], "--max-context must be at least 1, not 0"),
        (["chat", "--kv-start", "-1"], "--kv-start must be at least 0, not -1"),
        (["serve", "--port", "65536"], "--port must be from 0 to 65535, not 65536"),
        (["serve", "--port", "-1"], "--port must be from 0 to 65535, not -1"),
        (["serve", "--queue", "-1"], "--queue must be at least 0, not -1"),
        (["serve", "--max-batch", "0"], "--max-batch must be at least 1, not 0"),
        (["estimate", "--batch", "0"], "--batch must be at least 1, not 0"),
        (["serve", "--kv-bits", "3"], "--kv-bits must be 4 or 8, not 3"),
        (["chat", "--kv-bits", "3"], "--kv-bits must be 4 or 8, not 3"),
        (["generate", "--think-budget", "-1", "hi"], "--think-budget must be at least 0, not -1"),
        (["serve", "--cache-bytes", "lots"], "--cache-bytes must be a size like 2G"),
        (["serve", "--cache-dir-bytes", "-1G"], "--cache-dir-bytes must be a size like 2G"),
        (["serve", "--cache-bytes", "inf"], "--cache-bytes must be a size like 2G"),
        (["serve", "--cache-dir", __file__], "--cache-dir " + __file__ + ": cannot use it as a"),
        (["serve", "--api-key", "clé"], "--api-key must be visible ASCII characters"),
        (["serve", "--api-key", "two words"], "--api-key must be visible ASCII characters"),
    ],
)
def test_bad_option_values_are_one_line_before_loading(args, message):
    r = CliRunner().invoke(cli.app, [*args, "-m", "/nonexistent/model"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and message in r.output, r.output


def test_files_we_read_for_a_command_are_one_line_before_loading(tmp_path):
    """A schema nested deeper than any reader of it could go; an empty system prompt."""
    deep, empty = tmp_path / "deep.json", tmp_path / "empty.txt"
    deep.write_text("[" * 5000 + "]" * 5000)
    empty.write_text(" \n")
    for args, message in [
        (["generate", "--json-schema", str(deep), "hi"], "nested more than 64 levels deep"),
        (["cache-prompt", "--system", str(empty), "-o", str(tmp_path / "x")], "is empty"),
    ]:
        r = CliRunner().invoke(cli.app, [*args, "-m", "/nonexistent/model"])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and message in r.output, r.output


@requires_reference
def test_generate_json_offers_no_tools_so_no_call_is_opened_and_the_thinking_is_kept(model_dir):
    r = subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", "generate", "-m", str(model_dir), "--temp", "0",
         "--format", "json", QUESTIONS["weather"]],
        capture_output=True, text=True, env=_env(model_dir.parent / "state"), timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    # The trained model wants get_weather, but generate offers no tools: with none offered no
    # call can be opened (the server's and Chat's rule), so none is parsed or reported.
    assert data["thinking"] == "I should call the weather tool."
    assert data["tool_calls"] == [] and "tool_call_errors" not in data
    assert "<tool_call>" not in data["answer"]


@requires_reference
def test_chat_prompt_shows_while_the_model_loads_and_the_first_answer_waits_for_it(
    model_dir, monkeypatch
):
    from smollm3_mlx import loading
    from smollm3_mlx.cli import console

    asked, real_load, real_reader = threading.Event(), loading.load, console.chat_reader
    order = []

    def slow_load(*args, **kwargs):
        order.append("prompt shown before the load" if asked.wait(60) else "load first")
        return real_load(*args, **kwargs)  # in the loading thread: its arrays serve the turn

    def reader(**kwargs):
        ask = real_reader(**kwargs)

        def first(think):
            asked.set()
            return ask(think)

        return first

    monkeypatch.setattr(loading, "load", slow_load)
    monkeypatch.setattr(console, "chat_reader", reader)
    r = CliRunner().invoke(
        cli.app, ["chat", "-m", str(model_dir), "--temp", "0"], input=QUESTIONS["math"] + "\n"
    )
    assert r.exit_code == 0, r.output
    assert order == ["prompt shown before the load"]
    assert "2 + 2 = 4." in r.output


@requires_reference
def test_chat_with_a_wrong_folder_fails_before_the_prompt_and_a_broken_one_at_the_first_message(
    model_dir, tmp_path
):
    r = CliRunner().invoke(cli.app, ["chat", "-m", str(tmp_path)], input="hi\n")
    assert r.exit_code == 1 and "›" not in r.output
    assert r.output.count("\n") == 1 and "no config.json" in r.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.name != "tokenizer.json":
            (broken / f.name).symlink_to(f)
    r = CliRunner().invoke(cli.app, ["chat", "-m", str(broken)], input="hi\n")
    assert r.exit_code == 1 and "›" in r.output
    assert "error:" in r.output and "tokenizer.json" in r.output


# A slow model: 0.2 s per prefill chunk of 4 tokens (a tiny model's own chunk would be the whole
# prompt); each chunk is counted in a file, so that a test sees how many ran after Ctrl-C.
SLOW_PREFILL = """
import importlib, sys, time
from smollm3_mlx import model
from smollm3_mlx.cli import app as cli

importlib.import_module("smollm3_mlx.step").default_prefill_step = lambda m: 4
forward, counts = model.Model.__call__, sys.argv[1]

def slow(self, inputs, cache=None):
    if inputs.shape[1] > 1:
        with open(counts, "a") as f:
            f.write("chunk\\n")
        time.sleep(0.2)
    return forward(self, inputs, cache=cache)

model.Model.__call__ = slow
sys.argv = ["smollm3-mlx", *sys.argv[2:]]
cli.app()
"""


def _slow(model_dir, tmp_path, *args):
    chunks = tmp_path / "chunks"
    child = pexpect.spawn(
        sys.executable,
        ["-c", SLOW_PREFILL, str(chunks), *args, "-m", str(model_dir), "--temp", "0"],
        env=_env(tmp_path / "state"),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 160),
    )
    return child, lambda: len(chunks.read_text().splitlines()) if chunks.exists() else 0


@requires_reference
@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_long_prefill_shows_its_progress_and_ctrl_c_stops_it_within_a_chunk(
    model_dir, tmp_path, command
):
    child, chunks = _slow(
        model_dir, tmp_path, command, *([QUESTIONS["math"]] * (command != "chat"))
    )
    if command == "chat":
        child.expect(PROMPT)
        child.send(QUESTIONS["math"] + "\r")
    child.expect(r"reading the prompt: (\d+) of (\d+) tokens, [\d.]+ tok/s, \d+ s \(Ctrl-C stops\)")
    total = int(child.match.group(2))
    seen = chunks()
    child.sendintr()
    if command == "chat":
        child.expect("interrupted")
        child.expect(PROMPT)
        ran = chunks()
        _exit(child)
    else:
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130
        ran = chunks()
    assert total > 200 and seen <= ran <= seen + 1  # counted as they start: perhaps one more
    assert ran < total // 4 - 1


@requires_reference
def test_prefill_chunks_are_a_few_tokens_of_the_3b_on_the_cpu_and_512_on_a_gpu(monkeypatch):
    import mlx.core as mx

    from smollm3_mlx.model import Model, ModelArgs
    from smollm3_mlx.step import default_prefill_step

    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    big = Model(ModelArgs.from_dict(config))  # SmolLM3-3B's shapes; lazy, nothing is allocated
    tiny = Model(ModelArgs.from_dict({**config, "num_hidden_layers": 2, "hidden_size": 64,
                                      "intermediate_size": 256, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "vocab_size": 512,
                                      "no_rope_layers": [1, 0]}))  # fmt: skip
    wrapper = lambda inputs, cache=None: big(inputs, cache=cache)  # noqa: E731
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert [default_prefill_step(m) for m in (big, tiny, wrapper)] == [4, 512, 512]
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert default_prefill_step(big) == 512


@requires_reference
def test_a_prompt_too_long_names_the_longest_context_this_model_allows(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    most = 2 * config["max_position_embeddings"]
    r = CliRunner().invoke(
        cli.app, ["generate", "-m", str(model_dir), "--max-context", "40", QUESTIONS["hi"]]
    )
    assert r.exit_code == 1 and "131072" not in r.output
    assert f"(raise --max-context; this model allows up to {most})" in r.output


# A load that takes minutes, its thread inside MLX work all along; each phase says it began.
LOAD_IN_MLX = """
import sys, time
import mlx.core as mx
from smollm3_mlx import loading
from smollm3_mlx.cli import repl

def load(*args, **kwargs):
    print("LOADING", flush=True)
    a = mx.random.normal((256, 256))
    end = time.monotonic() + 300
    while time.monotonic() < end:
        mx.eval(a @ a)
    raise SystemExit("still loading: the test should have ended this process")

wait = repl.Loading.wait

def waiting(self):
    print("WAITING", flush=True)
    return wait(self)

loading.load, repl.Loading.wait = load, waiting
sys.argv = ["smollm3-mlx", *sys.argv[1:]]
from smollm3_mlx.cli.app import app
app()
"""


def test_ctrl_c_while_the_chat_loads_the_model_ends_it_with_130(tmp_path):
    """Never an abort ("terminate called without an active exception", 134) from a process
    that exits beside a thread inside MLX; never a wait for the rest of the load either."""
    import signal

    from checkpoints import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "m", num_hidden_layers=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", LOAD_IN_MLX, "chat", "-m", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(tmp_path / "state"),
    )
    proc.stdin.write(b"hi\n")  # the first message waits for the model
    proc.stdin.flush()
    seen = set()
    while seen != {"LOADING", "WAITING"}:  # the load is in MLX, the chat waits for it
        line = proc.stdout.readline().decode().strip()
        assert line or proc.poll() is None, proc.stderr.read().decode()
        seen |= {word for word in ("LOADING", "WAITING") if line.endswith(word)}  # after a prompt
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "terminate" not in err.decode() and "Traceback" not in err.decode()
