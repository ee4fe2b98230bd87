"""Long context: YaRN through max_context, the rotating cache, the quantized cache."""

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import hf_logits, make_tiny_checkpoint

from smollm3_mlx.cache import KVCache
from smollm3_mlx.generate import generate_step, stream_generate
from smollm3_mlx.loading import ModelLoadError, load_model
from smollm3_mlx.rope import RoPE

RNG = np.random.default_rng(3)
IDS = RNG.integers(0, 512, 80).tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # head_dim 32, the smallest MLX quantizes (group size 32); a realistic init (std 0.02), so
    # that the tiny net does not amplify quantization error chaotically.
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("lc"),
        max_position_embeddings=32,
        hidden_size=128,
        initializer_range=0.02,
    )


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


def test_max_context_switches_on_yarn_matching_transformers(tmp_path):
    # The same weights saved with YaRN (factor 2 over a 32-token window) by transformers.
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    plain = make_tiny_checkpoint(tmp_path / "plain", max_position_embeddings=32)
    ref_path = make_tiny_checkpoint(
        tmp_path / "yarn", max_position_embeddings=64, rope_scaling=yarn
    )
    ours = load_model(plain, max_context=64)
    assert ours.args.rope_scaling == yarn and ours.max_context == 64
    got = np.array(ours(mx.array([IDS[:64]]))[0])
    ref = hf_logits(ref_path, IDS[:64])
    assert np.abs(got - ref)[32:].max() <= 1e-4


def test_max_context_within_the_trained_window_leaves_rope_alone(ckpt):
    model = load_model(ckpt, max_context=20)
    assert model.args.rope_scaling is None and model.max_context == 20
    assert load_model(ckpt).max_context == 32


def test_max_context_past_what_the_model_supports_is_an_error(ckpt):
    with pytest.raises(ModelLoadError, match=r"max_context 65 is outside .*\(1 to 64\)"):
        load_model(ckpt, max_context=65)


def test_a_config_with_yarn_is_honoured_as_is(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    path = make_tiny_checkpoint(tmp_path / "y", max_position_embeddings=64, rope_scaling=yarn)
    model = load_model(path, max_context=50)
    assert model.args.rope_scaling == yarn and model.max_context == 50


class _FakeTokenizer:
    eos_token_ids = frozenset()


def test_prompt_longer_than_the_context_is_an_error(model):
    with pytest.raises(ValueError, match="needs 40 tokens of context, more than the 32"):
        next(stream_generate(model, _FakeTokenizer(), IDS[:40], max_tokens=1))


def layer0_keys(model, ids):
    """Keys of layer 0 computed afresh for `ids` at positions 0..len-1."""
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    return np.array(cache[0].state[0])


def test_rotating_cache_drops_in_chunks_and_keeps_the_prefix(model):
    window, keep = 24, 6
    cache = model.make_cache(window, keep)
    fed = []
    prefix_keys = None
    for t in IDS:
        model(mx.array([[t]]), cache=cache)
        fed.append(t)
        c = cache[0]
        assert c.offset <= window
        if prefix_keys is None and c.offset >= keep:
            prefix_keys = np.array(c.state[0][..., :keep, :])
        if prefix_keys is not None:
            assert np.array_equal(np.array(c.state[0][..., :keep, :]), prefix_keys)
    assert cache[0].dropped > 0 and cache[0].dropped % cache[0].chunk == 0
    # After the shifts, the cached keys equal keys computed afresh at their new positions.
    survivors = fed[:keep] + fed[keep + cache[0].dropped :]
    assert np.abs(np.array(cache[0].state[0]) - layer0_keys(model, survivors)).max() <= 1e-5


def test_rotating_cache_never_applies_a_position_past_the_window(model, monkeypatch):
    seen = []
    call = RoPE.__call__

    def spy(self, x, offset=0):
        seen.append(int(offset) + x.shape[2] - 1)
        return call(self, x, offset)

    monkeypatch.setattr(RoPE, "__call__", spy)
    window = 16
    tokens = list(
        generate_step(mx.array(IDS[:10]), model, max_tokens=20 * window, max_kv_size=window, keep=4)
    )
    assert len(tokens) == 20 * window  # a chat of 20 windows
    assert max(seen) < window


def test_rotating_cache_memory_stays_flat_over_twenty_windows(model):
    window = 32
    cache = model.make_cache(window, 4)
    sizes, peaks = [], []
    mx.reset_peak_memory()
    for i, _ in enumerate(
        generate_step(mx.array(IDS[:8]), model, max_tokens=20 * window, prompt_cache=cache)
    ):
        sizes.append(sum(c.nbytes for c in cache))
        if i % window == 0:  # the peak of each window-long stretch of the chat
            peaks.append(mx.get_peak_memory())
            mx.reset_peak_memory()
    assert max(sizes) <= window * sizes[0] / 9  # bounded by the window (8 tokens at step 0)
    assert max(peaks[3:]) <= 1.05 * min(peaks[3:])  # flat once the window is full


def test_rotating_cache_can_be_trimmed_after_wrapping(model):
    window = 20
    cache = model.make_cache(window, 4)
    for t in IDS[:50]:
        model(mx.array([[t]]), cache=cache)
    assert cache[0].dropped > 0
    before = np.array(model(mx.array([IDS[50:53]]), cache=cache)[0])
    for c in cache:
        c.trim(3)
    again = np.array(model(mx.array([IDS[50:53]]), cache=cache)[0])
    assert np.abs(before - again).max() <= 1e-5


def test_prompt_longer_than_the_window_prefills_in_chunks(model):
    tokens = [
        t for t, _ in generate_step(mx.array(IDS), model, max_tokens=4, max_kv_size=24, keep=4)
    ]
    assert len(tokens) == 4


def test_window_must_exceed_the_kept_prefix():
    with pytest.raises(ValueError, match="must be larger than the kept prefix"):
        KVCache(max_size=8, keep=8)


def decode_logits(model, cache, ids=IDS[:60], prompt=20):
    out = [np.array(model(mx.array([ids[:prompt]]), cache=cache)[0])]
    out += [np.array(model(mx.array([[t]]), cache=cache)[0]) for t in ids[prompt:]]
    return np.concatenate(out)


# Measured relative max error of the logits against a dense cache of the same kind, over the
# positions after the rotating cache's first shift: 8-bit 0.4%, 4-bit 7% (plain and rotating alike).
@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.12)])
@pytest.mark.parametrize("window", [None, 32])
def test_quantized_cache_stays_close_to_full_precision(model, bits, bound, window):
    dense_cache = model.make_cache(window, 4)
    dense = decode_logits(model, dense_cache)[33:]
    quant_cache = model.make_cache(window, 4, bits=bits, group_size=32)
    quant = decode_logits(model, quant_cache)[33:]
    assert quant_cache[0].quantized and quant_cache[0].keys[0].dtype == mx.uint32
    assert quant_cache[0].dropped == dense_cache[0].dropped == (30 if window else 0)
    err = np.abs(quant - dense).max() / np.abs(dense).max()
    assert 0 < err <= bound


def test_quantized_cache_starts_past_its_threshold(model):
    dense = decode_logits(model, model.make_cache())
    cache = model.make_cache(bits=8, group_size=32, quantize_after=40)
    got = decode_logits(model, cache)
    assert np.abs(got[:20] - dense[:20]).max() <= 1e-6  # the prompt ran before the threshold
    assert cache[0].quantized


def test_quantized_cache_uses_less_memory(model):
    sizes = {}
    for bits in (None, 8, 4):
        cache = model.make_cache(bits=bits, group_size=32)
        model(mx.array([IDS]), cache=cache)
        sizes[bits] = cache[0].nbytes
    assert sizes[4] < sizes[8] < sizes[None]
