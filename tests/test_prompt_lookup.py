"""Prompt-lookup decoding: the same tokens (greedy) or distribution (sampling), in fewer passes.

A random tiny model with a realistic init (std 0.02) falls into loops under greedy decoding, so its
drafts are really accepted; the default tiny model (std 0.2) does not repeat itself.
"""

import time

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference

from smollm3_mlx.cache import KVCache
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load, load_model
from smollm3_mlx.lookup import lookup_generate_step
from smollm3_mlx.sample import make_logits_processors, make_sampler
from smollm3_mlx.step import LookupStats, generate_step

IDS = np.random.default_rng(1).integers(0, 512, 40).tolist()
# The n-gram (360, 360, 360) is followed by 360 then 7: drafts that are confirmed, then rejected.
TRAP = IDS[:20] + [360] * 4 + [7, 8, 9, 10] + IDS[20:]


@pytest.fixture(scope="module")
def looping(tmp_path_factory):
    # head_dim 32, the smallest MLX quantizes, so the quantized cache can be tested too.
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("loop"), hidden_size=128, initializer_range=0.02
    )
    return load_model(path)


@pytest.fixture(scope="module")
def chaotic(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("chaotic")))


def run(model, prompt, max_tokens=80, **kwargs):
    stats = LookupStats()
    step = lookup_generate_step if "prompt_lookup" in kwargs else generate_step
    steps = step(mx.array(prompt), model, max_tokens=max_tokens, lookup_stats=stats, **kwargs)
    return [t for t, _ in steps], stats


def ban_last_token(tokens, logits):
    """A processor that depends on the exact history: the previous token may not repeat."""
    logits[:, tokens[-1]] = -mx.inf
    return logits


CASES = {
    "growing cache": {},
    "rotating cache": dict(max_kv_size=64, keep=4),
    "4-bit cache": dict(kv_bits=4, kv_group_size=32),
    "8-bit cache from token 50": dict(kv_bits=8, kv_group_size=32, quantized_kv_start=50),
    "repetition penalty": dict(logits_processors=make_logits_processors(1.1)),
    "history-sensitive processor": dict(logits_processors=[ban_last_token]),
    "top-k 1 sampler": dict(sampler=make_sampler(temperature=1.0, top_k=1)),
    "temperature 0": dict(sampler=make_sampler(temperature=0.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_output_is_identical_and_drafts_are_accepted(looping, case):
    plain, plain_stats = run(looping, TRAP, **CASES[case])
    fast, stats = run(looping, TRAP, prompt_lookup=4, **CASES[case])
    assert fast == plain
    assert plain_stats.drafted == 0 and plain_stats.passes == 80
    assert stats.accepted > 0
    # Each accepted token saves a forward pass (the last pass may sample one token too many).
    assert stats.passes + stats.accepted in (80, 81)


def test_rejected_drafts_are_trimmed_from_the_cache(looping):
    cache, plain_cache = looping.make_cache(), looping.make_cache()
    fast, stats = run(looping, TRAP, prompt_lookup=4, prompt_cache=cache)
    plain, _ = run(looping, TRAP, prompt_cache=plain_cache)
    assert fast == plain
    assert stats.drafted > stats.accepted > 0
    # Without lookup the last token is not run through the model; with it, it may have been.
    assert cache[0].offset - plain_cache[0].offset in (0, 1)
    n = plain_cache[0].offset
    for a, b in zip(cache, plain_cache, strict=True):
        assert np.abs(np.array(a.state[0][..., :n, :]) - np.array(b.state[0])).max() <= 1e-4


def test_rotating_cache_wraps_the_same_way(looping):
    cache, plain_cache = looping.make_cache(64, 4), looping.make_cache(64, 4)
    fast, stats = run(looping, TRAP, max_tokens=120, prompt_lookup=6, prompt_cache=cache)
    plain, _ = run(looping, TRAP, max_tokens=120, prompt_cache=plain_cache)
    assert fast == plain and stats.accepted > 0
    assert cache[0].dropped == plain_cache[0].dropped > 0


def test_quantized_cache_switches_at_the_same_token(looping):
    # A draft must not carry the cache past quantize_after earlier than one-by-one steps would:
    # the tokens before the switch are then attended dense, and their keys come out the same.
    caches = [looping.make_cache(bits=4, group_size=32, quantize_after=52) for _ in range(2)]
    fast, stats = run(looping, TRAP, max_tokens=30, prompt_lookup=4, prompt_cache=caches[0])
    plain, _ = run(looping, TRAP, max_tokens=30, prompt_cache=caches[1])
    assert fast == plain and stats.accepted > 0
    n = caches[1][0].offset
    for a, b in zip(*caches, strict=True):
        keys = [mx.dequantize(*c.keys, group_size=32, bits=4)[..., :n, :] for c in (a, b)]
        assert mx.abs(keys[0] - keys[1]).max().item() <= 1e-3


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_exactly_max_tokens_are_generated(looping, max_tokens):
    fast, _ = run(looping, TRAP, max_tokens=max_tokens, prompt_lookup=8)
    assert fast == run(looping, TRAP, max_tokens=max_tokens)[0]
    assert len(fast) == max_tokens


def test_non_repetitive_output_runs_no_verify_pass(chaotic):
    plain, _ = run(chaotic, IDS)
    fast, stats = run(chaotic, IDS, prompt_lookup=4)
    assert fast == plain
    assert len(set(plain)) > 60  # the output does not repeat itself...
    assert stats.drafted == 0 and stats.passes == 80  # ...so nothing was drafted


class SlowPasses:
    """The model, with passes over several tokens made to cost more than that many steps."""

    def __init__(self, model):
        self.model = model

    def __call__(self, inputs, cache):
        L = inputs.shape[1]
        out = self.model(inputs, cache=cache)
        mx.eval(out)
        time.sleep(0.005 if L == 1 else 0.05 * L)
        return out

    def make_cache(self, *args, **kwargs):
        return self.model.make_cache(*args, **kwargs)


def test_drafting_pauses_where_verify_passes_do_not_pay(looping):
    # As on a CPU whose quantized matmul costs as much per token over many tokens as over one.
    fast, stats = run(looping, TRAP, prompt_lookup=4)
    slow, slow_stats = run(SlowPasses(looping), TRAP, prompt_lookup=4)
    assert slow == fast
    assert stats.verified >= 15  # every draft checked...
    # ...but here two passes that could not pay even if fully accepted pause it for 256 tokens.
    assert 0 < slow_stats.verified <= 3


def test_negative_settings_are_refused(looping):
    with pytest.raises(ValueError, match="prompt_lookup"):
        run(looping, IDS, prompt_lookup=-1)


class MarkovModel:
    """A model whose next token depends on the last one only, through a fixed table."""

    def __init__(self, table: np.ndarray):
        self.logits = mx.log(mx.array(table, dtype=mx.float32))

    def __call__(self, inputs: mx.array, cache) -> mx.array:
        B, L = inputs.shape
        for c in cache:  # keeps the cache's offset honest, so that trimming is exercised
            c.prepare(L)
            c.update_and_fetch(mx.zeros((B, 1, L, 1)), mx.zeros((B, 1, L, 1)))
        return self.logits[inputs]

    def make_cache(self, *args, **kwargs):
        return [KVCache()]


def test_sampling_keeps_the_distribution():
    # Three tokens; each goes on to the next with p=0.6, repeats with 0.25, skips with 0.15. The
    # prompt is the cycle, so drafts follow it and are accepted 60% of the time.
    table = np.array([[0.25, 0.6, 0.15], [0.15, 0.25, 0.6], [0.6, 0.15, 0.25]])
    model, prompt, runs, length = MarkovModel(table), [0, 1, 2, 0, 1, 2, 0], 1000, 6
    sampler = make_sampler(temperature=1.0)
    mx.random.seed(0)
    stats = LookupStats()
    samples = np.array(
        [
            [t for t, _ in lookup_generate_step(mx.array(prompt), model, max_tokens=length,
                                          sampler=sampler, prompt_lookup=4, lookup_stats=stats)]
            for _ in range(runs)
        ]
    )  # fmt: skip
    assert stats.accepted > runs // 4  # drafts were really verified and accepted
    p = np.eye(3)[prompt[-1]]
    for k in range(length):  # each position's marginal matches the chain's
        p = p @ table
        freq = np.bincount(samples[:, k], minlength=3) / runs
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / runs)), (k, freq, p)
    # Every transition keeps the table's odds (accepting a draft too eagerly would inflate 0.6).
    steps = (samples[:, 1:] - samples[:, :-1]) % 3
    forward = np.mean(steps == 1)
    assert abs(forward - 0.6) <= 5 * np.sqrt(0.24 / steps.size)


@requires_reference
def test_stream_generate_reports_accepted_drafts(tmp_path):
    path = make_tiny_checkpoint(
        tmp_path, with_tokenizer=True, hidden_size=128, initializer_range=0.02
    )
    model, tokenizer = load(path)
    prompt = "Repeat after me: the cat sat on the mat. the cat sat on the mat."
    kwargs = dict(max_tokens=24, sampler=make_sampler(), logits_processors=[])
    plain = list(stream_generate(model, tokenizer, prompt, **kwargs))
    fast = list(stream_generate(model, tokenizer, prompt, prompt_lookup=4, **kwargs))
    assert [r.token for r in fast] == [r.token for r in plain]
    assert "".join(r.text for r in fast) == "".join(r.text for r in plain)
    assert plain[-1].lookup.accepted == 0 and fast[-1].lookup.accepted > 0
    assert fast[-1].lookup.passes < plain[-1].lookup.passes
