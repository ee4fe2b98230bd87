"""convert/make_random_checkpoint.py: the real SmolLM3-3B layout, filled with random numbers."""

import importlib.util
import json
import re

import pytest
from checkpoints import REFERENCE_DIR, REFERENCE_MODEL_DIR, REPO_ROOT, requires_reference

pytestmark = requires_reference

_spec = importlib.util.spec_from_file_location(
    "make_random_checkpoint", REPO_ROOT / "convert" / "make_random_checkpoint.py"
)
mrc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mrc)

LAYERS = 2
SMALL_FILES = (
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.json",
)
# Shard sizes recorded by the HF mirror's model_files.json (see the reference's PROVENANCE.md).
REAL_SHARD_BYTES = {
    "model-00001-of-00002.safetensors": 4966315264,
    "model-00002-of-00002.safetensors": 1183919744,
}


def real_config():
    return json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())


def real_index():
    return json.loads((REFERENCE_MODEL_DIR / "model.safetensors.index.json").read_text())


def expected_shape(key, cfg):
    """The shape of `key`, written out from the config independently of the script."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], 128
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    suffix = key.split(".", 3)[-1] if key.startswith("model.layers.") else key
    return {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }[suffix]


def build(out, **kw):
    return mrc.make_random_checkpoint(
        out, num_hidden_layers=kw.pop("num_hidden_layers", LAYERS), log=None, **kw
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build(tmp_path_factory.mktemp("random") / "ckpt", reference=REFERENCE_DIR)


def test_full_layout_reproduces_the_real_index_and_shard_sizes():
    layout = mrc._layout(real_config())
    index = mrc._index(layout)
    assert index == real_index()
    assert index["metadata"]["total_size"] == 6150197248
    sizes = {name: mrc._file_size(shard, header) for name, (shard, header) in layout.items()}
    assert sizes == REAL_SHARD_BYTES


def test_keys_shapes_and_dtypes_match_the_real_index_for_the_layers_kept(small):
    import torch
    from safetensors import safe_open

    def kept(key):
        m = re.match(r"model\.layers\.(\d+)\.", key)
        return m is None or int(m.group(1)) < LAYERS

    expected = sorted(k for k in real_index()["weight_map"] if kept(k))
    index = json.loads((small / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == expected
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}

    cfg, seen, total = real_config(), [], 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(small / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                t = f.get_tensor(key)
                assert tuple(t.shape) == expected_shape(key, cfg), key
                assert t.dtype == torch.bfloat16, key
                seen.append(key)
                total += t.numel() * 2
    assert sorted(seen) == expected
    assert index["metadata"]["total_size"] == total


def test_values_look_like_a_real_init(small):
    from safetensors import safe_open

    with safe_open(small / "model-00001-of-00001.safetensors", framework="pt") as f:
        w = f.get_tensor("model.layers.1.self_attn.k_proj.weight").float()
        norm = f.get_tensor("model.norm.weight").float()
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    assert abs(norm.mean() - 1.0) < 5e-3 and 0 < norm.std() < 0.05


def test_config_is_cut_to_the_layers_kept_and_other_files_are_copied(small):
    cfg, real = json.loads((small / "config.json").read_text()), real_config()
    assert cfg["num_hidden_layers"] == LAYERS
    assert cfg["no_rope_layers"] == real["no_rope_layers"][:LAYERS]
    assert cfg["layer_types"] == real["layer_types"][:LAYERS]
    changed = {"num_hidden_layers", "no_rope_layers", "layer_types"}
    assert {k: v for k, v in cfg.items() if k not in changed} == {
        k: v for k, v in real.items() if k not in changed
    }
    for name in SMALL_FILES:
        assert (small / name).read_bytes() == (REFERENCE_MODEL_DIR / name).read_bytes(), name


def test_transformers_loads_it_with_no_missing_or_unexpected_keys(small):
    from transformers import SmolLM3ForCausalLM

    _, info = SmolLM3ForCausalLM.from_pretrained(small, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_build_renames_into_place_and_leaves_no_temporary_folder(small):
    assert [p.name for p in small.parent.iterdir()] == ["ckpt"]
    assert mrc.is_complete(small, num_hidden_layers=LAYERS)
    assert not mrc.is_complete(small)  # a full-size request is not satisfied by 2 layers
    assert not mrc.is_complete(small, seed=1, num_hidden_layers=LAYERS)


def test_existing_output_is_refused_unless_if_missing_finds_it_complete(small, capsys):
    before = (small / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--force"):
        build(small, reference=REFERENCE_DIR)
    with pytest.raises(FileExistsError, match="--force"):
        build(small, reference=REFERENCE_DIR, seed=1, if_missing=True)
    assert build(small, reference=REFERENCE_DIR, if_missing=True) == small
    assert (small / "model-00001-of-00001.safetensors").stat().st_mtime_ns == before

    assert mrc.main([str(small), "--layers", str(LAYERS)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrc, "_make_chunk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build(tmp_path / "ckpt", reference=REFERENCE_DIR)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build(out, reference=REFERENCE_DIR, num_hidden_layers=1, force=True)
    assert not (out / "stale.txt").exists()
    assert mrc.is_complete(out, num_hidden_layers=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_reference_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM3_REFERENCE_DIR", str(tmp_path / "nowhere"))
    assert mrc.main([str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SMOLLM3_REFERENCE_DIR" in err
    assert list(tmp_path.iterdir()) == []


def test_chunks_depend_only_on_seed_name_and_index():
    a = mrc._make_chunk(0, "model.layers.0.mlp.up_proj.weight", 3, 1000)
    assert (a == mrc._make_chunk(0, "model.layers.0.mlp.up_proj.weight", 3, 1000)).all()
    assert not (a == mrc._make_chunk(1, "model.layers.0.mlp.up_proj.weight", 3, 1000)).all()
    assert not (a == mrc._make_chunk(0, "model.layers.0.mlp.up_proj.weight", 4, 1000)).all()


def test_bf16_conversion_rounds_to_nearest_even_like_torch():
    import numpy as np
    import torch

    x = np.random.default_rng(0).standard_normal(1 << 16, dtype=np.float32) * 0.02
    # Ties: exactly half-way between two bf16 values, with an even and an odd lower neighbour.
    x = np.concatenate([x, np.array([0x3F808000, 0x3F818000], np.uint32).view(np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert (mrc._to_bf16(x) == want).all()
