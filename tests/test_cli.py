"""The smollm3-mlx commands, driven as a user would, on the trained tiny SmolLM3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pytest
from checkpoints import requires_reference
from trained_model import QUESTIONS, answer, assistant, trained_checkpoint
from typer.testing import CliRunner

from smollm3_mlx.cli import app as cli

pytestmark = requires_reference
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = r"›(?:\x1b\[[0-9;]*m)* "  # the chat prompt, whatever styling the terminal gets
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(autouse=True)
def _own_history(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # not the user's chat history


def _env(**extra):
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    # pexpect answers no cursor-position request (a terminal does): tell the line editor so.
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "PROMPT_TOOLKIT_NO_CPR": "1",
            **extra}  # fmt: skip


EDITOR_DONE = "\x1b[?2004l"  # the line editor hands a message over: bracketed paste off


def say(child, line, dumb=False):
    """Type a line and Enter, and wait until the chat has it: the line editor draws the line as
    it is typed and again as it is sent (a dumb terminal: once, as typed)."""
    child.sendline(line)
    child.expect_exact(line if dumb else EDITOR_DONE)


def run(*args, stdin=None, **env):
    return subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
    )


def test_chat_in_a_terminal_thinks_switches_mode_interrupts_and_saves(model_dir, tmp_path):
    saved, bad = tmp_path / "chat.json", tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    child = pexpect.spawn(
        sys.executable,
        ["-m", "smollm3_mlx.cli", "chat", "-m", str(model_dir), "--temp", "0"],
        env=_env(TERM="xterm-256color"),
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 200),
    )
    screen = []

    def until(pattern):
        child.expect(pattern)
        screen.append(ANSI.sub("", child.before + child.after))
        return screen[-1]

    until(PROMPT)
    say(child, QUESTIONS["math"])
    shown = until(PROMPT)
    assert "thinking…" in shown and "Two plus two makes four." in shown
    assert re.search(r"────\s*\r?\n2 \+ 2 = 4\.", shown)
    assert re.search(r"\d+ tokens, [\d.]+ tok/s, first token [\d.]+ s", shown)
    assert "GB" in shown and "(no_think)" not in shown

    say(child, "/no_think")
    assert "thinking off" in until(PROMPT)
    say(child, QUESTIONS["hi"])
    shown = until(PROMPT)
    assert answer("hi") in shown and "thinking…" not in shown

    say(child, QUESTIONS["sing"])  # never ends on its own
    until("la la la")
    child.sendintr()
    shown = until(PROMPT)
    assert "interrupted" in shown and "(no_think)" in shown

    say(child, f"/load {bad}")
    assert "error:" in until(PROMPT)
    say(child, f"/save {saved}")
    assert "saved" in until(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    data = json.loads(saved.read_text())
    assert data["format"] == "smollm3-mlx-chat" and data["think"] is False
    assert data["model"] == str(model_dir) and data["sampling"]["temperature"] == 0.0
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert data["messages"][1] == assistant("math", True)  # thinking and answer kept apart
    assert data["messages"][3]["content"] == answer("hi")
    song = data["messages"][5]
    assert song["interrupted"] is True and song["content"].startswith("la la la")


def test_chat_commands_hide_thinking_and_ctrl_d(model_dir):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "smollm3_mlx.cli", "chat", "-m", str(model_dir), "--temp", "0", "--hide-thinking"],
        env=_env(TERM="dumb"),
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 200),
    )
    child.expect(PROMPT)
    say(child, QUESTIONS["math"], dumb=True)
    child.expect(PROMPT)
    shown = ANSI.sub("", child.before)
    assert re.search(r"thought for \d+ tokens, [\d.]+ s\s*\r?\n2 \+ 2 = 4\.", shown)
    assert "Two plus two" not in shown
    shown = {}
    for line, reply in [
        ("/help", "/no_think"),
        ("/system Be brief.", "system message set"),
        ("/reset", "conversation cleared"),
        ("/stats", "cached tokens"),
        ("/bogus", "unknown command"),
    ]:
        say(child, line, dumb=True)
        child.expect(PROMPT)
        shown[line] = ANSI.sub("", child.before)
        assert reply in shown[line], line
    assert re.search(r"messages\s+1\b", shown["/stats"])  # the system message stays
    assert re.search(r"Ctrl-C\s+while it thinks: answer now", shown["/help"])
    # On a dumb terminal the editor prints its prompt before it switches the terminal to raw
    # mode: a Ctrl-D typed in between (no person is that fast) would be the kernel's.
    time.sleep(0.5)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_prints_the_answer_alone_on_stdout(model_dir):
    r = run("generate", "-m", str(model_dir), "--temp", "0", QUESTIONS["math"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2 + 2 = 4.\n"
    assert "Two plus two makes four." in r.stderr


def test_generate_hide_thinking_and_prompt_from_stdin(model_dir):
    r = run(
        "generate", "-m", str(model_dir), "--temp", "0", "--hide-thinking", stdin="What is 2+2?\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2 + 2 = 4.\n"
    assert re.search(r"thought for \d+ tokens", r.stderr) and "Two plus" not in r.stderr


def test_generate_json_has_thinking_answer_and_stats(model_dir):
    r = run("generate", "-m", str(model_dir), "--temp", "0", "--format", "json", QUESTIONS["math"])
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["thinking"] == "Two plus two makes four." and data["answer"] == "2 + 2 = 4."
    assert data["finish_reason"] == "stop"
    assert data["stats"]["generation_tokens"] > data["stats"]["thinking_tokens"] > 0


def test_generate_no_think_and_raw_completion(model_dir):
    r = run("generate", "-m", str(model_dir), "--temp", "0", "--no-think", QUESTIONS["hi"])
    assert (r.returncode, r.stdout, r.stderr.strip()) == (0, answer("hi") + "\n", r.stderr.strip())
    assert "thinking" not in r.stderr
    prompt = "<|im_start|>user\nSing me a song.<|im_end|>\n<|im_start|>assistant\n"
    r = run("generate", "-m", str(model_dir), "--temp", "0", "--raw", "--max-tokens", "3", prompt)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<think>")  # the template's think-mode scaffolding was not added


@pytest.mark.parametrize("args", [["-m", "/nonexistent/model"], ["--format", "yaml"]])
def test_generate_errors_are_one_line_and_a_nonzero_exit(model_dir, args):
    r = run("generate", *args, "hello")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "error" in r.stderr
    assert r.stdout == ""


def test_without_model_the_default_is_downloaded_and_converted_once(
    model_dir, tmp_path, monkeypatch
):
    # The real path: the hub protocol (a local server as HuggingFaceTB/SmolLM3-3B), the real
    # converter at 4-bit mixed into SMOLLM3_MLX_HOME, then the chat; a second run reuses it.
    from hub_server import HubServer, use_hub

    monkeypatch.setenv("SMOLLM3_MLX_HOME", str(tmp_path / "home"))
    with HubServer({"HuggingFaceTB/SmolLM3-3B": model_dir}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        runner = CliRunner()
        for _ in range(2):
            r = runner.invoke(cli.app, ["generate", "--temp", "0", "--no-think", QUESTIONS["hi"]])
            assert r.exit_code == 0, r.output
        downloads = len(hub.fetched())
    assert downloads > 0
    converted = tmp_path / "home" / cli.DEFAULT_MODEL_NAME
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8


def test_convert_command_writes_a_model_and_refuses_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "q8"
    r = run("convert", str(model_dir), "-o", str(out), "--bits", "8")
    assert r.returncode == 0, r.stderr
    assert "8-bit uniform" in r.stdout and (out / "model.safetensors.index.json").exists()
    r = run("generate", "-m", str(out), "--temp", "0", "--no-think", QUESTIONS["hi"])
    assert r.returncode == 0 and r.stdout == answer("hi") + "\n"
    r = run("convert", str(model_dir), "-o", str(out), "--bits", "8")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "exists" in r.stderr


def test_generate_refuses_a_prompt_longer_than_the_context(model_dir):
    r = run("generate", "-m", str(model_dir), "--max-context", "40", QUESTIONS["hi"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "no room left to answer in the context of 40" in r.stderr


def test_kv_settings_mlx_cannot_quantize_are_one_line(model_dir):
    # The trained model's head_dim is 16; MLX quantizes groups of 32, 64 or 128.
    r = run("generate", "-m", str(model_dir), "--kv-bits", "8", QUESTIONS["hi"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "divide head_dim 16" in r.stderr


def test_help_says_past_reasoning_is_kept_by_default():
    r = CliRunner().invoke(cli.app, ["chat", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--keep-thinking" in text and "--drop-thinking" in text and "the default" in text


def test_a_mistyped_model_name_is_one_line_saying_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["generate", "hello"], ["chat"], ["bench"]):
        r = CliRunner().invoke(cli.app, [command[0], "-m", "SmolLM3-3B-4bt", *command[1:]])
        assert r.exit_code == 1, r.output
        assert r.stderr == (
            "error: SmolLM3-3B-4bt: no local folder of that name, and not a hub repo id "
            "(OWNER/NAME)\n"
        )


def test_a_bad_chat_file_is_one_line_and_the_session_goes_on(tmp_path):
    from checkpoints import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=2)
    good = tmp_path / "good.json"
    r = CliRunner().invoke(cli.app, ["chat", "-m", str(model)], input=f"/save {good}\n/exit\n")
    assert r.exit_code == 0, r.output
    data = json.loads(good.read_text())
    bad = {
        "no-model.json": {k: v for k, v in data.items() if k != "model"},
        "nan.json": {**data, "sampling": {**data["sampling"], "temperature": float("nan")}},
        "top-p.json": {**data, "sampling": {**data["sampling"], "top_p": 7}},
        "cold.json": {**data, "sampling": {**data["sampling"], "temperature": -5}},
    }
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    lines = [f"/load {tmp_path / name}" for name in bad] + [f"/load {good}", "/stats", "/exit"]
    r = CliRunner().invoke(cli.app, ["chat", "-m", str(model)], input="\n".join(lines) + "\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [
        f"error: {tmp_path / 'no-model.json'}: not a smollm3-mlx conversation ('model' is "
        "missing or not a string)",
        f"error: {tmp_path / 'nan.json'}: not a smollm3-mlx conversation (sampling: temperature "
        "must be a finite number >= 0 (0 is greedy), not nan)",
        f"error: {tmp_path / 'top-p.json'}: not a smollm3-mlx conversation (sampling: top_p must "
        "be a number in (0, 1] (1 keeps all tokens), not 7)",
        f"error: {tmp_path / 'cold.json'}: not a smollm3-mlx conversation (sampling: temperature "
        "must be a finite number >= 0 (0 is greedy), not -5)",
    ]
    assert "loaded 0 messages" in r.stdout and "messages" in r.stdout.split("loaded")[-1]


@pytest.mark.parametrize(
    "args, stdin",
    [
        (["chat"], b"Say hi.\xff\n\xe9 again\n"),  # typed or piped bytes that are not UTF-8
        (["generate"], bytes(range(200, 216))),  # a binary prompt on stdin
        (["generate", "--raw", b"x\xff"], b""),  # argv, as the shell passes it
        (["generate", "--system", b"Be \xe9brief.", "hi"], b""),
    ],
    ids=["chat-lines", "generate-stdin", "generate-argv", "generate-system"],
)
def test_text_that_is_not_utf8_is_read_with_replacement_characters_said_once(
    tmp_path_factory, args, stdin
):
    from checkpoints import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("text") / "m"
    make_tiny_checkpoint(folder, num_hidden_layers=1)
    options = ["-m", str(folder), "--max-tokens", "2", "--temp", "0"]
    r = subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", *args[:1], *options, *args[1:]],
        input=stdin,
        capture_output=True,
        env=_env(),
        timeout=300,
    )
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert err.count("warning:") == 1 and "U+FFFD" in err, err  # one line, said once
