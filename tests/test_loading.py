"""Loading: both layouts, shards, and one clear error for each kind of bad input."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REPO_ROOT, make_tiny_checkpoint, requires_reference

from smollm3_mlx.loading import ModelLoadError, load, load_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def make_sharded(path):
    import torch
    from transformers import SmolLM3ForCausalLM

    model = SmolLM3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = path.parent / (path.name + "-sharded")
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def with_weights(ckpt, dst, edit):
    """A copy of `ckpt` at `dst` whose weights dict went through `edit`."""
    dst.mkdir()
    (dst / "config.json").write_text((ckpt / "config.json").read_text())
    weights = mx.load(str(ckpt / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


def test_sharded_checkpoint_loads_like_single_file(ckpt):
    out = make_sharded(ckpt)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = mx.array([[1, 2, 3, 4]])
    a, b = load_model(ckpt)(ids), load_model(out)(ids)
    assert np.array_equal(np.array(a), np.array(b))


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_foreign_model_type_is_an_error(tmp_path, ckpt):
    bad = tmp_path / "llama"
    bad.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=r"config.json: model_type is 'llama'"):
        load_model(bad)


def test_missing_shard_is_an_error(ckpt):
    out = make_sharded(ckpt)
    victim = sorted(out.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"shard {victim.name} .* is missing"):
        load_model(out)


def test_truncated_safetensors_is_an_error(tmp_path, ckpt):
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_text((ckpt / "config.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: truncated safetensors"):
        load_model(bad)


def test_tensor_of_wrong_shape_is_an_error(tmp_path, ckpt):
    key = "model.layers.1.mlp.up_proj.weight"
    bad = with_weights(ckpt, tmp_path / "shape", lambda w: w.update({key: w[key][:, :32]}))
    with pytest.raises(
        ModelLoadError, match=rf"model.safetensors: tensor {key} has shape \(128, 32\), expected"
    ):
        load_model(bad)


def test_missing_tensor_is_an_error(tmp_path, ckpt):
    bad = with_weights(
        ckpt, tmp_path / "missing", lambda w: w.pop("model.layers.2.self_attn.k_proj.weight")
    )
    with pytest.raises(ModelLoadError, match="model.layers.2.self_attn.k_proj.weight is missing"):
        load_model(bad)


def test_untied_lm_head_is_dropped_when_tied(tmp_path, ckpt):
    extra = with_weights(
        ckpt,
        tmp_path / "extra",
        lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"]}),
    )
    load_model(extra)  # no error: tied models ignore a saved lm_head


def test_import_does_not_pull_torch_transformers_or_mlx_lm():
    code = (
        "import sys, smollm3_mlx, smollm3_mlx.loading, smollm3_mlx.generate;"
        "bad = {'torch', 'transformers', 'mlx_lm'} & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "[]"


@requires_reference
def test_load_by_repo_id_downloads_through_the_hub_protocol(tmp_path, monkeypatch):
    from hub_server import HubServer, use_hub

    repo = make_tiny_checkpoint(tmp_path / "repo", with_tokenizer=True)
    (repo / "notes.bin").write_bytes(b"not needed")
    with HubServer({"HuggingFaceTB/SmolLM3-3B": repo}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf")
        model, tokenizer = load("HuggingFaceTB/SmolLM3-3B")
        assert "notes.bin" not in hub.fetched()
    assert model.path.is_relative_to(tmp_path / "hf")
    assert tokenizer.eos_token_ids == {tokenizer.token_to_id("<|im_end|>")}
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 128256)


def test_unknown_local_path_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load(str(tmp_path / "nowhere"))
