"""The converter: outputs that we and mlx-lm both run, from a folder or the hub, and failures
that leave nothing behind."""

import json
import math
import os
import shutil
import subprocess
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REPO_ROOT, make_tiny_checkpoint, requires_reference
from hub_server import HubServer, use_hub
from huggingface_hub import file_download

import smollm3_mlx.convert as convert_module
from smollm3_mlx.convert import ConvertError, convert
from smollm3_mlx.loading import load_model, read_safetensors_header

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
        (dict(recipe="fancy"), "recipe must be one of uniform, mixed, not fancy"),
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
