"""The port against the reference: transformers' SmolLM3 (and mlx-lm's) on the same tiny weights."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import hf_logits, make_tiny_checkpoint
from mlx.utils import tree_flatten

from smollm3_mlx.loading import load_model
from smollm3_mlx.model import Model, ModelArgs

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
