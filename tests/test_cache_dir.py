"""The server's `--cache-dir` and prompt-cache files on a bad day: a folder shared with a model's
weights, a full disk, a writer killed mid-file, crafted metadata, any bytes in the folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest
from checkpoints import requires_reference
from hypothesis import HealthCheck, given, settings, strategies as st
from trained_model import QUESTIONS, trained_checkpoint
from typer.testing import CliRunner

from smollm3_mlx import cache_file
from smollm3_mlx.cache import PromptCache
from smollm3_mlx.cache_file import (
    CACHE_FILE_NAME,
    PromptCacheError,
    fingerprint,
    prune_cache_dir,
    save_prompt_cache,
)
from smollm3_mlx.chat import Chat
from smollm3_mlx.cli import app as cli
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load
from smollm3_mlx.sample import Sampling
from smollm3_mlx.serve.cache_dir import MARKER, CacheDir

pytestmark = requires_reference
REPO = Path(__file__).resolve().parents[1]
FULL_DISK = "[write] Unable to write 2579 bytes to file."  # what MLX's writer raises
DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = trained_checkpoint(tmp_path_factory)
    model, tokenizer = load(path, dtype="float32")
    return path, model, tokenizer


def cached(model, tokenizer, word: str) -> PromptCache:
    """A prompt cache of about 300 ids, as the server's engine leaves one."""
    cache = PromptCache.new(model)
    prompt = tokenizer.encode(f"{word} " * 300)
    for _ in stream_generate(
        model, tokenizer, prompt, max_tokens=1, prompt_cache=cache, sampling=Sampling(temperature=0)
    ):
        pass
    return cache


def full_disk(*args, **kwargs):
    raise RuntimeError(FULL_DISK)


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Change a safetensors file's metadata in place (the data offsets are the header's own)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_cache_dir_in_a_model_folder_never_touches_the_models_files(trained, tmp_path):
    path, model, tokenizer = trained
    folder = tmp_path / "model"
    shutil.copytree(path, folder)
    (folder / ("0" * 32 + ".safetensors")).write_bytes(b"named like ours, but not our folder")
    before = snapshot(folder)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    disk = CacheDir(folder, model, tokenizer, max_bytes=1)  # a budget every file is over
    disk.put(cached(model, tokenizer, "alpha"))
    assert not (folder / MARKER).exists() and disk.index == {}  # too big for the budget: gone
    assert snapshot(folder) == before
    roomy = CacheDir(folder, model, tokenizer, max_bytes=weights)  # the weights count for nothing
    roomy.put(cached(model, tokenizer, "alpha"))
    (ours,) = set(snapshot(folder)) - set(before)
    assert roomy.take(tokenizer.encode("alpha " * 300)) is not None
    assert {k: v for k, v in snapshot(folder).items() if k != ours} == before


def test_in_its_own_folder_a_corrupt_file_of_ours_is_deleted_and_nothing_else(trained, tmp_path):
    _, model, tokenizer = trained
    folder = tmp_path / "caches"
    disk = CacheDir(folder, model, tokenizer)
    assert (folder / MARKER).is_file()
    disk.put(cached(model, tokenizer, "alpha"))
    disk.put(cached(model, tokenizer, "beta"))
    alpha, beta = sorted(disk.index)
    alpha_ids, beta_ids = disk.index[alpha], disk.index[beta]
    data = bytearray(alpha.read_bytes())
    data[-8:] = bytes(8)  # its keys and values, not its header: only the checksums can tell
    alpha.write_bytes(bytes(data))
    beta.write_bytes(beta.read_bytes()[:100])  # truncated
    truncated_twin = folder / ("f" * 32 + ".safetensors")
    truncated_twin.write_bytes(b"\x10" + bytes(7) + b"{not json")
    others = {"notes.safetensors": b"not ours", "weights.bin": b"\x00" * 64}
    for name, content in others.items():
        (folder / name).write_bytes(content)
    again = CacheDir(folder, model, tokenizer)
    assert not beta.exists() and not truncated_twin.exists()  # unreadable, named as ours
    assert list(again.index) == [alpha]  # the checksums are read when it is used
    assert again.take(alpha_ids) is None and not alpha.exists()
    assert again.take(beta_ids) is None
    assert snapshot(folder) == {MARKER: (folder / MARKER).read_bytes(), **others}


def test_pruning_counts_and_deletes_only_prompt_cache_files(trained, tmp_path):
    _, model, tokenizer = trained
    CacheDir(tmp_path, model, tokenizer).put(cached(model, tokenizer, "alpha"))
    (mine,) = tmp_path.glob("*.safetensors")
    os.utime(mine, (1000, 1000))  # the oldest file of the folder
    lookalikes = {"model.safetensors": b"w" * 5000, "0" * 32 + ".safetensors": b"x" * 5000}
    for age, (name, content) in enumerate(lookalikes.items()):
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, (10 + age, 10 + age))  # older still: they would go first
    assert prune_cache_dir(tmp_path, mine.stat().st_size) == []
    assert prune_cache_dir(tmp_path, mine.stat().st_size - 1) == [mine]
    assert snapshot(tmp_path) == {MARKER: (tmp_path / MARKER).read_bytes(), **lookalikes}


def test_a_full_disk_costs_the_cache_file_and_nothing_else(trained, tmp_path, monkeypatch):
    _, model, tokenizer = trained
    disk = CacheDir(tmp_path, model, tokenizer)
    cache = cached(model, tokenizer, "alpha")
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    disk.put(cache)  # no exception: the request that made it still answers
    assert disk.index == {} and sorted(p.name for p in tmp_path.iterdir()) == [MARKER]
    fp = fingerprint(model, tokenizer, kv=cache.kv, window=cache.window, keep=cache.keep)
    with pytest.raises(OSError) as e:
        save_prompt_cache(tmp_path / "x.cache", cache, fp)
    assert e.value.strerror == f"cannot write it ({FULL_DISK}; is the disk full?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]


def test_a_full_disk_under_save_cache_is_one_line_and_the_chat_goes_on(
    trained, tmp_path, monkeypatch
):
    path, _, _ = trained
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    out = tmp_path / "chat.cache"
    lines = [QUESTIONS["math"], f"/save_cache {out}", QUESTIONS["hi"], "/exit"]
    r = CliRunner().invoke(
        cli.app, ["chat", "-m", str(path), "--dtype", "float32"], input="\n".join(lines) + "\n"
    )
    assert r.exit_code == 0, r.output
    assert r.stderr == f"error: {out}: cannot write it ({FULL_DISK}; is the disk full?)\n"
    assert "Traceback" not in r.output and not list(tmp_path.iterdir())
    assert r.stdout.count("tok/s") == 2  # the next message was answered too


def test_save_cache_before_anything_to_save_is_one_line_and_the_chat_goes_on(trained, tmp_path):
    path, _, _ = trained
    out = tmp_path / "chat.cache"
    lines = [f"/save_cache {out}", QUESTIONS["hi"], "/exit"]
    r = CliRunner().invoke(
        cli.app, ["chat", "-m", str(path), "--dtype", "float32"], input="\n".join(lines) + "\n"
    )
    assert r.exit_code == 0, r.output
    assert r.stderr == "error: nothing to prefill yet: no system message and no messages\n"
    assert r.stdout.count("tok/s") == 1 and not out.exists()


def test_a_full_disk_under_cache_prompt_is_one_line_and_exit_1(trained, tmp_path, monkeypatch):
    path, _, _ = trained
    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    (tmp_path / "system.txt").write_text("You are a helpful assistant.")
    out = tmp_path / "sys.cache"
    r = CliRunner().invoke(
        cli.app,
        [
            "cache-prompt",
            "-m",
            str(path),
            "--system",
            str(tmp_path / "system.txt"),
            "-o",
            str(out),
            "--dtype",
            "float32",
        ],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr == f"error: {out}: cannot write it ({FULL_DISK}; is the disk full?)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system.txt"]


KILLED_WRITER = """
import sys, time
from pathlib import Path
from smollm3_mlx.files import atomic_path
with atomic_path(Path(sys.argv[1]), suffix=".tmp.safetensors") as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_mid_file_leaves_a_temporary_the_next_start_removes(trained, tmp_path):
    _, model, tokenizer = trained
    folder = tmp_path / "caches"
    CacheDir(folder, model, tokenizer)
    target = folder / ("a" * 32 + ".safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    left = folder / writer.stdout.readline().strip()
    assert left.is_file() and left.name.startswith(f".{target.name}.")
    alive = folder / left.name.replace(f"-{writer.pid}-", f"-{os.getpid()}-")  # a live writer's
    shutil.copy(left, alive)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    assert left.is_file()  # what SIGKILL leaves: nobody could clean it up
    foreign = folder / ".notes.txt.12345-abcdefgh.tmp"  # not one of our names: not ours to judge
    foreign.write_bytes(b"x")
    disk = CacheDir(folder, model, tokenizer, max_bytes=1)
    assert not left.exists() and alive.exists() and foreign.exists()
    disk.put(cached(model, tokenizer, "alpha"))  # the live temporary is not counted nor pruned
    assert alive.exists() and disk.index == {}


def test_deeply_nested_metadata_is_one_line_from_chat_and_skipped_by_a_cache_dir(trained, tmp_path):
    path, model, tokenizer = trained
    good = Chat(model, system="Be brief.", temperature=0.0, max_tokens=4)
    for field in ("chat", "kv"):
        file = good.save_prompt_cache(tmp_path / f"{field}.cache")
        rewrite_metadata(file, **{field: DEEP})
        with pytest.raises(PromptCacheError) as e:
            Chat(model, prompt_cache=file)
        assert "\n" not in str(e.value) and str(file) in str(e.value)
        r = CliRunner().invoke(
            cli.app,
            ["chat", "-m", str(path), "--dtype", "float32", "--prompt-cache", str(file)],
            input="/exit\n",
        )
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert len(r.stderr.splitlines()) == 1 and str(file) in r.stderr
    folder = tmp_path / "caches"
    disk = CacheDir(folder, model, tokenizer)
    disk.put(cached(model, tokenizer, "alpha"))
    disk.put(cached(model, tokenizer, "beta"))
    deep_kv, deep_ids = sorted(disk.index)
    rewrite_metadata(deep_kv, kv=DEEP)
    rewrite_metadata(deep_ids, ids=DEEP)
    assert CacheDir(folder, model, tokenizer).index == {}  # no RecursionError: a server starts


def test_special_and_oversized_files_are_refused_before_reading(trained, tmp_path):
    """A FIFO would block and /dev/zero never end; a header too big for a prompt cache is not
    parsed. From `chat --prompt-cache`: one line; in a cache folder: skipped."""
    _, model, tokenizer = trained
    fifo = tmp_path / ("1" * 32 + ".safetensors")
    os.mkfifo(fifo)
    huge = tmp_path / ("2" * 32 + ".safetensors")
    meta = {"format": cache_file.FORMAT, "version": cache_file.VERSION}
    head = json.dumps({"__metadata__": {**meta, "pad": "x" * cache_file.MAX_METADATA}}).encode()
    huge.write_bytes(len(head).to_bytes(8, "little") + head)
    refused = {fifo: "not a regular file", huge: "more than a prompt cache's"}
    for path, why in [*refused.items(), ("/dev/zero", "not a regular file")]:
        with pytest.raises(PromptCacheError, match=why):
            Chat(model, prompt_cache=path)
    disk = CacheDir(tmp_path, model, tokenizer)
    assert disk.index == {} and fifo.exists() and huge.exists()  # not our folder: left alone


FOLDER_FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
names = st.sampled_from(["0" * 32, "ab" * 16, "model", ".hidden", "x" * 31]).map(
    lambda stem: stem + ".safetensors"
) | st.text(st.characters(codec="ascii", exclude_characters="/\\\x00"), min_size=1, max_size=20)
metadata_values = st.sampled_from(["", "null", "[]", "{}", "[1, 2]", DEEP, '{"window": 1}']) | (
    st.text(max_size=20)
)


@pytest.fixture(scope="module")
def template(trained, tmp_path_factory):
    """A sound cache file of the trained model, for the fuzzers to damage."""
    _, model, tokenizer = trained
    folder = tmp_path_factory.mktemp("template")
    disk = CacheDir(folder, model, tokenizer)
    disk.put(cached(model, tokenizer, "alpha"))
    (path,) = disk.index
    return path


@FOLDER_FUZZ
@given(files=st.dictionaries(names, st.binary(max_size=200), max_size=4), ours=st.booleans())
def test_any_bytes_in_the_folder_are_skipped_never_a_crash_at_start(trained, tmp_path, files, ours):
    """In a folder of ours a file named as ours that is not a sound cache is deleted; whatever
    else is there, and everything in a folder that is not ours, stays as it was."""
    _, model, tokenizer = trained
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    if ours:
        CacheDir(folder, model, tokenizer)
    for name, content in files.items():
        if name not in (".", "..", MARKER):
            (folder / name).write_bytes(content)
    before = snapshot(folder)
    disk = CacheDir(folder, model, tokenizer)
    assert disk.index == {}
    kept = {k: v for k, v in before.items() if not (ours and CACHE_FILE_NAME.fullmatch(k))}
    assert snapshot(folder) == (kept if before else {MARKER: (folder / MARKER).read_bytes()})


@FOLDER_FUZZ
@given(data=st.data())
def test_a_cache_file_with_any_metadata_changed_is_skipped_or_used_never_a_crash(
    trained, template, tmp_path, data
):
    _, model, tokenizer = trained
    folder = Path(tmp_path) / "fuzz-meta"
    shutil.rmtree(folder, ignore_errors=True)
    disk = CacheDir(folder, model, tokenizer)
    file = folder / template.name
    shutil.copy(template, file)
    keys = ["format", "version", "model", "kv", "ids", "cache", "crc32", "dtype", "chat"]
    changes = data.draw(st.dictionaries(st.sampled_from(keys), metadata_values, max_size=3))
    rewrite_metadata(file, **changes)
    disk = CacheDir(folder, model, tokenizer)
    for ids in list(disk.index.values()):
        cache = disk.take(ids)
        assert cache is None or cache.ids == ids
