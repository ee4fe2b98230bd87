"""Files a user can hand us, whatever their bytes: the loader raises its own one-line error
type and nothing else (property-based, with Hypothesis)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from checkpoints import make_tiny_checkpoint
from hypothesis import HealthCheck, given, settings, strategies as st

from smollm3_mlx.checkpoint import ModelLoadError, read_safetensors_header
from smollm3_mlx.loading import load_model

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("untrusted") / "tiny", num_hidden_layers=2)


def a_copy(ckpt: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="untrusted-"))
    shutil.copytree(ckpt, folder / "m")
    return folder / "m"


def loads_or_one_line(folder: Path, call=load_model) -> None:
    try:
        call(folder)
    except ModelLoadError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_as_config_json(ckpt, data):
    folder = a_copy(ckpt)
    (folder / "config.json").write_bytes(data)
    loads_or_one_line(folder)


@FUZZ
@given(value=json_values)
def test_any_json_document_as_config_json(ckpt, value):
    folder = a_copy(ckpt)
    (folder / "config.json").write_text(json.dumps(value))
    loads_or_one_line(folder)


@FUZZ
@given(data=st.data())
def test_a_config_with_any_field_changed_or_dropped(ckpt, data):
    config = json.loads((ckpt / "config.json").read_text())
    keys = st.sampled_from(sorted(config)) | st.text(max_size=8)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(keys)
        if data.draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = data.draw(json_values | st.integers(-3, 70))
    folder = a_copy(ckpt)
    (folder / "config.json").write_text(json.dumps(config))
    loads_or_one_line(folder)


def _tensors(folder: Path) -> tuple[int, bytes, dict]:
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, raw[8 + n :], json.loads(raw[8 : 8 + n])


def _write(folder: Path, header: bytes, data: bytes) -> None:
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)


@FUZZ
@given(header=st.binary(max_size=200), length=st.none() | st.integers(0, 2**64 - 1))
def test_any_bytes_as_a_safetensors_header(ckpt, header, length):
    folder = a_copy(ckpt)
    _, data, _ = _tensors(folder)
    raw = (length if length is not None else len(header)).to_bytes(8, "little") + header
    (folder / "model.safetensors").write_bytes(raw + data)
    loads_or_one_line(folder)


@FUZZ
@given(data=st.data())
def test_a_safetensors_header_with_any_entry_changed(ckpt, data):
    folder = a_copy(ckpt)
    _, tensors, header = _tensors(folder)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(header)))
        entry = header[name]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = data.draw(
            json_values
            | st.lists(st.integers(-2, 2**40), max_size=3)
            | st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3"])
        )
        if field is None:
            header[name] = value
        elif isinstance(entry, dict):
            entry[field] = value
    _write(folder, json.dumps(header).encode(), tensors)
    loads_or_one_line(folder, lambda f: read_safetensors_header(f / "model.safetensors"))
    folder = a_copy(ckpt)
    _write(folder, json.dumps(header).encode(), tensors)
    loads_or_one_line(folder)


@FUZZ
@given(name=st.sampled_from(["tokenizer_config.json", "tokenizer.json"]), data=st.data())
def test_any_tokenizer_files(ckpt, name, data):
    from smollm3_mlx import load

    folder = a_copy(ckpt)
    original = json.loads((folder / name).read_text())
    content = data.draw(
        st.binary(max_size=200).map(lambda b: ("bytes", b))
        | json_values.map(lambda v: ("json", v))
        | st.tuples(st.sampled_from(sorted(original)), json_values).map(lambda kv: ("field", kv))
    )
    kind, value = content
    if kind == "bytes":
        (folder / name).write_bytes(value)
    elif kind == "json":
        (folder / name).write_text(json.dumps(value))
    else:
        (folder / name).write_text(json.dumps({**original, value[0]: value[1]}))
    loads_or_one_line(folder, load)


@FUZZ
@given(data=st.data())
def test_any_generation_config(ckpt, data):
    from smollm3_mlx import load

    folder = a_copy(ckpt)
    config = json.loads((folder / "generation_config.json").read_text())
    config["do_sample"] = data.draw(st.booleans())
    keys = st.sampled_from(["temperature", "top_p", "top_k", "min_p", "repetition_penalty"])
    for _ in range(data.draw(st.integers(1, 3))):
        config[data.draw(keys)] = data.draw(json_values)
    content = data.draw(st.sampled_from(["fields", "bytes"]))
    if content == "bytes":
        (folder / "generation_config.json").write_bytes(data.draw(st.binary(max_size=100)))
    else:
        (folder / "generation_config.json").write_text(json.dumps(config))
    loads_or_one_line(folder, load)


@pytest.fixture(scope="module")
def loaded(ckpt):
    from smollm3_mlx import load

    return load(ckpt)


def restores_or_one_line(loaded, content: bytes) -> None:
    """A chat file is refused in one ChatFileError line, the chat untouched; or it loads, the
    conversation goes on (a one-token turn runs, with the file's tools and tool choice), and
    what `save` then writes loads again."""
    from smollm3_mlx.chat import Chat
    from smollm3_mlx.chat_file import ChatFileError
    from smollm3_mlx.events import Done

    folder = Path(tempfile.mkdtemp(prefix="untrusted-chat-"))
    try:
        (folder / "chat.json").write_bytes(content)
        chat = Chat(*loaded, system="Be brief.")
        before = (list(chat.messages), chat.think, chat.sampling, chat.tools)
        try:
            chat.restore(folder / "chat.json")
        except ChatFileError as e:
            assert "\n" not in str(e) and str(e)
            assert (chat.messages, chat.think, chat.sampling, chat.tools) == before
            return
        chat.sampling = chat.sampling.updated(max_tokens=1)
        *_, done = chat.send("go on")  # the conversation can go on
        assert isinstance(done, Done), done
        chat.save(folder / "again.json")
        Chat(*loaded).restore(folder / "again.json")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@FUZZ
@given(content=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_chat_file(loaded, content):
    restores_or_one_line(loaded, content)


SAVED = {
    "format": "smollm3-mlx-chat",
    "version": 2,
    "model": "tiny",
    "think": True,
    "keep_thinking": True,
    "sampling": {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 4096,
        "seed": None,
    },  # fmt: skip
    "tools": [{"name": "get_weather", "parameters": {"type": "object"}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "interrupted": True},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "reasoning_content": "\nA call.\n",
            "content": "\n",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"role": "tool", "content": "sunny"},
        {
            "role": "assistant",
            "reasoning_content": "\nIt is",
            "reasoning_open": True,
            "content": "",
        },
    ],
    "tool_choice": "auto",
    "think_budget": None,
    "handoff": "",
}


@FUZZ
@given(data=st.data())
def test_a_chat_file_with_any_field_changed_or_dropped(loaded, data):
    saved = json.loads(json.dumps(SAVED))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "sampling", "message", "tool", "call"]))
        messages, tools = saved.get("messages"), saved.get("tools")
        target = {
            "top": saved,
            "sampling": saved.get("sampling"),
            "message": data.draw(st.sampled_from(messages))
            if isinstance(messages, list) and messages
            else None,
            "tool": tools[0] if isinstance(tools, list) and tools else None,
            "call": _first_call(messages),
        }[where]
        if not isinstance(target, dict):
            continue
        key = data.draw(st.sampled_from(sorted(target) or ["x"]) | st.text(max_size=6))
        if data.draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = data.draw(json_values)
    restores_or_one_line(loaded, json.dumps(saved).encode())


def _first_call(messages) -> dict | None:
    for m in messages if isinstance(messages, list) else ():
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list) and calls and isinstance(calls[0], dict):
            return calls[0]
    return None


def test_the_saved_example_loads(loaded):
    chat = restores(loaded, json.dumps(SAVED).encode())
    assert chat.messages[:3] == SAVED["messages"][:3]


def restores(loaded, content: bytes):
    """The Chat a file restores into, or its one-line ChatFileError."""
    from smollm3_mlx.chat import Chat

    folder = Path(tempfile.mkdtemp(prefix="untrusted-chat-"))
    try:
        (folder / "chat.json").write_bytes(content)
        chat = Chat(*loaded)
        chat.restore(folder / "chat.json")
        return chat
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"tool_choice": "nope"}, "tools: tool_choice names 'nope', which is not an offered tool"),
        ({"tools": [{"name": "f", "parameters": "junk"}]}, "tools: a tool needs a name and a"),
        ({"tools": [{"name": "f", "parameters": {"type": "nonsense"}}]}, "tools: cannot constrain"),
        ({"tools": None, "tool_choice": "required"}, "tools: tool_choice 'required' needs tools"),
    ],
)
def test_a_chat_file_whose_tools_a_turn_could_not_use_is_refused_at_load(loaded, change, problem):
    from smollm3_mlx.chat_file import ChatFileError

    with pytest.raises(ChatFileError, match="not a smollm3-mlx conversation") as info:
        restores(loaded, json.dumps({**SAVED, **change}).encode())
    assert f"({problem}" in str(info.value) and "\n" not in str(info.value)


def test_a_chat_file_that_is_a_fifo_or_a_device_is_refused_without_reading(loaded, tmp_path):
    """Opening does not wait for a writer, and nothing is read from a device: both in one line,
    at once (the thread would still be waiting otherwise)."""
    import threading

    from smollm3_mlx.chat import Chat
    from smollm3_mlx.chat_file import ChatFileError

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    errors: list[str] = []

    def restore(path: Path) -> None:
        try:
            Chat(*loaded).restore(path)
        except ChatFileError as e:
            errors.append(str(e))

    for path in (fifo, Path("/dev/zero")):
        worker = threading.Thread(target=restore, args=(path,), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), f"{path}: still reading"
    assert errors == [
        f"{fifo}: cannot read a conversation (not a regular file)",
        "/dev/zero: cannot read a conversation (not a regular file)",
    ]


def test_a_chat_file_too_large_or_too_deep_is_one_line(loaded, monkeypatch):
    from smollm3_mlx import chat_file

    deep = {**SAVED, "tools": [{"name": "f", "parameters": json.loads("[" * 65 + "]" * 65)}]}
    with pytest.raises(chat_file.ChatFileError, match="nested more than 64 levels deep"):
        restores(loaded, json.dumps(deep).encode())
    with pytest.raises(chat_file.ChatFileError, match="nested more than 64 levels deep"):
        restores(loaded, b"[" * 200_000 + b"]" * 200_000)  # past Python's recursion limit
    monkeypatch.setattr(chat_file, "MAX_FILE_BYTES", 2**20)
    big = {**SAVED, "messages": [{"role": "user", "content": "x" * 2**20}]}
    with pytest.raises(
        chat_file.ChatFileError, match=r"cannot read a conversation \(larger than 1 MiB\)"
    ):
        restores(loaded, json.dumps(big).encode())


def test_lone_surrogates_in_a_chat_file_are_read_as_replacement_characters(loaded, tmp_path):
    saved = {**SAVED, "messages": [{"role": "user", "content": "a\ud800b"}]}
    chat = restores(loaded, json.dumps(saved).encode())  # json.dumps escapes it: "\\ud800"
    assert chat.messages == [{"role": "user", "content": "a\ufffdb"}]
    chat.save(tmp_path / "again.json")  # it can be written as UTF-8 again
