"""Prompt-cache files: a restored chat answers as the one that saved it; mismatches and corrupt
files are refused; an allocation failure in a turn is an Error event, not a dead process."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import mlx.core as mx
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference
from trained_model import QUESTIONS, trained_checkpoint
from typer.testing import CliRunner

from smollm3_mlx import cache_file
from smollm3_mlx.cache import KVSettings
from smollm3_mlx.cache_file import PromptCacheError, PromptCacheMismatch
from smollm3_mlx.chat import Chat
from smollm3_mlx.cli import app as cli
from smollm3_mlx.events import Done, Error
from smollm3_mlx.loading import load
from smollm3_mlx.model import Model
from smollm3_mlx.tokenizer import Tokenizer

pytestmark = requires_reference
SYSTEM = "You are a helpful assistant. " * 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = trained_checkpoint(tmp_path_factory)
    model, tokenizer = load(path, dtype="float32")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """A chat after one turn, saved; the file and the chat that saved it."""
    _, model, _ = trained
    chat = Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40)
    chat.reply(QUESTIONS["math"])
    path = chat.save_prompt_cache(tmp_path_factory.mktemp("pc") / "chat.cache")
    return path, chat


def _turn(chat: Chat, text: str) -> tuple[str, Done]:
    *_, done = chat.send(text)
    assert isinstance(done, Done)
    return chat.messages[-1]["content"], done


def test_a_restored_chat_answers_token_for_token_like_the_chat_that_saved_it(trained, tmp_path):
    _, model, tokenizer = trained
    first = Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40)
    first.reply(QUESTIONS["math"])
    path = first.save_prompt_cache(tmp_path / "chat.cache")
    restored = Chat(model, prompt_cache=path, temperature=0.0, max_tokens=40)
    assert restored.messages == first.messages and restored.think == first.think
    assert restored.prompt_cache.ids == first.prompt_cache.ids
    ours, done = _turn(restored, QUESTIONS["hi"])
    theirs, _ = _turn(first, QUESTIONS["hi"])
    assert tokenizer.encode(ours, allow_special=True) == tokenizer.encode(
        theirs, allow_special=True
    )
    assert done.stats.cached_tokens > len(tokenizer.encode(SYSTEM))  # not prefilled again


def test_a_chat_prefilled_before_its_first_turn_answers_like_one_that_was_not(trained):
    _, model, tokenizer = trained
    primed = Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40)
    held = primed.prefill()
    assert held == len(primed.render(add_generation_prompt=False))
    ours, done = _turn(primed, QUESTIONS["math"])
    theirs, _ = _turn(Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40), QUESTIONS["math"])
    assert tokenizer.encode(ours, allow_special=True) == tokenizer.encode(
        theirs, allow_special=True
    )
    assert done.stats.cached_tokens == held  # the system block was not prefilled again


def test_the_file_is_the_cache_bytes_and_ids_as_a_tensor(saved):
    path, chat = saved
    arrays = mx.load(str(path), format="safetensors")
    assert arrays["ids"].tolist() == chat.prompt_cache.ids
    data = sum(a.nbytes for name, a in arrays.items() if name != "ids")
    assert data == chat.prompt_cache.nbytes
    assert path.stat().st_size - data - arrays["ids"].nbytes < 8192  # the header


@pytest.fixture(scope="module")
def quantizable(tmp_path_factory):
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("q"), with_tokenizer=True, head_dim=64,
        max_position_embeddings=512,
    )  # fmt: skip
    return load(path, dtype="float32")[0]


@pytest.mark.parametrize("kv_bits", [None, 4], ids=["dense", "kv4"])
def test_a_cache_saved_after_rotation_restores_to_the_same_state(quantizable, tmp_path, kv_bits):
    chat = Chat(quantizable, system="Be brief.", max_context=96, kv_bits=kv_bits, kv_group_size=32,
                temperature=0.0, max_tokens=12)  # fmt: skip
    for _ in range(8):
        chat.reply("Tell me more about the sea and the sky.")
        if chat.prompt_cache.dropped:
            break
    path = chat.save_prompt_cache(tmp_path / "rot.cache")
    back = Chat(quantizable, prompt_cache=path, max_context=96, kv_bits=kv_bits, kv_group_size=32,
                temperature=0.0, max_tokens=12)  # fmt: skip
    (a, a_meta), (b, b_meta) = chat.prompt_cache.export(), back.prompt_cache.export()
    assert a_meta == b_meta and a_meta["layers"][0]["dropped"] > 0
    assert bool(a_meta["layers"][0]["quantized"]) == (kv_bits is not None)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a) and a.keys() == b.keys()
    assert back.reply("And the wind?") == chat.reply("And the wind?")


def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit:
        name, change = edit
        data = json.loads((dst / name).read_text())
        change(data)
        (dst / name).write_text(json.dumps(data))
    return dst


def test_every_mismatch_kind_is_caught_and_recompute_is_silent(trained, saved, tmp_path):
    path, model, tokenizer = trained
    file, _ = saved
    other = _copy(path, tmp_path / "other", ("config.json", lambda c: c.update(rms_norm_eps=1e-5)))
    (tmp_path / "tpl").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(path / name, tmp_path / "tpl" / name)
    edit = ("tokenizer_config.json", lambda c: c.update(model_max_length=7))
    tok_dir = _copy(tmp_path / "tpl", tmp_path / "tok", edit)
    template = (path / "chat_template.jinja").read_text()
    (tmp_path / "tpl" / "chat_template.jinja").write_text(template.replace("Today", "today"))
    shutil.copy(path / "chat_template.jinja", tok_dir / "chat_template.jinja")
    cases = {
        "model": dict(model=load(other, dtype="float32")[0]),
        "model-rope": dict(model=load(path, dtype="float32", max_context=4096)[0]),
        "tokenizer": dict(tokenizer=Tokenizer.from_folder(tok_dir)),
        "template": dict(tokenizer=Tokenizer.from_folder(tmp_path / "tpl")),
        "dtype": dict(model=load(path, dtype="bfloat16")[0]),
        "kv": dict(max_context=1024),
    }
    for case, options in cases.items():
        options = {"model": model, **options}
        with pytest.raises(PromptCacheMismatch) as e:
            Chat(prompt_cache=file, **options)
        assert e.value.kind == case.split("-")[0] and "\n" not in str(e.value), case
    assert "window 2048 (this session: 1024)" in str(e.value)
    chat = Chat(model, prompt_cache=file, prompt_cache_mismatch="recompute", max_context=1024,
                temperature=0.0, max_tokens=40)  # fmt: skip
    fresh = Chat(model, max_context=1024, temperature=0.0, max_tokens=40)
    fresh.messages = list(chat.messages)
    answer, done = _turn(chat, QUESTIONS["hi"])
    assert done.stats.cached_tokens == 0 and answer == _turn(fresh, QUESTIONS["hi"])[0]


def test_truncated_corrupt_and_foreign_files_are_refused_in_one_line(trained, saved, tmp_path):
    path, model, _ = trained
    file, _ = saved
    data = file.read_bytes()
    head = 8 + int.from_bytes(data[:8], "little")
    flipped = bytearray(data)
    flipped[head + 100] ^= 0xFF
    header = json.loads(data[8:head])
    header["__metadata__"]["cache"] = "{not json"
    text = json.dumps(header).encode()
    entry = json.loads(data[8:head])
    entry[next(k for k in entry if k != "__metadata__")]["data_offsets"] = "x"
    bad_entry = json.dumps(entry).encode()
    files = {
        "truncated": data[:-100],
        "flipped": bytes(flipped),
        "empty": b"",
        "garbage": b"\x00" * 64,
        "bad-metadata": len(text).to_bytes(8, "little") + text + data[head:],
        "bad-entry": len(bad_entry).to_bytes(8, "little") + bad_entry + data[head:],
        "foreign": (path / "model.safetensors").read_bytes(),
    }
    expect = cache_file.file_fingerprint(cache_file.read_metadata(file))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PromptCacheError) as e:
            cache_file.load_prompt_cache(tmp_path / name, model, expect=expect)
        assert not isinstance(e.value, PromptCacheMismatch), name
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value), name
    with pytest.raises(PromptCacheError, match="cannot read"):
        Chat(model, prompt_cache=tmp_path / "missing")


def test_a_failed_save_leaves_the_old_file_and_no_temporary(saved, tmp_path, monkeypatch):
    _, chat = saved
    target = tmp_path / "keep.cache"
    target.write_bytes(b"old")

    def fail(path, arrays, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", fail)
    with pytest.raises(OSError):
        chat.save_prompt_cache(target)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("[metal::malloc] Attempting to allocate 9000000000 bytes which is greater than "
                  "the maximum allowed buffer size of 8000000000 bytes."), MemoryError()],
    ids=["metal-malloc", "MemoryError"],
)  # fmt: skip
def test_an_allocation_failure_is_an_error_event_and_the_chat_goes_on(
    trained, tmp_path, monkeypatch, failure
):
    _, model, _ = trained
    chat = Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40)
    chat.reply(QUESTIONS["math"])
    before = [dict(m) for m in chat.messages]
    real = Model.__call__

    def allocate(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(Model, "__call__", allocate)
    *_, last = chat.send(QUESTIONS["hi"])
    assert isinstance(last, Error) and last.kind == "memory" and "\n" not in last.message
    assert chat.messages == before
    chat.save(tmp_path / "chat.json")
    monkeypatch.setattr(Model, "__call__", real)
    chat.save_prompt_cache(tmp_path / "after.cache")
    fresh = Chat(model, system=SYSTEM, temperature=0.0, max_tokens=40)
    fresh.reply(QUESTIONS["math"])
    assert chat.reply(QUESTIONS["hi"]) == fresh.reply(QUESTIONS["hi"])


def test_other_errors_in_a_turn_still_raise(trained, monkeypatch):
    _, model, _ = trained
    chat = Chat(model, temperature=0.0, max_tokens=4)

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Model, "__call__", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        chat.reply("hello")
    assert chat.messages == []


def test_cache_prompt_command_writes_a_file_chat_takes_up(trained, tmp_path):
    path, model, _ = trained
    (tmp_path / "system.txt").write_text(SYSTEM)
    (tmp_path / "doc.txt").write_text("The sea is blue. " * 20)
    out = tmp_path / "sys.cache"
    result = CliRunner().invoke(
        cli.app,
        ["cache-prompt", "-m", str(path), "--system", str(tmp_path / "system.txt"),
         "--document", str(tmp_path / "doc.txt"), "-o", str(out), "--dtype", "float32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    chat = Chat(model, prompt_cache=out, temperature=0.0, max_tokens=40)
    assert chat.system.startswith(SYSTEM.strip()) and chat.system.endswith("The sea is blue.")
    held = chat.prompt_cache.offset
    assert held == len(chat.render(add_generation_prompt=False))
    _, done = _turn(chat, QUESTIONS["math"])
    assert done.stats.cached_tokens == held
    bad = CliRunner().invoke(
        cli.app, ["chat", "-m", str(path), "--prompt-cache", str(tmp_path / "system.txt")]
    )
    assert bad.exit_code == 1 and "not a safetensors file" in bad.output


def test_cache_dir_names_follow_ids_and_settings_and_pruning_keeps_the_newest(saved, tmp_path):
    fp = cache_file.Fingerprint("model", "tokenizer", "template", "float32", keep=0)
    name = cache_file.cache_file_name(fp, [1, 2, 3])
    assert name == cache_file.cache_file_name(fp, [1, 2, 3])
    assert cache_file.CACHE_FILE_NAME.fullmatch(name)
    assert name != cache_file.cache_file_name(fp, [1, 2, 4])
    assert name != cache_file.cache_file_name(replace(fp, kv=KVSettings(bits=4)), [1, 2, 3])
    files = []
    for age in range(3):
        f = tmp_path / cache_file.cache_file_name(fp, [age])
        shutil.copy(saved[0], f)
        os.utime(f, (1000 + age, 1000 + age))
        files.append(f)
    (tmp_path / "other.txt").write_bytes(b"x" * 500)  # not a cache file: never touched
    size = files[0].stat().st_size
    deleted = cache_file.prune_cache_dir(tmp_path, 2 * size + size // 2)
    assert deleted == files[:1]
    assert sorted(tmp_path.iterdir()) == sorted([*files[1:], tmp_path / "other.txt"])


def test_generate_reports_an_allocation_failure_in_one_line_and_exits_1(trained, monkeypatch):
    path, _, _ = trained

    def allocate(self, *args, **kwargs):
        raise RuntimeError("[metal::malloc] Attempting to allocate 9000000000 bytes")

    monkeypatch.setattr(Model, "__call__", allocate)
    for fmt in ("text", "json"):
        result = CliRunner().invoke(
            cli.app, ["generate", "-m", str(path), "--format", fmt, QUESTIONS["math"]]
        )
        assert result.exit_code == 1 and "out of memory during the turn" in result.output, fmt
