"""Measuring what quantization cost (quality.py), the measured recipe (recipe.py), and both as
`convert` writes them: figures in the card and quality.json that a separate run reproduces."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint
from typer.testing import CliRunner

from smollm3_mlx import quality, recipe
from smollm3_mlx.cli import app as cli
from smollm3_mlx.convert import convert
from smollm3_mlx.loading import load_model
from smollm3_mlx.tokenizer import Tokenizer

WINDOWS = 3  # of the evaluation text: enough to pair, quick on the CPU


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "bf16"
    return make_tiny_checkpoint(path, dtype="bfloat16", initializer_range=0.02)


@pytest.fixture(scope="module")
def q4(ckpt, tmp_path_factory):
    return convert(ckpt, tmp_path_factory.mktemp("q4") / "q4", bits=4, recipe="uniform").path


def test_a_model_compared_with_itself_costs_nothing(ckpt):
    q = quality.compare(ckpt, ckpt, windows=WINDOWS)
    assert q.windows == WINDOWS and q.sampled and q.tokens == WINDOWS * quality.DEFAULT_WINDOW
    assert abs(q.kl) < 1e-6 and q.top1 == 1.0 and q.nll_source == q.nll_quantized


def test_layer_by_layer_figures_equal_one_whole_forward_pass(ckpt, q4):
    text = quality.shipped_text("evaluation")[:3000]
    got = quality.compare(ckpt, q4, text=text, window=32)
    ids = Tokenizer.from_folder(ckpt).backend.encode(text).ids
    windows = quality.make_windows(ids, 33)
    p_model, q_model = (load_model(p, dtype="float32") for p in (ckpt, q4))
    kls = []
    for w in windows:
        x = mx.array([w[:-1]])
        p = np.array(nn.log_softmax(p_model(x)[0], axis=-1))
        q = np.array(nn.log_softmax(q_model(x)[0], axis=-1))
        kls.append(float((np.exp(p) * (p - q)).sum(-1).mean()))
    assert got.windows == len(windows) == len(got.per_window)
    assert np.allclose([w[0] for w in got.per_window], kls, rtol=1e-4, atol=1e-7)
    assert got.text == "custom"


def test_paired_difference_tells_four_bits_from_eight(ckpt, q4, tmp_path):
    q8 = convert(ckpt, tmp_path / "q8", bits=8).path
    m4, m8 = (quality.compare(ckpt, p, windows=WINDOWS) for p in (q4, q8))
    diff, se = quality.paired_difference(m8, m4)
    assert m4.kl > 10 * m8.kl > 0
    assert diff > 5 * se > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_mlx_own(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits)) * 0.02
    packed, scales, biases = mx.quantize(w, 64, bits)
    codes = mx.dequantize(packed, mx.ones_like(scales), mx.zeros_like(biases), 64, bits)
    assert np.array_equal(recipe.pack(np.array(codes.astype(mx.uint8)), bits), np.array(packed))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_refit_rounding_errs_less_than_min_max_where_it_is_weighted(bits):
    w = (mx.random.normal((64, 256), key=mx.random.key(0)) * 0.02).astype(mx.bfloat16)
    importance = mx.random.uniform(shape=(256,), key=mx.random.key(1)) ** 4
    packed, s, b = mx.quantize(w.astype(mx.float32), 64, bits)
    s, b = (x.astype(mx.bfloat16).astype(mx.float32) for x in (s, b))
    plain = mx.dequantize(packed, s, b, 64, bits)
    packed, s, b = recipe.quantize(w, 64, bits, importance, mx.bfloat16)
    ours = mx.dequantize(packed, s.astype(mx.float32), b.astype(mx.float32), 64, bits)

    def err(d):
        return (importance * (d.astype(mx.float32) - w.astype(mx.float32)) ** 2).sum().item()

    assert err(ours) < 0.9 * err(plain)


def test_convert_measure_writes_figures_the_reproduce_command_matches(ckpt, tmp_path):
    out = tmp_path / "q4"
    args = ["convert", str(ckpt), "-o", str(out), "--measure", "--measure-windows", str(WINDOWS)]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert "measured: KL " in r.stderr
    card = (out / "README.md").read_text()
    saved = json.loads((out / quality.QUALITY_FILE).read_text())
    [command] = re.findall(r"^smollm3-mlx (compare-models .+)$", card, re.MULTILINE)
    assert command == f"compare-models {ckpt} {out} --windows {WINDOWS}"
    again = CliRunner().invoke(cli.app, [*command.split(), "--json"])
    assert again.exit_code == 0, again.output
    fresh = json.loads(again.stdout)
    for key in ("kl", "kl_se", "top1", "nll_source", "nll_quantized", "per_window"):
        assert fresh[key] == saved[key], key
    row = f"| mean KL to the source | {fresh['kl']:.5f} ± {fresh['kl_se']:.5f} nats per token |"
    assert row in card
    assert f"| top-1 agreement | {fresh['top1']:.2%} ± {fresh['top1_se']:.2%} |" in card
    assert f"a sample of {WINDOWS} of {fresh['of_windows']} windows" in card


def test_measured_recipe_meets_its_target_and_runs_in_mlx_lm_with_the_same_logits(ckpt, tmp_path):
    import mlx_lm.utils

    r = convert(ckpt, tmp_path / "m", target_bpw=5.0)
    assert r.recipe == "measured" and r.bits_per_weight <= 5.0
    config = json.loads((r.path / "config.json").read_text())["quantization"]
    per_layer = {k: v for k, v in config.items() if isinstance(v, dict)}
    assert per_layer and config["bits"] == 4 and config["group_size"] == 64
    assert len({(v["bits"], v["group_size"]) for v in per_layer.values()}) >= 2
    ids = mx.array([list(range(0, 500, 7))])
    ours = load_model(r.path, dtype="float32")
    theirs, _ = mlx_lm.utils.load_model(r.path)
    theirs.set_dtype(mx.float32)
    assert np.abs(np.array(ours(ids)) - np.array(theirs(ids))).max() <= 1e-4
    assert "measured, for 5 bits per weight" in (r.path / "README.md").read_text()


def test_a_target_below_the_smallest_recipe_is_one_line(ckpt, tmp_path):
    r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(tmp_path / "x"),
                                     "--target-bpw", "2"])  # fmt: skip
    assert r.exit_code == 1
    assert r.stderr.startswith("error: target bits per weight must be from 3.5 to 8.5")


def test_compare_models_refuses_a_folder_without_a_model_in_one_line(ckpt, tmp_path):
    r = CliRunner().invoke(cli.app, ["compare-models", str(ckpt), str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_bits_go_where_the_estimate_says_they_buy_the_most():
    costs = {
        "sensitive": {(3, 64): 10.0, (4, 64): 2.0, (8, 64): 0.1},
        "robust": {(3, 64): 1.0, (4, 64): 0.9, (8, 64): 0.8},
    }
    sizes = {"sensitive": 100, "robust": 100}
    choice = recipe._allocate(costs, sizes, budget=800)
    assert choice == {"sensitive": (4, 64), "robust": (3, 64)}
    assert recipe._allocate(costs, sizes, budget=1300)["sensitive"] == (8, 64)
    with pytest.raises(ValueError, match="below the smallest recipe"):
        recipe._allocate(costs, sizes, budget=600)
