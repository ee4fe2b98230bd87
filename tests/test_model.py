"""The port against the reference: transformers' SmolLM3 (and mlx-lm's) on the same tiny weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import hf_logits, make_tiny_checkpoint
from mlx.utils import tree_flatten

from smollm3_mlx.loading import load_model
from smollm3_mlx.model import DEFAULT_ROPE_THETA, Model, ModelArgs

ATOL = 1e-4
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
IDS = np.random.default_rng(0).integers(0, 512, 96).tolist()  # 96 > 2 x the YaRN window


def ours(path, ids=IDS, **kw):
    model = load_model(path, **kw)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("default"))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("default-v5", {}),
        ("default-v4", {"spelling": "v4"}),
        ("theta-v5", {"rope_theta": 500_000.0}),
        ("theta-v4", {"rope_theta": 500_000.0, "spelling": "v4"}),
        ("yarn-v5", {"rope_scaling": YARN}),
        ("yarn-v4", {"rope_scaling": YARN, "spelling": "v4"}),
        ("yarn-beta", {"rope_scaling": {**YARN, "beta_fast": 16.0, "beta_slow": 2.0}}),
        ("nope-every-2nd", {"no_rope_layer_interval": 2}),
    ],
)
def test_logits_match_transformers_at_every_position(tmp_path, name, kwargs):
    path = make_tiny_checkpoint(tmp_path / name, **kwargs)
    ref = hf_logits(path, IDS)
    got = ours(path)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= ATOL


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def drop_theta(config):
    config.pop("rope_theta", None)
    config["rope_parameters"].pop("rope_theta")


def drop_nope_list(config):
    del config["no_rope_layers"], config["layer_types"]


@pytest.mark.parametrize(
    "name, kwargs, edit, no_rope_layers",
    [
        # transformers falls back to SmolLM3Config.default_theta (2e6), not Llama's 10000.
        ("no-theta", {}, drop_theta, [1, 1, 1, 0]),
        ("derived-every-4th", {}, drop_nope_list, [1, 1, 1, 0]),
        ("derived-every-2nd", {"no_rope_layer_interval": 2}, drop_nope_list, [1, 0, 1, 0]),
    ],
)
def test_logits_match_transformers_when_config_omits_keys(
    tmp_path, name, kwargs, edit, no_rope_layers
):
    path = edit_config(make_tiny_checkpoint(tmp_path / name, **kwargs), edit)
    model = load_model(path)
    assert model.args.no_rope_layers == no_rope_layers
    got = np.array(model(mx.array([IDS]))[0])
    assert np.abs(got - hf_logits(path, IDS)).max() <= ATOL


def test_missing_theta_parity_would_catch_a_fallback_to_10000(tmp_path):
    # Guards the no-theta case above: Llama's 10000 (mlx-lm's fallback) moves the logits.
    path = edit_config(make_tiny_checkpoint(tmp_path / "no-theta"), drop_theta)
    assert load_model(path).args.rope_theta == DEFAULT_ROPE_THETA == 2_000_000.0
    llama = edit_config(
        make_tiny_checkpoint(tmp_path / "llama-theta"),
        lambda c: c["rope_parameters"].update(rope_theta=10_000.0),
    )
    assert np.abs(ours(llama) - hf_logits(path, IDS)).max() > 100 * ATOL


V4_YARN = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
V5_YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
ROPE_CONFIGS = {
    "v4-default": dict(rope_theta=5e6, rope_scaling=None),
    "v4-yarn": dict(rope_theta=5e6, rope_scaling=V4_YARN),
    "v4-yarn-betas": dict(rope_theta=5e6, rope_scaling={**V4_YARN, "beta_fast": 8, "beta_slow": 2}),
    "v5-default": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e6}),
    "v5-yarn": dict(rope_parameters={**V5_YARN, "rope_theta": 5e6}),
    "v5-no-theta": dict(rope_parameters={"rope_type": "default"}),
    "v5-theta-outside": dict(rope_theta=5e5, rope_parameters={"rope_type": "default"}),
    "v5-theta-both": dict(
        rope_theta=5e5, rope_parameters={"rope_type": "default", "rope_theta": 7e5}
    ),
    "nothing": dict(),
    "both-spellings": dict(
        rope_theta=5e5,
        rope_scaling=V5_YARN,
        rope_parameters={"rope_type": "default", "rope_theta": 7e5},
    ),
}


@pytest.mark.parametrize("name", ROPE_CONFIGS)
def test_rope_settings_are_read_as_transformers_reads_them(name):
    from transformers import SmolLM3Config

    config = dict(ROPE_CONFIGS[name], num_hidden_layers=4, max_position_embeddings=128)
    theirs = dict(SmolLM3Config.from_dict(json.loads(json.dumps(config))).rope_parameters)
    theirs.pop("type", None)
    ours = ModelArgs.from_dict(config)
    assert ours.rope_theta == theirs.pop("rope_theta")
    assert ours.rope_parameters["rope_type"] == theirs["rope_type"]
    assert (ours.rope_scaling or {"rope_type": "default"}) == theirs


def test_yarn_changes_logits_past_the_original_window(tmp_path):
    # Guards the YaRN parity test: it must be able to fail, so YaRN must matter here.
    plain = ours(make_tiny_checkpoint(tmp_path / "plain"))
    yarn = ours(make_tiny_checkpoint(tmp_path / "yarn", rope_scaling=YARN))
    assert np.abs(plain - yarn)[40:].max() > 100 * ATOL


@pytest.mark.parametrize("swap", ["rope-everywhere", "inverted-flags"])
def test_parity_catches_swapped_nope_layers(default_ckpt, swap):
    ref = hf_logits(default_ckpt, IDS)
    model = load_model(default_ckpt)
    layers = model.args.no_rope_layers
    wrong = [1] * len(layers) if swap == "rope-everywhere" else [1 - f for f in layers]
    broken_args = ModelArgs.from_dict({**vars(model.args), "no_rope_layers": wrong})
    broken = Model(broken_args)
    broken.load_weights(tree_flatten(model.parameters()))
    got = np.array(broken(mx.array([IDS]))[0])
    assert np.abs(got - ref).max() > 100 * ATOL


def test_nope_layers_are_every_fourth_as_in_the_real_config():
    args = ModelArgs(num_hidden_layers=36)
    assert [i for i, f in enumerate(args.no_rope_layers) if f == 0] == list(range(3, 36, 4))


def test_config_rope_spellings_agree():
    v4 = ModelArgs(num_hidden_layers=4, rope_theta=5e6, rope_scaling={"type": "yarn", **YARN})
    v5 = ModelArgs(num_hidden_layers=4, rope_parameters={"rope_theta": 5e6, **YARN})
    assert (v4.rope_theta, v4.rope_scaling) == (v5.rope_theta, v5.rope_scaling)
    assert v5.rope_theta == 5e6  # a transformers-5 config must not fall back to 10000


def test_unsupported_rope_type_is_an_error():
    with pytest.raises(ValueError, match="unsupported RoPE type 'llama3'"):
        ModelArgs(rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_yarn_without_original_window_is_an_error():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        ModelArgs(rope_parameters={"rope_theta": 5e6, "rope_type": "yarn", "factor": 2.0})


def test_no_rope_layers_of_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="no_rope_layers has 3 entries"):
        ModelArgs(num_hidden_layers=4, no_rope_layers=[1, 1, 0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tmp_path, dtype):
    path = make_tiny_checkpoint(tmp_path / dtype, dtype=dtype)
    full = ours(path, dtype="float32")
    half = ours(path, dtype=dtype)
    assert np.isfinite(half).all()
    # Measured: 3.6% (bfloat16, identical to mlx-lm's) and 0.5% (float16) relative error.
    assert np.linalg.norm(half - full) / np.linalg.norm(full) < 0.06


def test_logits_match_mlx_lm(tmp_path):
    # A second oracle: mlx-lm's smollm3 port on the same weights (transformers-4 spelling,
    # which mlx-lm reads).
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = make_tiny_checkpoint(tmp_path / "m", rope_theta=500_000.0, spelling="v4")
    theirs, _ = mlx_lm_load_model(path)
    ref = np.array(theirs(mx.array([IDS]))[0])
    assert np.abs(ours(path) - ref).max() <= ATOL
