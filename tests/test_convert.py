"""The converter: outputs that we and mlx-lm both run, from a folder or the hub, and failures
that leave nothing behind."""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REPO_ROOT, make_tiny_checkpoint, requires_reference
from hub_server import HubServer, use_hub
from huggingface_hub import file_download
from typer.testing import CliRunner

from smollm3_mlx import files
from smollm3_mlx.checkpoint import read_safetensors_header
from smollm3_mlx.cli import app as cli
from smollm3_mlx.convert import ConvertError, ConvertResult, convert
from smollm3_mlx.loading import load_model

# The module, whatever the package's lazy `convert` attribute resolves to (the function).
convert_module = importlib.import_module("smollm3_mlx.convert")
REPO = "HuggingFaceTB/SmolLM3-3B"
IDS = np.random.default_rng(0).integers(0, 512, 32).tolist()
SHARD_SIZE = 40_000  # bytes: splits the tiny models into several shards
VARIANTS = {
    "q8": dict(bits=8),
    "q4-uniform": dict(bits=4, recipe="uniform"),
    "q4-mixed": dict(bits=4),  # mixed is the 4-bit default
}
COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
COPIED += ["chat_template.jinja", "generation_config.json"]


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def mlx_lm_model(path):
    import mlx_lm.utils

    model, _ = mlx_lm.utils.load_model(path)
    model.set_dtype(mx.float32)  # as ours computes on the CPU, so the two compare fairly
    return model


def assert_nothing_left(parent, out):
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # initializer_range as the real SmolLM3; the tests' default 0.2 makes the tiny model so
    # chaotic that 4-bit logits are barely correlated with the originals.
    path = tmp_path_factory.mktemp("src") / "bf16"
    return make_tiny_checkpoint(path, dtype="bfloat16", initializer_range=0.02)


@pytest.fixture(scope="module")
def reference(ckpt):
    return logits(load_model(ckpt, dtype="float32"))


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    return {n: convert(ckpt, root / n, shard_size=SHARD_SIZE, **kw) for n, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    """A tiny model with the real vocabulary and tokenizer files, as the hub repo has them."""
    path = tmp_path_factory.mktemp("tok") / "SmolLM3-tiny"
    return make_tiny_checkpoint(path, dtype="bfloat16", with_tokenizer=True)


# Relative RMS and max errors of the logits against the unquantized float32 model, measured:
# q8 0.0145 / 0.058, q4-uniform 0.257 / 1.06, q4-mixed 0.245 / 0.92 (a broken conversion: ~1.4).
TOLERANCES = {"q8": (0.025, 0.1), "q4-uniform": (0.35, 1.5), "q4-mixed": (0.35, 1.5)}


@pytest.mark.parametrize("name", VARIANTS)
def test_quantized_logits_stay_close_to_the_float32_model(converted, reference, name):
    got = logits(load_model(converted[name].path, dtype="float32"))
    scale = reference.std()
    rms, peak = np.sqrt(np.mean((got - reference) ** 2)) / scale, np.abs(got - reference).max()
    assert (rms, peak / scale) <= TOLERANCES[name], (rms, peak / scale)


def test_eight_bits_are_much_closer_than_four(converted, reference):
    err = {n: np.abs(logits(load_model(converted[n].path, dtype="float32")) - reference).mean()
           for n in ("q8", "q4-uniform")}  # fmt: skip
    assert err["q8"] < err["q4-uniform"] / 8  # measured: 18x


def test_mixed_recipe_keeps_the_output_head_at_8_bits(ckpt, converted):
    ref = load_model(ckpt, dtype="float32")
    hidden = ref.model(mx.array([IDS]))  # the same hidden states into each output head
    want = np.array(ref.model.embed_tokens.as_linear(hidden))
    err = {}
    for name in ("q4-uniform", "q4-mixed"):
        model = load_model(converted[name].path, dtype="float32")
        assert model.model.embed_tokens.bits == (8 if name == "q4-mixed" else 4)
        assert model.layers[0].mlp.up_proj.bits == 4
        err[name] = np.abs(np.array(model.model.embed_tokens.as_linear(hidden)) - want).mean()
    assert err["q4-mixed"] < err["q4-uniform"] / 8  # measured: 18x


@pytest.mark.parametrize("name", VARIANTS)
def test_mlx_lm_runs_our_output_with_the_same_logits(converted, name):
    path = converted[name].path
    ours, theirs = logits(load_model(path, dtype="float32")), logits(mlx_lm_model(path))
    assert np.abs(ours - theirs).max() <= 1e-4  # measured: 0.0


@pytest.mark.parametrize("group_size", [32, 128])
def test_other_group_sizes_run_the_same_in_mlx_lm(ckpt, reference, tmp_path, group_size):
    path = convert(ckpt, tmp_path / "q", bits=8, group_size=group_size).path
    header = read_safetensors_header(path / "model-00001-of-00001.safetensors")
    # rows of 128 (down_proj) are whole groups at both sizes; rows of 64 only at 32
    assert header["model.layers.0.mlp.down_proj.scales"]["shape"] == [64, 128 // group_size]
    assert ("model.layers.0.mlp.up_proj.scales" in header) == (group_size == 32)
    ours = logits(load_model(path, dtype="float32"))
    assert np.abs(ours - logits(mlx_lm_model(path))).max() <= 1e-4
    assert np.sqrt(np.mean((ours - reference) ** 2)) / reference.std() < TOLERANCES["q8"][0]


def test_output_folder_layout(ckpt, converted):
    result = converted["q4-mixed"]
    out = result.path
    names = sorted(p.name for p in out.iterdir())
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 1 + len(shards))
    ]
    assert {"config.json", "model.safetensors.index.json", "README.md"} <= set(names)
    assert "generation_config.json" in names  # copied: the source has it
    assert not any(n.startswith(".") for n in names)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in shards:
        header = read_safetensors_header(out / shard)
        data = max(t["data_offsets"][1] for t in header.values())
        assert data <= SHARD_SIZE or len(header) <= 3  # or one quantized tensor alone
        stored.update({k: (shard, v) for k, v in header.items()})
    assert index["weight_map"] == {k: shard for k, (shard, _) in stored.items()}
    total = sum(
        math.prod(v["shape"]) * (4 if v["dtype"] == "U32" else 2) for _, v in stored.values()
    )
    assert index["metadata"]["total_size"] == total
    assert stored["model.embed_tokens.weight"][1]["dtype"] == "U32"
    assert stored["model.embed_tokens.scales"][1]["dtype"] == "BF16"
    assert stored["model.norm.weight"][1]["dtype"] == "BF16"
    assert "lm_head.weight" not in stored  # tied: one matrix serves both

    config = json.loads((out / "config.json").read_text())
    q = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["quantization"] == {**q, "model.embed_tokens": {"group_size": 64, "bits": 8}}
    assert config["quantization_config"] == config["quantization"]
    uniform = json.loads((converted["q4-uniform"].path / "config.json").read_text())
    assert uniform["quantization"] == q

    card = (out / "README.md").read_text()
    assert f"| source | `{ckpt}` |" in card
    assert "mixed: the embedding / tied output head at 8 bits" in card
    assert f"{result.bits_per_weight:.3f}" in card
    assert f"{result.size_bytes / 1e6:,.1f} MB" in card
    assert f"smollm3-mlx convert {ckpt} -o {out} --bits 4 --group-size 64 --recipe mixed" in card


def test_result_reports_bits_per_weight_size_and_time(ckpt, converted):
    params = sum(
        math.prod(v["shape"]) for v in read_safetensors_header(ckpt / "model.safetensors").values()
    )
    for result in converted.values():
        files = sorted(result.path.glob("model-*.safetensors"))
        headers = [read_safetensors_header(f) for f in files]
        stored = sum(
            t["data_offsets"][1] - t["data_offsets"][0] for h in headers for t in h.values()
        )
        assert result.bits_per_weight == pytest.approx(8 * stored / params)
        assert result.size_bytes == sum(f.stat().st_size for f in files)
        assert result.seconds > 0
    assert 8.5 < converted["q8"].bits_per_weight < 8.6  # 8 + 2 x 16 bits per 64-group
    assert 4.5 < converted["q4-uniform"].bits_per_weight < converted["q4-mixed"].bits_per_weight


def test_row_blocks_give_the_same_bytes_as_whole_tensors(ckpt, converted, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "CHUNK_ELEMENTS", 200)  # 3 rows of 64, 1 of 128
    out = convert(ckpt, tmp_path / "q4", shard_size=SHARD_SIZE).path
    want = converted["q4-mixed"].path
    for f in want.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_codes_fit_the_stored_scales_better_than_mx_quantize():
    w = mx.random.normal((256, 1024), key=mx.random.key(0)) * 0.02
    w = w.astype(mx.bfloat16).astype(mx.float32)  # exact bf16 source values
    for bits, gain in [(8, 0.85), (4, 1.0)]:
        theirs = mx.quantize(w.astype(mx.bfloat16), 64, bits)
        ours = convert_module._quantize(w, 64, bits, mx.bfloat16)
        f32 = [[q, s.astype(mx.float32), b.astype(mx.float32)] for q, s, b in (ours, theirs)]
        err = [float(mx.abs(mx.dequantize(*q, 64, bits) - w).mean()) for q in f32]
        assert err[0] <= gain * err[1], (bits, err)  # measured: 0.83 at 8 bits, 1.0 at 4


def test_mx_quantize_of_bf16_is_float32_math():
    # _quantize hands bf16 weights to mx.quantize as they are at 4 bits, relying on this.
    w = (mx.random.normal((64, 512), key=mx.random.key(1)) * 0.02).astype(mx.bfloat16)
    direct, via_f32 = mx.quantize(w, 64, 4), mx.quantize(w.astype(mx.float32), 64, 4)
    assert mx.array_equal(direct[0], via_f32[0])
    for a, b in zip(direct[1:], via_f32[1:], strict=True):
        assert mx.array_equal(a, b.astype(mx.bfloat16))


@requires_reference
@pytest.mark.parametrize("predicate", [None, "mixed_3_6"])
def test_we_run_models_converted_by_mlx_lm(tokenizer_ckpt, tmp_path, predicate):
    from mlx_lm.convert import convert as mlx_lm_convert

    out = tmp_path / "mlx-lm-q4"
    mlx_lm_convert(
        str(tokenizer_ckpt), str(out), quantize=True, q_bits=4, quant_predicate=predicate
    )
    ids = [9906, 11, 1917, 0, 128000, 13]
    theirs = logits(mlx_lm_model(out), ids)
    ours = logits(load_model(out, dtype="float32"), ids)
    assert np.abs(ours - theirs).max() <= 1e-4  # measured: 0.0


@requires_reference
def test_we_run_an_mlx_community_repo_from_the_hub(tokenizer_ckpt, tmp_path, monkeypatch):
    # mlx-community's uploads: mlx_lm.convert output as older mlx-lm wrote it (no "mode" in
    # the quantization, recorded twice), a model card, fetched by repo id.
    from mlx_lm.convert import convert as mlx_lm_convert

    import smollm3_mlx

    repo = tmp_path / "mlx-community"
    mlx_lm_convert(str(tokenizer_ckpt), str(repo), quantize=True, q_bits=4)
    config = json.loads((repo / "config.json").read_text())
    q = {"group_size": 64, "bits": 4}
    config.update(quantization=q, quantization_config=q)
    (repo / "config.json").write_text(json.dumps(config, indent=4))
    (repo / "README.md").write_text("---\nlibrary_name: mlx\ntags: [mlx]\n---\n# SmolLM3-3B-4bit\n")
    assert sorted(p.name for p in repo.glob("*.safetensors")) == ["model.safetensors"]
    ids = [9906, 11, 1917, 0, 128000, 13]
    with HubServer({"mlx-community/SmolLM3-3B-4bit": repo}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        model, tokenizer = smollm3_mlx.load("mlx-community/SmolLM3-3B-4bit", dtype="float32")
    assert model.layers[0].mlp.up_proj.bits == 4 and model.model.embed_tokens.bits == 4
    assert np.abs(logits(model, ids) - logits(mlx_lm_model(repo), ids)).max() <= 1e-4
    assert tokenizer.decode(tokenizer.encode("Hello there")).endswith("Hello there")


@pytest.fixture
def no_sleep(monkeypatch):
    """huggingface_hub sleeps 1 s before each resume of a cut download; not here."""
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))


@requires_reference
def test_converts_from_the_hub(tokenizer_ckpt, tmp_path, monkeypatch):
    repo = shutil.copytree(tokenizer_ckpt, tmp_path / "repo")
    (repo / "pytorch_model.bin").write_bytes(b"not needed")
    (repo / "README.md").write_text("# the source's card, not needed\n")
    with HubServer({REPO: repo}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        result = convert(REPO, tmp_path / "q4")
        assert hub.fetched(REPO) == sorted(["config.json", "model.safetensors", *COPIED])
        commit = hub.commit(REPO)
    out = result.path
    assert result.revision == commit
    assert sorted(set(COPIED) - {p.name for p in out.iterdir()}) == []
    card = (out / "README.md").read_text()
    assert f"base_model: {REPO}" in card and f"at revision `{commit}`" in card
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(out))  # what mlx-lm users call: weights, config, tokenizer
    assert tokenizer.decode(tokenizer.encode("Hello there")).endswith("Hello there")
    local = convert(tokenizer_ckpt, tmp_path / "local")
    assert (out / "model-00001-of-00001.safetensors").read_bytes() == (
        local.path / "model-00001-of-00001.safetensors"
    ).read_bytes()

    use_hub(monkeypatch, None, tmp_path / "hf_home", offline=True)  # HF_HUB_OFFLINE: the cache
    assert convert(REPO, tmp_path / "offline").revision == commit
    use_hub(monkeypatch, None, tmp_path / "empty_home", offline=True)
    with pytest.raises(ConvertError, match=f"^download of {REPO} failed: "):
        convert(REPO, tmp_path / "nothing")
    assert_nothing_left(tmp_path, tmp_path / "nothing")


@requires_reference
def test_dropped_download_is_one_clear_error(tokenizer_ckpt, tmp_path, monkeypatch, no_sleep):
    with HubServer({REPO: tokenizer_ckpt}, drop={"model.safetensors": None}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        with pytest.raises(ConvertError, match=f"^download of {REPO} failed: .*Error") as e:
            convert(REPO, tmp_path / "q4")
    assert "\n" not in str(e.value)
    assert_nothing_left(tmp_path, tmp_path / "q4")


def test_hub_download_honours_hf_token_and_feeds_the_one_progress_bar(
    ckpt, tmp_path, monkeypatch, capfd
):
    with HubServer({REPO: ckpt}, token="hf_secret") as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's own bars draw even here
        with pytest.raises(ConvertError) as e:
            convert(REPO, tmp_path / "q4")
        assert str(e.value) == (
            f"download of {REPO} failed: RepositoryNotFoundError: 401 Client Error: Invalid "
            "username or password. (a private or gated repo needs HF_TOKEN with access)"
        )
        assert_nothing_left(tmp_path, tmp_path / "q4")
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        calls = []
        result = convert(REPO, tmp_path / "q4", progress=lambda *a: calls.append(a))
        fetched = hub.fetched(REPO)
    assert result.revision == hub.commit(REPO)
    download = [c for c in calls if c[2] == f"downloading {REPO}"]
    size = sum((ckpt / name).stat().st_size for name in fetched)
    assert download[-1][:2] == (size, size) and calls.index(download[-1]) == len(download) - 1
    assert all(c[0] <= c[1] for c in calls)
    assert calls[-1][2] != download[-1][2] and calls[-1][0] == calls[-1][1]  # then converting
    err = capfd.readouterr().err
    assert "Fetching" not in err and "Download" not in err  # no second bar under ours


def test_hub_revision_is_fetched_and_recorded(ckpt, tmp_path, monkeypatch):
    with HubServer({REPO: ckpt}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        error = f"^download of {REPO} failed: RevisionNotFoundError: 404 Client Error: Invalid rev"
        with pytest.raises(ConvertError, match=error + " id: v9$"):
            convert(REPO, tmp_path / "q8", bits=8, revision="v9")
        commit = hub.commit(REPO)
        result = convert(REPO, tmp_path / "q8", bits=8, revision=commit)
        assert [p for _, p in hub.requests if "main" in p] == []  # the commit, not the branch
    assert result.revision == commit
    card = (result.path / "README.md").read_text()
    assert f"--bits 8 --group-size 64 --recipe uniform --dtype bfloat16 --revision {commit}" in card


def _rewrite(path, edit):
    weights = dict(mx.load(str(path / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})


def _truncate(path):
    file = path / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)


def _model_type(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


BROKEN = {
    "missing": (
        lambda p: _rewrite(p, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
        r"tensor model.layers.1.mlp.up_proj.weight is missing$",
    ),
    "shape": (
        lambda p: _rewrite(p, lambda w: w.update({"model.norm.weight": mx.ones((63,))})),
        r"model.safetensors: tensor model.norm.weight has shape \(63,\), expected \(64,\)$",
    ),
    "unexpected": (
        lambda p: _rewrite(p, lambda w: w.update({"model.extra.weight": mx.ones((4,))})),
        r"model.safetensors: unexpected tensor model.extra.weight$",
    ),
    "duplicate": (
        lambda p: mx.save_safetensors(
            str(p / "model-extra.safetensors"), {"model.norm.weight": mx.ones((64,))}
        ),
        r"model.safetensors: tensor model.norm.weight is also in .*model-extra.safetensors$",
    ),
    "dtype": (
        lambda p: _rewrite(p, lambda w: w.update({"model.norm.weight": mx.ones((64,), mx.int32)})),
        r"model.safetensors: tensor model.norm.weight has unsupported dtype I32$",
    ),
    "truncated": (_truncate, r"model.safetensors: truncated safetensors file"),
    "model_type": (_model_type, r"config.json: model_type is 'llama', expected 'smollm3'$"),
    "non-finite": (  # caught by the check after writing: the logits are not finite
        lambda p: _rewrite(p, lambda w: w.update({"model.norm.weight": mx.full((64,), np.inf)})),
        r"^check of the converted model failed: non-finite logits",
    ),
}


@pytest.mark.parametrize("name", BROKEN)
def test_bad_source_is_one_clear_error_and_nothing_is_written(tmp_path, name):
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16")
    BROKEN[name][0](src)
    with pytest.raises(ConvertError, match=BROKEN[name][1]) as e:
        convert(src, tmp_path / "out")
    assert "\n" not in str(e.value) and (name == "non-finite" or str(src) in str(e.value))
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_existing_output_is_refused_without_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists; pass --force to replace it$"):
        convert(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = convert(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (result.path / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_arguments_are_refused(ckpt, tmp_path):
    for kw, match in [
        (dict(bits=3), "bits must be one of 4, 8, not 3"),
        (dict(group_size=16), "group_size must be one of 32, 64, 128, not 16"),
        (dict(recipe="fancy"), "recipe must be one of uniform, mixed, measured, not fancy"),
        (dict(dtype="float32"), "dtype must be one of bfloat16, float16, not float32"),
        (dict(revision="main"), "is a local folder; --revision applies to hub repos only"),
    ]:
        with pytest.raises(ConvertError, match=match):
            convert(ckpt, tmp_path / "out", **kw)
    with pytest.raises(ConvertError, match="not a model folder"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_float16_output_dtype(ckpt, tmp_path, reference):
    out = convert(ckpt, tmp_path / "f16", bits=8, dtype="float16").path
    header = read_safetensors_header(out / "model-00001-of-00001.safetensors")
    assert {t["dtype"] for t in header.values()} == {"U32", "F16"}
    got = logits(load_model(out, dtype="float32"))
    assert np.sqrt(np.mean((got - reference) ** 2)) / reference.std() < TOLERANCES["q8"][0]


def test_interrupt_leaves_nothing_behind(ckpt, tmp_path):
    calls = []

    def progress(done, total, name):
        calls.append((done, total, name))
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(ConvertError, match="^interrupted; nothing was written to "):
        convert(ckpt, tmp_path / "out", progress=progress, shard_size=SHARD_SIZE)
    assert_nothing_left(tmp_path, tmp_path / "out")
    assert calls[0][0] < calls[-1][0] < calls[-1][1]


def test_progress_reaches_the_total(ckpt, tmp_path):
    calls = []
    convert(ckpt, tmp_path / "out", progress=lambda *a: calls.append(a))
    assert (
        calls[-1][0]
        == calls[-1][1]
        == (ckpt / "model.safetensors").stat().st_size
        - (8 + int.from_bytes((ckpt / "model.safetensors").read_bytes()[:8], "little"))
    )
    assert len(calls) == 4 * 9 + 2  # every source tensor once


DISK_FULL = """
import resource, signal, sys
from smollm3_mlx.convert import ConvertError, convert
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    convert(sys.argv[1], sys.argv[2])
except ConvertError as e:
    sys.exit(f"error: {e}")
"""


def test_disk_full_is_one_clear_error_and_nothing_is_written(ckpt, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(ckpt), str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"error: disk full writing {out} (File too large); nothing was written"
    )
    assert_nothing_left(tmp_path, out)


def test_upload_pushes_the_finished_folder(ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    use_hub(monkeypatch, None, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", "hf_write")

    seen = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False, **kw):
            seen.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type=None, **kw):
            files = sorted(p.name for p in folder_path.iterdir())
            seen.append(("upload_folder", folder_path, repo_id, repo_type, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    result = convert(ckpt, tmp_path / "out", upload_repo="me/SmolLM3-tiny-4bit")
    files = sorted(p.name for p in result.path.iterdir())
    assert seen == [
        ("create_repo", "me/SmolLM3-tiny-4bit", True),
        ("upload_folder", result.path, "me/SmolLM3-tiny-4bit", "model", files),
    ]
    assert "--upload-repo me/SmolLM3-tiny-4bit" in (result.path / "README.md").read_text()


def test_failed_upload_keeps_the_written_folder_and_says_so(ckpt, tmp_path, monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("no route to host\nsecond line")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    use_hub(monkeypatch, None, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", "hf_write")
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as e:
        convert(ckpt, out, upload_repo="me/tiny")
    assert str(e.value) == (
        f"{out} was written, but the upload to me/tiny failed: ConnectionError: no route to host"
    )
    assert (out / "config.json").exists()


def test_an_exception_while_writing_leaves_nothing(ckpt, tmp_path, monkeypatch):
    write, calls = convert_module._write_block, []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("boom")
        write(*args)

    monkeypatch.setattr(convert_module, "_write_block", failing)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=f"^conversion to {out} failed: RuntimeError: boom$"):
        convert(ckpt, out, shard_size=SHARD_SIZE)
    assert len(calls) >= 3
    assert_nothing_left(tmp_path, out)


def test_conversion_streams_small_row_blocks(tmp_path, monkeypatch):
    # MLX memory while writing: a few row blocks, not the model. The source is 824 KB (most of
    # it the 4096 x 64 embedding); measured 68 KB with 4096-element blocks.
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16", vocab_size=4096)
    source_bytes = (src / "model.safetensors").stat().st_size
    monkeypatch.setattr(convert_module, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(convert_module, "_check", lambda folder: None)  # it loads the output
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    out = convert(src, tmp_path / "out").path
    peak = mx.get_peak_memory() - before
    assert peak < source_bytes / 6, (peak, source_bytes)
    assert load_model(out) is not None


def test_cli_takes_every_option_of_the_issue(tmp_path, monkeypatch):
    seen = {}

    def fake_convert(source, out, **kw):
        seen.update(source=source, out=out, **kw)
        return ConvertResult(out, 8.53, 10**6, 1.5, source, "abc", "uniform", 8, 32, "float16",
                             kw["upload_repo"])  # fmt: skip

    monkeypatch.setattr(convert_module, "convert", fake_convert)
    out = tmp_path / "q8"
    args = ["convert", "org/model", "-o", str(out), "--bits", "8", "--group-size", "32",
            "--recipe", "uniform", "--dtype", "float16", "--revision", "v1",
            "--upload-repo", "me/q8", "--force"]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    progress, note = seen.pop("progress"), seen.pop("note")
    assert callable(progress) and callable(note)
    assert seen == dict(
        source="org/model", out=out, bits=8, group_size=32, recipe="uniform", dtype="float16",
        revision="v1", upload_repo="me/q8", force=True, target_bpw=None, measure=None,
        measure_windows=None,
    )  # fmt: skip
    assert "uploaded https://huggingface.co/me/q8" in r.stdout

    seen.clear()
    assert CliRunner().invoke(cli.app, ["convert", "-o", str(out)]).exit_code == 0
    assert seen["source"] == REPO and seen["bits"] == 4 and seen["recipe"] is None
    assert seen["group_size"] == 64 and seen["dtype"] == "bfloat16" and seen["force"] is False
    r = CliRunner().invoke(cli.app, ["convert", str(tmp_path)])
    assert r.exit_code == 2 and "--out" in r.output  # OUT is required
    r = CliRunner().invoke(cli.app, ["convert", "--help"], env={"COLUMNS": "200"})
    assert "convert [OPTIONS] [SOURCE]" in r.output
    for option in ("-o", "--bits", "--group-size", "--recipe", "--dtype", "--revision",
                   "--upload-repo", "--force"):  # fmt: skip
        assert f" {option} " in r.output, option


def test_cli_prints_bits_per_weight_size_and_time_or_one_error_line(ckpt, tmp_path):
    out = tmp_path / "q4"
    r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out)])
    assert r.exit_code == 0, r.output
    result_line = r.stdout.strip()
    assert result_line.startswith(f"converted {out}: 4-bit mixed, ")
    bpw, gb, seconds = result_line.split(": 4-bit mixed, ")[1].split(", ")
    card = (out / "README.md").read_text()
    assert f"| bits per weight | {float(bpw.split()[0]):.2f}" in card
    assert re.fullmatch(r"\d+\.\d\d GB", gb) and re.fullmatch(r"\d+\.\d s", seconds)
    for args, message in [
        (["--bits", "3"], "error: bits must be one of 4, 8, not 3"),
        ([], f"error: {out} already exists; pass --force to replace it"),
    ]:
        r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out), *args])
        assert r.exit_code == 1 and r.stderr == message + "\n", r.output


CTRL_C = """
import importlib, sys, time
from smollm3_mlx.cli.app import app

convert_module = importlib.import_module("smollm3_mlx.convert")

write = convert_module._write_block

def slow(*args):
    sys.stdout.write("block\\n")  # one write: blocks may be written from two threads
    sys.stdout.flush()
    time.sleep(0.3)
    write(*args)

convert_module._write_block = slow
convert_module.CHUNK_ELEMENTS = 2048
app(sys.argv[1:])
"""


def test_ctrl_c_in_the_cli_is_one_line_and_leaves_nothing(ckpt, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, "convert", str(ckpt), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().startswith("block")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr  # as the other commands, and a shell, report Ctrl-C
    assert stderr == f"error: interrupted; nothing was written to {out}\n"
    assert "converted" not in stdout
    assert_nothing_left(tmp_path, out)


HUB_CTRL_C = """
import sys
from huggingface_hub import constants
from smollm3_mlx.cli.app import app

constants.DOWNLOAD_CHUNK_SIZE = 1024  # blocks of a tiny file, as a real shard comes in 10 MiB
app(sys.argv[1:])
"""


def test_ctrl_c_during_the_hub_download_stops_it_at_once(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # 0.05 s per KiB: the whole model.safetensors would take about 18 s to arrive.
    with HubServer({REPO: ckpt}, slow={"model.safetensors": 0.05}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-c", HUB_CTRL_C, "convert", REPO, "-o", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "model.safetensors" not in hub.fetched() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)  # well inside the download
            proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            stdout, stderr = proc.communicate(timeout=60)
            seconds = time.monotonic() - start
        finally:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr == f"error: interrupted; nothing was written to {out}\n"
    assert seconds < 5, seconds  # not the ~17 s the rest of the file takes (measured: 0.1 s)
    assert_nothing_left(tmp_path, out)


def test_publish_variants_converts_each_from_one_download(ckpt, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "publish_variants", REPO_ROOT / "convert" / "publish_variants.py"
    )
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    with HubServer({REPO: ckpt}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        assert publish.main([str(tmp_path / "out"), "--source", REPO]) == 0
        bodies = [path for _, path, _ in hub.downloads]
    assert bodies.count("model.safetensors") == 1
    quantization = {
        p.name: json.loads((p / "config.json").read_text())["quantization"]
        for p in (tmp_path / "out").iterdir()
    }
    assert quantization == {
        "SmolLM3-3B-4bit": {"group_size": 64, "bits": 4, "mode": "affine",
                            "model.embed_tokens": {"group_size": 64, "bits": 8}},
        "SmolLM3-3B-8bit": {"group_size": 64, "bits": 8, "mode": "affine"},
    }  # fmt: skip
    table = capsys.readouterr().out
    assert "| SmolLM3-3B-4bit | mixed |" in table and "| SmolLM3-3B-8bit | uniform |" in table

    assert publish.main([str(tmp_path / "out"), "--source", str(ckpt), "--only", "8bit"]) == 0
    assert (tmp_path / "out" / "bf16-8bit" / "config.json").exists()  # named after a folder too
    assert publish.main([str(tmp_path / "out"), "--source", str(ckpt), "--only", "8bit"]) == 1
    out = tmp_path / "out" / "bf16-8bit"
    assert capsys.readouterr().err == (
        f"error: bf16-8bit: {out} already exists; pass --force to replace it\n"
    )


def _slow_convert(ckpt, out, cwd=None):
    """The CLI converting `ckpt` slowly, in a process of its own; returns once it is writing."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, "convert", str(ckpt), "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )  # fmt: skip
    assert proc.stdout.readline().startswith("block")
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_as_ctrl_c_does(ckpt, tmp_path, signum):
    out = tmp_path / "out"
    proc = _slow_convert(ckpt, out)
    try:
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # it is writing
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr  # as a shell reports a process it ended
    assert stderr == f"error: stopped by {name}; nothing was written to {out}\n"
    assert_nothing_left(tmp_path, out)


def test_next_run_removes_what_a_killed_conversion_left_and_says_so(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = _slow_convert(ckpt, out)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0].name
    # An old OUT that a --force run had set aside when it was killed, OUT itself gone: put back.
    aside = tmp_path / f".kept.old-{proc.pid}-abcdefgh"
    (aside / "kept").mkdir(parents=True)
    (aside / "kept" / "config.json").write_text("{}")
    marker = json.loads((stale[0] / files.MARKER).read_text())
    (aside / files.MARKER).write_text(json.dumps(marker))
    # Ours but alive (this process), and a look-alike without our marker: both left alone.
    live = files.make_temp(tmp_path / "busy", "tmp")
    (tmp_path / ".other.tmp-1-abcdefgh").mkdir()

    r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out)])
    assert r.exit_code == 0, r.output
    size = r.stderr.split(f"removed {stale[0]} (")[1].split(")")[0]
    assert re.fullmatch(r"\d+\.\d\d KB", size), r.stderr
    assert r.stderr.splitlines() == [
        f"put back {tmp_path / 'kept'}, set aside by a conversion (process {proc.pid}) that was "
        "killed",
        f"removed {stale[0]} ({size}), left by a conversion (process {proc.pid}) that was killed",
    ]
    assert (tmp_path / "kept" / "config.json").read_text() == "{}"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([".other.tmp-1-abcdefgh", live.name, "kept", "out"])
    assert not (out / files.MARKER).exists()  # the marker never reaches the output


def _refused_before_any_work(monkeypatch):
    def never(*args):
        raise AssertionError("the conversion started")

    monkeypatch.setattr(convert_module, "_validate", never)
    monkeypatch.setattr(convert_module, "snapshot", never)


@pytest.mark.parametrize(
    "where, message",
    [
        ("source", "{out} is the source folder {src}; choose another output"),
        ("inside", "{out} lies inside the source folder {src}; choose another output"),
        ("holding", "{out} holds the source folder {src}; choose another output"),
        ("cwd", "{out} is the current folder; choose a new folder for the output"),
        (
            "above cwd",
            "{out} is a folder holding the current folder; choose a new folder for the output",
        ),  # fmt: skip
    ],
)
def test_output_that_would_destroy_the_source_or_current_folder_is_refused_first(
    tmp_path, monkeypatch, where, message
):
    src = make_tiny_checkpoint(tmp_path / "models" / "src", dtype="bfloat16")
    before = sorted(p.name for p in src.iterdir())
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = {"source": src, "inside": src / "q4", "holding": src.parent, "cwd": Path("."),
           "above cwd": Path("..")}[where]  # fmt: skip
    _refused_before_any_work(monkeypatch)
    r = CliRunner().invoke(cli.app, ["convert", str(src), "-o", str(out), "--force"])
    assert r.exit_code == 1
    assert r.stderr == "error: " + message.format(out=out, src=src) + "\n"
    assert sorted(p.name for p in src.iterdir()) == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_output_in_the_current_folder_of_a_hub_source_is_refused_before_downloading(
    ckpt, tmp_path, monkeypatch
):
    with HubServer({REPO: ckpt}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConvertError, match="^. is the current folder"):
            convert(REPO, ".", force=True)
        assert hub.requests == []


@pytest.mark.parametrize(
    "remove, missing",
    [
        (["tokenizer.json"], "tokenizer.json; the converted model needs it"),
        (["tokenizer_config.json"], "tokenizer_config.json; the converted model needs it"),
        (["generation_config.json"], "generation_config.json; the converted model needs it"),
        (["chat_template.jinja"], "a chat template (chat_template.jinja); the converted model"),
    ],
)
def test_local_source_without_what_the_output_needs_is_refused(tmp_path, remove, missing):
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16")
    for name in remove:
        (src / name).unlink()
    with pytest.raises(ConvertError, match=f"^{re.escape(f'{src} has no {missing}')}"):
        convert(src, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_a_template_inside_tokenizer_config_is_enough(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = (src / "chat_template.jinja").read_text()
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").unlink()
    from smollm3_mlx import load

    _, tokenizer = load(convert(src, tmp_path / "out").path)
    assert tokenizer.chat_template == config["chat_template"]


def test_unreadable_tokenizer_is_refused_before_converting(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16")
    (src / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConvertError, match=rf"^{re.escape(str(src))}/tokenizer.json: cannot be "):
        convert(src, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_hub_repo_without_tokenizer_is_refused_before_downloading_the_weights(
    tmp_path, monkeypatch
):
    src = make_tiny_checkpoint(tmp_path / "src", dtype="bfloat16")
    (src / "tokenizer.json").unlink()
    with HubServer({REPO: src}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        with pytest.raises(ConvertError, match=f"^{REPO} has no tokenizer.json; the converted"):
            convert(REPO, tmp_path / "out")
        assert "model.safetensors" not in hub.fetched(REPO)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_too_little_disk_space_is_refused_before_writing(ckpt, converted, tmp_path, monkeypatch):
    import shutil as shutil_module

    made = converted["q4-mixed"].path  # the same conversion: its size is what is needed
    size = sum(f.stat().st_size for f in made.iterdir())
    usage = shutil_module.disk_usage(tmp_path)
    free = {"bytes": size}

    def disk_usage(path):
        return usage._replace(free=free["bytes"])

    monkeypatch.setattr(shutil_module, "disk_usage", disk_usage)
    out, written = tmp_path / "out", []
    need = rf"^not enough disk space for {out}: it needs \d+\.\d\d MB, {tmp_path} has "
    with monkeypatch.context() as m:
        m.setattr(convert_module, "_write_shards", lambda *a: written.append(a))
        with pytest.raises(ConvertError, match=need + r"\d+\.\d\d KB free$"):
            convert(ckpt, out, shard_size=SHARD_SIZE)
    assert written == []
    assert_nothing_left(tmp_path, out)
    free["bytes"] = size + 2 * convert_module.SPACE_MARGIN
    assert convert(ckpt, out, shard_size=SHARD_SIZE).path == out


@pytest.mark.parametrize(
    "repo, env, message",
    [
        ("tiny", {"HF_TOKEN": "hf_w"}, "upload repo 'tiny' must be USER/NAME or ORG/NAME"),
        ("me/a/b", {"HF_TOKEN": "hf_w"}, "upload repo 'me/a/b' must be USER/NAME or ORG/NAME"),
        ("me/bad name", {"HF_TOKEN": "hf_w"}, "upload repo 'me/bad name' is not a valid repo id"),
        ("me/tiny", {}, "uploading to me/tiny needs a hub token with write access: set HF_TOKEN"),
        (
            "me/tiny",
            {"HF_TOKEN": "hf_w", "HF_HUB_OFFLINE": "1"},
            "cannot upload to me/tiny: HF_HUB_OFFLINE is set",
        ),  # fmt: skip
    ],
)
def test_upload_repo_is_checked_before_converting(ckpt, tmp_path, monkeypatch, repo, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    use_hub(monkeypatch, None, tmp_path / "hf_home", offline="HF_HUB_OFFLINE" in env)
    if "HF_TOKEN" in env:
        monkeypatch.setenv("HF_TOKEN", env["HF_TOKEN"])  # use_hub clears it
    _refused_before_any_work(monkeypatch)
    with pytest.raises(ConvertError, match=f"^{re.escape(message)}"):
        convert(ckpt, tmp_path / "out", upload_repo=repo)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_the_model_cards_commands_run(ckpt, tmp_path):
    out = tmp_path / "q4"
    assert CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out)]).exit_code == 0
    card = (out / "README.md").read_text()
    commands = re.findall(r"^(smollm3-mlx .+)$|`(smollm3-mlx [^`]+)`", card, re.MULTILINE)
    commands = [shlex.split(a or b) for a, b in commands]
    assert [c[1] for c in commands] == ["convert", "chat"]
    first = out.rename(tmp_path / "first")
    for command in commands:  # the convert command makes the same folder again
        r = CliRunner().invoke(cli.app, command[1:], input="/exit\n")
        assert r.exit_code == 0, (command, r.output)
    for f in first.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


@pytest.mark.filterwarnings("ignore:Not enough free disk space")  # huggingface_hub's own, per file
def test_a_download_the_cache_cannot_hold_is_refused_before_the_weights(
    ckpt, tmp_path, monkeypatch
):
    import shutil as shutil_module

    hf_home, disk_usage = tmp_path / "hf_home", shutil_module.disk_usage

    def full_cache(path):  # the cache's disk is nearly full; the output's is not
        usage = disk_usage(path)
        return usage._replace(free=1000) if hf_home in Path(path).parents else usage

    with HubServer({REPO: ckpt}) as hub:
        use_hub(monkeypatch, hub.url, hf_home)
        monkeypatch.setattr(shutil_module, "disk_usage", full_cache)
        size = _size_text((ckpt / "model.safetensors").stat().st_size)
        with pytest.raises(ConvertError) as e:
            convert(REPO, tmp_path / "out")
        assert str(e.value) == (
            f"not enough disk space to download {REPO}: it needs {size}, "
            f"{hf_home / 'hub'} has 1.00 KB free"
        )
        assert "model.safetensors" not in hub.fetched(REPO)
    assert_nothing_left(tmp_path, tmp_path / "out")


def _size_text(n):
    return files.human_size(n)


def test_convert_and_load_refuse_the_same_names_that_are_neither_a_folder_nor_a_repo_id(
    tmp_path, monkeypatch
):
    from smollm3_mlx.checkpoint import ModelLoadError
    from smollm3_mlx.loading import load

    with HubServer({}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        monkeypatch.chdir(tmp_path)
        for name in ("SmolLM3-3B-4bt", "a/b/c"):
            message = f"{name}: no local folder of that name, and not a hub repo id (OWNER/NAME)"
            with pytest.raises(ConvertError) as converting:
                convert(name, tmp_path / "out")
            with pytest.raises(ModelLoadError) as loading:
                load(name)
            assert str(converting.value) == str(loading.value) == message
        assert hub.requests == []
    assert not (tmp_path / "out").exists()
