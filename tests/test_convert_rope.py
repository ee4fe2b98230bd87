"""A converted folder reads the same RoPE settings in every runtime that loads it: ours, mlx-lm
(top-level rope_theta / rope_scaling only), transformers 5 (rope_parameters) and 4 (top level).

Sources come in both spellings: transformers 5 writes `rope_parameters` and no top-level
`rope_theta`; transformers 4 (and the real SmolLM3-3B config.json) the reverse.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint

from smollm3_mlx.checkpoint import load_config, model_args
from smollm3_mlx.convert import convert
from smollm3_mlx.loading import load_model

IDS = np.random.default_rng(1).integers(0, 512, 48).tolist()
THETA = 5e6  # far from mlx-lm's fallback of 10000, so a misread moves the logits
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
CASES = {
    f"{spelling}-{kind}": (spelling, rope)
    for spelling in ("v5", "v4")
    for kind, rope in (("plain", None), ("yarn", YARN))
}


def _settings(rope_parameters: dict) -> dict:
    # transformers keeps a transformers 4 source's legacy "type" beside "rope_type"
    return {k: v for k, v in rope_parameters.items() if k != "type"}


def _our_rope(path) -> dict:
    args = model_args(load_config(path))
    return {k: getattr(args, k) for k in ("rope_theta", "rope_scaling", "rope_parameters")}


def _logits(model) -> np.ndarray:
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    spelling, rope = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = make_tiny_checkpoint(
        root / "src", rope_theta=THETA, rope_scaling=rope, spelling=spelling
    )
    out = convert(source, root / "out", bits=8).path
    return rope, source, out


def test_mlx_lm_computes_our_logits_on_the_converted_folder(case):
    import mlx_lm.utils

    _, _, out = case
    theirs, _ = mlx_lm.utils.load_model(out)
    theirs.set_dtype(mx.float32)
    ours = load_model(out, dtype="float32")
    assert np.abs(_logits(ours) - _logits(theirs)).max() <= 1e-4


def test_transformers_reads_the_source_rope_settings_from_the_converted_config(case):
    from transformers import AutoConfig

    rope, source, out = case
    expected = {"rope_type": "default", "rope_theta": THETA, **(rope or {})}
    assert _settings(AutoConfig.from_pretrained(source).rope_parameters) == expected
    assert _settings(AutoConfig.from_pretrained(out).rope_parameters) == expected
    # transformers 4 and mlx-lm read the top level only
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == THETA
    assert config["rope_scaling"] == (None if rope is None else rope)
    assert config["rope_parameters"] == expected
    # and our loader reads the same settings from the output as from the source
    assert _our_rope(out) == _our_rope(source)
