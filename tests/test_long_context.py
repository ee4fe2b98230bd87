"""Long context: YaRN through max_context, the rotating cache, the quantized cache."""

import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import REFERENCE_MODEL_DIR, hf_logits, make_tiny_checkpoint, requires_reference
from trained_model import QUESTIONS, answer, trained_checkpoint
from typer.testing import CliRunner

from smollm3_mlx import Chat, Sampling, cache as cache_module, load
from smollm3_mlx.cache import KVCache
from smollm3_mlx.checkpoint import ModelLoadError, context_window
from smollm3_mlx.cli import app as cli
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load_model
from smollm3_mlx.model import ModelArgs
from smollm3_mlx.rope import RoPE
from smollm3_mlx.step import generate_step

GREEDY = Sampling(temperature=0.0, top_p=1.0)
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


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


def test_a_model_with_yarn_runs_on_a_thread_other_than_the_one_that_loaded_it(ckpt):
    # As the server's worker thread does (MLX streams are per thread; a lazy array built while
    # loading would belong to the loading thread's stream).
    model = load_model(ckpt, max_context=64)
    out: list = []

    def run():
        try:
            out.append(np.array(model(mx.array([IDS[:40]]))))
        except Exception as e:
            out.append(e)
        finally:
            mx.clear_streams()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert isinstance(out[0], np.ndarray), out[0]
    assert np.allclose(out[0], np.array(model(mx.array([IDS[:40]]))), atol=1e-5)


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
    assert load_model(path).max_context == 64  # what its YaRN reaches


@requires_reference
def test_smollm3_3b_context_defaults_to_64k_and_scales_yarn_by_n_over_65536():
    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    args = ModelArgs.from_dict(config)
    assert context_window(args, None) == (65536, None)  # YaRN off by default
    assert context_window(args, 65536) == (65536, None)
    for n, factor in [(98304, 1.5), (131072, 2.0)]:
        yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 65536}
        assert context_window(args, n) == (n, yarn)
    with pytest.raises(ModelLoadError, match=r"max_context 131073 is outside .*\(1 to 131072\)"):
        context_window(args, 131073)


class _FakeTokenizer:
    eos_token_ids = frozenset()


def test_prompt_longer_than_the_context_is_an_error(model):
    with pytest.raises(ValueError, match="needs 40 tokens of context, no room left"):
        next(stream_generate(model, _FakeTokenizer(), IDS[:40], max_tokens=1))


def layer0_keys(model, ids):
    """Keys of layer 0 computed afresh for `ids` at positions 0..len-1."""
    cache = model.make_cache()
    model(mx.array([ids]), cache=cache)
    return np.array(cache[0].state[0])


@pytest.mark.parametrize("yarn", [False, True])
def test_rotating_cache_rebases_rope_keys_in_chunks_and_keeps_the_prefix(ckpt, model, yarn):
    # With YaRN (factor 2 over the 32-token window) the cached keys also carry its attention
    # scale, which a shift must not apply a second time.
    model = load_model(ckpt, max_context=64) if yarn else model
    assert (model.layers[0].self_attn.rope.attention_factor > 1) == yarn
    assert model.args.no_rope_layers[0] == 1
    nope = model.args.no_rope_layers.index(0)
    window, keep = 24, 6
    cache = model.make_cache(window, keep)
    fed, prefix, shifts = [], None, 0
    for t in IDS:
        dropped, before = cache[0].dropped, cache[nope].state
        model(mx.array([[t]]), cache=cache)
        fed.append(t)
        n = cache[0].dropped - dropped
        assert n in (0, cache[0].chunk) and cache[0].offset <= window  # a chunk at a time
        if prefix is None and cache[0].offset >= keep:
            prefix = [np.array(c.state[0][..., :keep, :]) for c in cache]
        if prefix is not None:
            assert all(
                np.array_equal(c.state[0][..., :keep, :], p)
                for c, p in zip(cache, prefix, strict=True)
            )
        if n:
            shifts += 1
            # The cached RoPE keys equal keys computed afresh at their new positions ...
            survivors = fed[:keep] + fed[keep + cache[0].dropped :]
            assert np.abs(np.array(cache[0].state[0]) - layer0_keys(model, survivors)).max() <= 1e-5
            # ... and a NoPE layer's survivors move down unchanged.
            after, before = np.array(cache[nope].state[0]), np.array(before[0])
            assert np.array_equal(after[..., :keep, :], before[..., :keep, :])
            assert np.array_equal(after[..., keep:-1, :], before[..., keep + n :, :])
    assert shifts > 10 and cache[0].chunk == (window - keep) // 8


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
    window, keep = 32, 6
    cache = model.make_cache(window, keep)
    sizes, peaks, prefix, wraps, dropped = [], [], None, 0, 0
    mx.reset_peak_memory()
    for i, _ in enumerate(
        generate_step(mx.array(IDS[:8]), model, max_tokens=20 * window, prompt_cache=cache)
    ):
        sizes.append(sum(c.nbytes for c in cache))
        prefix = prefix or [np.array(c.state[0][..., :keep, :]) for c in cache]
        if cache[0].dropped != dropped:  # after every wrap, the kept prefix is intact
            wraps, dropped = wraps + 1, cache[0].dropped
            assert all(
                np.array_equal(c.state[0][..., :keep, :], p)
                for c, p in zip(cache, prefix, strict=True)
            )
        if i % window == 0:  # the peak of each window-long stretch of the chat
            peaks.append(mx.get_peak_memory())
            mx.reset_peak_memory()
    assert wraps > 100 and cache[0].dropped > 18 * window
    assert max(sizes) <= window * sizes[0] / 9  # bounded by the window (9 tokens at step 0)
    assert max(peaks[3:]) <= 1.05 * min(peaks[3:])  # flat once the window is full


@requires_reference
def test_a_chat_twenty_windows_long_keeps_its_system_block_in_flat_memory(trained):
    model, tokenizer = trained
    window = 112  # twice the system block: Chat keeps at most half the window
    chat = Chat(model, tokenizer, max_context=window, sampling=GREEDY, think=False)
    first = [{"role": "user", "content": QUESTIONS["math"]}]
    ids = tokenizer.apply_chat_template(first, tokenize=True, enable_thinking=False)
    system = [i for i, t in enumerate(ids) if t == tokenizer.im_start_id][1]
    total, turns, prefix, peaks = 0, 0, None, []
    while total < 20 * window:
        key = "hi" if turns % 2 else "math"
        known = len(chat.prompt_cache.ids if chat.prompt_cache else [])
        mx.reset_peak_memory()
        *_, done = chat.send(QUESTIONS[key])
        peaks.append(mx.get_peak_memory())
        assert done.answer == answer(key)  # the kept system block and recent turns suffice
        assert done.stats.cached_tokens == known  # prompt-cache reuse holds after wrapping
        cache = chat.prompt_cache.layers
        assert cache[0].keep == system and all(c.offset <= window for c in cache)
        prefix = prefix or [np.array(c.state[0][..., :system, :]) for c in cache]
        assert all(
            np.array_equal(c.state[0][..., :system, :], p)
            for c, p in zip(cache, prefix, strict=True)
        )
        total += done.stats.prefill_tokens + done.stats.generation_tokens
        turns += 1
    assert cache[0].dropped > 18 * window
    # The cache is small beside the 128256-row embedding: a growing one would add 4% here.
    assert max(peaks[2:]) <= 1.01 * min(peaks[2:])


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


def run_logprobs(model, **kwargs):
    steps = generate_step(mx.array(IDS[:20]), model, max_tokens=8, **kwargs)
    return np.stack([np.array(logprobs) for _, logprobs in steps])


def test_generate_step_quantizes_a_new_cache_as_asked(model):
    dense = run_logprobs(model)
    for bits in (8, 4):
        got = run_logprobs(model, kv_bits=bits, kv_group_size=32, max_kv_size=24, keep=4)
        cache = model.make_cache(24, 4, bits=bits, group_size=32)
        assert np.array_equal(got, run_logprobs(model, prompt_cache=cache))
        assert cache[0].quantized and not np.allclose(got, dense, atol=1e-4)
    # Dense while the cache holds at most 24 tokens (the prompt's 20, then 4 more), then 8-bit.
    late = run_logprobs(model, kv_bits=8, kv_group_size=32, quantized_kv_start=24)
    assert np.abs(late[:5] - dense[:5]).max() <= 1e-6
    assert not np.allclose(late[5:], dense[5:], atol=1e-4)


@requires_reference
def test_the_cli_quantizes_the_chat_kv_cache_as_asked(tmp_path, monkeypatch):
    # head_dim 32 (MLX quantizes groups of 32, 64 or 128) and the real tokenizer; `generate`
    # answers through a Chat, so this is the Chat API's kv_bits too.
    path = make_tiny_checkpoint(
        tmp_path / "m", num_attention_heads=2, num_hidden_layers=2, with_tokenizer=True
    )
    seen = []
    attend = cache_module._quantized_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["bits"], kwargs["group_size"]))
        return attend(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_quantized_attention", spy)
    args = ["generate", "-m", str(path), "--no-think", "--temp", "0", "--max-tokens", "3"]
    r = CliRunner().invoke(cli.app, [*args, "--kv-bits", "4", "--kv-group-size", "32", "Hi"])
    assert r.exit_code == 0, r.output
    assert seen and set(seen) == {(4, 32)}
    # --kv-start keeps the cache dense until it holds that many tokens: no quantized attention
    seen.clear()
    kv = ["--kv-bits", "4", "--kv-group-size", "32", "--kv-start", "100000"]
    r = CliRunner().invoke(cli.app, [*args, *kv, "Hi"])
    assert r.exit_code == 0, r.output
    assert seen == []
