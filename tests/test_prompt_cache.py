"""The prompt cache: per-layer caches plus the ids they stand for, reused across turns."""

import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference

from smollm3_mlx.cache import KVSettings, PromptCache
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load, load_model
from smollm3_mlx.sample import Sampling, make_sampler
from smollm3_mlx.step import generate_step

IDS = np.random.default_rng(7).integers(0, 512, 60).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # head_dim 32, the smallest MLX quantizes, so that quantized caches can be made
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("pc"), num_attention_heads=2))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("pc-tok"), with_tokenizer=True)
    return load(path)


def fill(cache: PromptCache, model, ids: list[int]) -> None:
    """Prefill `ids` past what the cache holds, as a turn would, and settle."""
    n = cache.reuse(ids)
    list(generate_step(mx.array(ids[n:]), model, max_tokens=0, prompt_cache=cache.layers))
    cache.settle(ids)


def test_reuse_keeps_the_longest_common_prefix_and_leaves_one_id_to_prefill(model):
    cache = PromptCache.new(model)
    fill(cache, model, IDS[:30])
    assert cache.offset == 30 and cache.ids == IDS[:30]
    assert cache.reuse(IDS[:30]) == 29  # the same prompt: its last id must be prefilled again
    assert cache.offset == 29 and cache.ids == IDS[:29]
    assert cache.reuse(IDS[:10] + [1, 2, 3]) == 10
    assert cache.offset == 10 and all(c.offset == 10 for c in cache.layers)
    assert cache.reuse([5]) == 0 and cache.offset == 0


def test_reuse_after_rotation_keeps_the_window_or_only_the_kept_ids(model):
    window, keep = 24, 4
    cache = PromptCache.new(model, window=window, keep=keep)
    fill(cache, model, IDS[:40])  # 16 past the window: some ids were dropped
    dropped = cache.dropped
    assert dropped > 0 and cache.ids == IDS[:40] and cache.offset == 40 - dropped
    # A prompt that extends what is cached reuses all of it, rotation and all.
    assert cache.reuse(IDS[:45]) == 40 and cache.dropped == dropped
    # A change inside the dropped span: only the kept ids can be trusted.
    changed = IDS[: keep + 1] + [511] + IDS[keep + 2 : 45]
    assert cache.reuse(changed) == keep
    assert cache.dropped == 0 and cache.offset == keep and cache.ids == IDS[:keep]
    # The layers now stand for exactly those ids: a fresh prefill gives the same logits.
    fill(cache, model, IDS[:20])
    fresh = PromptCache.new(model, window=window, keep=keep)
    fill(fresh, model, IDS[:20])
    for a, b in zip(cache.layers, fresh.layers, strict=True):
        assert np.allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-5)


def test_settle_records_what_the_layers_hold(model):
    cache = PromptCache.new(model)
    list(generate_step(mx.array(IDS[:12]), model, max_tokens=3, prompt_cache=cache.layers))
    generated_more = IDS[:12] + [1, 2, 3, 4]  # the layers lack the last ids generated
    cache.settle(generated_more)
    assert cache.ids == generated_more[: cache.offset] and cache.offset == 14


def test_copy_is_independent(model):
    cache = PromptCache.new(model, kv=KVSettings(bits=None))
    fill(cache, model, IDS[:20])
    before = [np.array(c.state[0]) for c in cache.layers]
    other = cache.copy()
    fill(other, model, IDS[:10] + IDS[30:50])  # trims, then overwrites the same positions
    assert cache.offset == 20 and cache.ids == IDS[:20] and other.ids[10:] == IDS[30:50]
    for c, b in zip(cache.layers, before, strict=True):
        assert np.array_equal(np.array(c.state[0]), b)
    assert cache.nbytes > 0 and other.nbytes > cache.nbytes


def test_room_stops_before_a_drop_or_a_quantization(model):
    cache = PromptCache.new(model, window=32, keep=4)
    fill(cache, model, IDS[:20])
    assert cache.room(100) == 12 and cache.window == 32
    quantizing = PromptCache.new(model, kv=KVSettings(bits=8, group_size=32, start=25))
    fill(quantizing, model, IDS[:20])
    assert quantizing.room(100) == 5 and quantizing.kv.bits == 8


@requires_reference
def test_stream_generate_with_a_prompt_cache_equals_one_shot(chat_model):
    model, tokenizer = chat_model
    greedy = make_sampler(0.0)
    first = tokenizer.encode("The quick brown fox")
    cache = PromptCache.new(model)
    turn = list(stream_generate(model, tokenizer, first, max_tokens=6, sampler=greedy,
                                prompt_cache=cache))  # fmt: skip
    second = first + [r.token for r in turn[:-1]] + tokenizer.encode(" jumps over")
    cached = list(stream_generate(model, tokenizer, second, max_tokens=8, sampler=greedy,
                                  prompt_cache=cache))  # fmt: skip
    fresh = list(stream_generate(model, tokenizer, second, max_tokens=8, sampler=greedy))
    assert [r.token for r in cached] == [r.token for r in fresh]
    assert cached[-1].cached_tokens > len(first) and fresh[-1].cached_tokens == 0
    assert cached[-1].prompt_tokens == fresh[-1].prompt_tokens == len(second)


@requires_reference
def test_logits_processors_see_every_id_the_cached_prefix_included(chat_model):
    model, tokenizer = chat_model
    seen = []

    def record(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    prompt = tokenizer.encode("Hello there, how are you")
    cache = PromptCache.new(model)
    list(stream_generate(model, tokenizer, prompt[:4], max_tokens=1, prompt_cache=cache))
    out = list(stream_generate(model, tokenizer, prompt, max_tokens=3, sampler=make_sampler(0.0),
                               logits_processors=[record], prompt_cache=cache))  # fmt: skip
    assert out[-1].cached_tokens == 4  # the first call left prompt[:4] in the cache
    generated = [r.token for r in out[:-1]]
    assert seen[0] == prompt  # the whole prompt, though only its tail was prefilled
    assert seen[-1] == prompt + generated[:-1]


@requires_reference
def test_a_stateful_processor_turns_prompt_lookup_off(chat_model):
    model, tokenizer = chat_model

    class Stateful:
        stateful = True

        def __call__(self, tokens, logits):
            return logits

    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"
    kwargs = dict(max_tokens=12, sampler=make_sampler(0.0), prompt_lookup=4)
    out = list(stream_generate(model, tokenizer, prompt, logits_processors=[Stateful()], **kwargs))
    assert out[-1].lookup.drafted == 0 and out[-1].lookup.passes == out[-1].generation_tokens


@requires_reference
def test_cancel_ends_with_cancelled_and_the_cache_settles(chat_model):
    model, tokenizer = chat_model
    cancel = threading.Event()
    cache = PromptCache.new(model)
    prompt = tokenizer.encode("Once upon a time")
    out = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=50, sampler=make_sampler(0.0),
                             logits_processors=[], prompt_cache=cache, cancel=cancel):  # fmt: skip
        out.append(r)
        if len(out) == 3:
            cancel.set()
    assert [r.finish_reason for r in out] == [None] * 3 + ["cancelled"]
    generated = [r.token for r in out[:3]]
    assert cache.ids == (prompt + generated)[: cache.offset]
    assert cache.offset >= len(prompt) + 2


@requires_reference
def test_a_sampling_seed_repeats_a_sampled_run(chat_model):
    model, tokenizer = chat_model

    def run(seed):
        sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=12, seed=seed)
        return [r.token for r in stream_generate(model, tokenizer, "Once", sampling=sampling)]

    assert run(1) == run(1) != run(2)
