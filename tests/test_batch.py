"""Continuous batching: a request's tokens do not depend on what else runs.

On MLX's CPU backend a matmul computes each row the same at any batch size, and a batch row's
attention reads only its own cache, so the logits are compared bit for bit (and, for the record,
bounded: 0 here; a GPU kernel may sum in another order at another batch size).
"""

import threading

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint

from smollm3_mlx.batch import BatchGenerator, batch_generate, stream_batch
from smollm3_mlx.batch_cache import BatchCache, BatchLayer
from smollm3_mlx.cache import KVCache, KVSettings, PromptCache
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load
from smollm3_mlx.memory import estimate, estimate_memory, largest_batch
from smollm3_mlx.model import ModelArgs
from smollm3_mlx.sample import Sampling, make_sampler

RNG = np.random.default_rng(11)
PROMPTS = [RNG.integers(0, 512, n).tolist() for n in (1, 3, 9, 17, 30, 5, 41, 12)]
GREEDY = Sampling(temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    # head_dim 32, the smallest MLX quantizes, so that quantized rows can be made
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("batch"), num_attention_heads=2)
    return load(path)


def alone(model, tokenizer, prompt, **kwargs):
    """Tokens and per-token logprobs of `prompt` run by itself through stream_generate."""
    out = list(stream_generate(model, tokenizer, prompt, **kwargs))
    return (
        [r.token for r in out if r.finish_reason is None],
        [np.array(r.logprobs) for r in out if r.finish_reason is None],
        out[-1],
    )


def batched(model, tokenizer, requests, *, max_batch=8, **shared):
    tokens = [[] for _ in requests]
    logprobs = [[] for _ in requests]
    last = [None] * len(requests)
    for i, r in stream_batch(model, tokenizer, requests, max_batch=max_batch, **shared):
        if r.finish_reason is None:
            tokens[i].append(r.token)
            logprobs[i].append(np.array(r.logprobs))
        else:
            last[i] = r
    return tokens, logprobs, last


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_greedy_rows_are_token_for_token_what_they_are_alone(loaded, size):
    model, tokenizer = loaded
    prompts = PROMPTS[:size]
    lengths = [7 + 3 * i for i in range(size)]  # rows end at different steps
    requests = [{"prompt": p, "max_tokens": n} for p, n in zip(prompts, lengths, strict=True)]
    tokens, logprobs, last = batched(model, tokenizer, requests, sampling=GREEDY)
    for p, n, toks, lps, end in zip(prompts, lengths, tokens, logprobs, last, strict=True):
        want, want_lps, want_end = alone(model, tokenizer, p, max_tokens=n, sampling=GREEDY)
        assert toks == want
        diff = max(float(np.abs(a - b).max()) for a, b in zip(lps, want_lps, strict=True))
        assert diff == 0.0  # CPU: bit-identical (see the module docstring)
        assert end.finish_reason == want_end.finish_reason
        assert end.generation_tokens == want_end.generation_tokens
        assert end.prompt_tokens == len(p) and end.text == want_end.text
        assert end.prefill_tokens == want_end.prefill_tokens == len(p)


def test_a_seeded_sampled_row_draws_what_it_draws_alone(loaded):
    model, tokenizer = loaded
    hot = Sampling(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=1234)
    others = [
        {"prompt": p, "max_tokens": 9, "sampling": hot.updated(seed=i)}
        for i, p in enumerate(PROMPTS[1:5])
    ]
    want, _, _ = alone(model, tokenizer, PROMPTS[5], max_tokens=12, sampling=hot)
    mx.random.seed(999)  # the global generator plays no part in a row's draws
    tokens, _, _ = batched(
        model, tokenizer, [*others, {"prompt": PROMPTS[5], "max_tokens": 12, "sampling": hot}]
    )
    assert tokens[-1] == want
    assert len(set(map(tuple, tokens))) > 1  # the rows did draw differently


def test_a_keyed_sampler_draws_what_the_seeded_global_generator_draws():
    logprobs = mx.log(mx.softmax(mx.random.normal((1, 64), key=mx.random.key(3)), axis=-1))
    mx.random.seed(77)
    shared = make_sampler(0.8, 0.95, 10)
    want = [shared(logprobs).item() for _ in range(16)]
    own = make_sampler(0.8, 0.95, 10, seed=77)
    mx.random.seed(5)
    assert [own(logprobs).item() for _ in range(16)] == want


def test_a_row_joining_a_running_batch_stalls_no_stream_for_more_than_one_chunk(loaded):
    model, tokenizer = loaded
    eos = mx.array(sorted(tokenizer.eos_token_ids))
    no_end = [lambda tokens, logits: logits.at[:, eos].add(-mx.inf)]  # the rows run on
    options = dict(sampling=GREEDY, logits_processors=no_end)
    gen = BatchGenerator(model, tokenizer, prefill_step_size=4)
    first = gen.insert(PROMPTS[2], max_tokens=30, **options)
    got = {first: [r.token for _, r in gen.step() + gen.step()]}
    assert len(got[first]) == 1  # 9 ids: two chunks of 4, the second step's decode feeds the 9th
    late = gen.insert(PROMPTS[6], max_tokens=10, **options)  # 41 ids: 10 chunks of 4
    got[late] = []
    while len(gen):
        running = any(r.uid == first for r in gen.decoding)
        chunks = len(gen.prefilling)
        out = gen.step()
        assert chunks <= 1 and (not running or any(u == first for u, _ in out))
        for uid, r in out:
            if r.finish_reason is None:
                got[uid].append(r.token)
    assert got[first] == alone(model, tokenizer, PROMPTS[2], max_tokens=30, **options)[0]
    assert got[late] == alone(model, tokenizer, PROMPTS[6], max_tokens=10, **options)[0]


def test_rotating_and_quantized_rows_batch_as_they_run_alone(loaded):
    model, tokenizer = loaded
    kinds = [
        dict(window=24, keep=4),
        dict(kv=KVSettings(bits=8, group_size=32, start=8)),
        dict(kv=KVSettings(bits=4, group_size=32)),
        {},
    ]
    prompts = [PROMPTS[4], PROMPTS[3], PROMPTS[2], PROMPTS[6]]
    requests = [
        {"prompt": p, "max_tokens": 20, "prompt_cache": PromptCache.new(model, **k)}
        for p, k in zip(prompts, kinds, strict=True)
    ]
    tokens, logprobs, _ = batched(model, tokenizer, requests, sampling=GREEDY)
    for p, k, toks, lps, req in zip(prompts, kinds, tokens, logprobs, requests, strict=True):
        pc = PromptCache.new(model, **k)
        want, want_lps, _ = alone(
            model, tokenizer, p, max_tokens=20, sampling=GREEDY, prompt_cache=pc
        )
        assert toks == want
        assert all(np.array_equal(a, b) for a, b in zip(lps, want_lps, strict=True))
        assert req["prompt_cache"].ids == pc.ids and req["prompt_cache"].offset == pc.offset


def test_a_follow_up_on_a_finished_rows_cache_stays_warm_as_alone(loaded):
    model, tokenizer = loaded
    eos = next(iter(tokenizer.eos_token_ids))
    # The first turn ends with the end-of-turn id (forced), as a chat turn does.
    force = [lambda tokens, logits: mx.where(mx.arange(logits.shape[-1]) == eos, logits, -mx.inf)]
    caches = {"alone": PromptCache.new(model), "batched": PromptCache.new(model)}
    first = list(
        stream_generate(
            model,
            tokenizer,
            PROMPTS[4],
            max_tokens=5,
            sampling=GREEDY,
            logits_processors=force,
            prompt_cache=caches["alone"],
        )
    )
    requests = [{"prompt": PROMPTS[4], "prompt_cache": caches["batched"]}, PROMPTS[1]]
    _, _, last = batched(
        model, tokenizer, requests, sampling=GREEDY, max_tokens=5, logits_processors=force
    )
    assert last[0].finish_reason == first[-1].finish_reason == "stop"
    assert caches["batched"].ids == caches["alone"].ids == PROMPTS[4] + [eos]
    assert caches["batched"].offset == caches["alone"].offset == len(PROMPTS[4]) + 1
    follow = PROMPTS[4] + [eos] + PROMPTS[3]
    want = alone(
        model, tokenizer, follow, max_tokens=6, sampling=GREEDY, prompt_cache=caches["alone"]
    )
    requests = [PROMPTS[0], {"prompt": follow, "prompt_cache": caches["batched"]}]
    tokens, _, last = batched(model, tokenizer, requests, sampling=GREEDY, max_tokens=6)
    assert last[1].cached_tokens == want[2].cached_tokens == len(PROMPTS[4]) + 1
    assert tokens[1] == want[0]


def test_a_cancelled_row_leaves_at_once_and_the_others_go_on(loaded):
    model, tokenizer = loaded
    cancel = threading.Event()
    gen = BatchGenerator(model, tokenizer)
    keep = gen.insert(PROMPTS[3], max_tokens=12, sampling=GREEDY)
    gone = gen.insert(PROMPTS[2], max_tokens=50, sampling=GREEDY, cancel=cancel)
    got = {keep: [], gone: []}
    ends = {}
    while len(gen):
        for uid, r in gen.step():
            if r.finish_reason is None:
                got[uid].append(r.token)
                if uid == gone and len(got[gone]) == 3:
                    cancel.set()
            else:
                ends[uid] = r.finish_reason
    assert ends == {keep: "length", gone: "cancelled"} and len(got[gone]) == 3
    assert got[keep] == alone(model, tokenizer, PROMPTS[3], max_tokens=12, sampling=GREEDY)[0]


def test_rows_beyond_max_batch_wait_and_run_as_rows_leave(loaded):
    model, tokenizer = loaded
    texts = batch_generate(model, tokenizer, PROMPTS, max_batch=3, max_tokens=6, sampling=GREEDY)
    for p, text in zip(PROMPTS, texts, strict=True):
        assert text == "".join(
            r.text for r in stream_generate(model, tokenizer, p, max_tokens=6, sampling=GREEDY)
        )


def test_stop_strings_end_a_row_and_cut_its_text_as_alone(loaded):
    model, tokenizer = loaded
    full = "".join(
        r.text
        for r in stream_generate(model, tokenizer, PROMPTS[3], max_tokens=20, sampling=GREEDY)
    )
    stop = full[8:11]
    want = list(
        stream_generate(
            model, tokenizer, PROMPTS[3], max_tokens=20, sampling=GREEDY, stop_strings=[stop]
        )
    )
    texts = batch_generate(
        model,
        tokenizer,
        [PROMPTS[1], PROMPTS[3]],
        max_tokens=20,
        sampling=GREEDY,
        stop_strings=[stop],
    )
    assert texts[1] == "".join(r.text for r in want) and stop not in texts[1]


def test_batch_layer_attends_each_row_over_its_own_keys_only():
    a, b = KVCache(), KVCache()
    key = mx.random.key(0)
    ka, kb = mx.random.normal((1, 2, 5, 8), key=key), mx.random.normal((1, 2, 2, 8), key=key)
    a.update_and_fetch(ka, ka)
    b.update_and_fetch(kb, kb)
    layer = BatchLayer([a, b])
    assert layer.offset.tolist() == [5, 2]
    q = mx.random.normal((2, 4, 1, 8), key=mx.random.key(1))
    masks = layer.prepare(1)
    keys, values = layer.update_and_fetch(q[:, :2], q[:, :2])
    out = layer.attend(q, keys, values, scale=0.5, mask=masks)
    assert [k.shape[2] for k in keys] == [6, 3]
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        one = mx.fast.scaled_dot_product_attention(q[i : i + 1], k, v, scale=0.5, mask=None)
        assert mx.array_equal(out[i : i + 1], one)


def test_a_batch_cache_refuses_a_row_of_another_model(loaded):
    model, _ = loaded
    batch = BatchCache([PromptCache.new(model)])
    short = PromptCache([object()] * 2)
    with pytest.raises(ValueError, match="cannot join rows"):
        batch.add(short)
    assert batch.extract(0).layers and len(batch) == 0


def test_an_estimate_for_a_batch_counts_each_rows_kv_cache():
    args = ModelArgs(num_hidden_layers=2, vocab_size=1024)
    one = estimate(args, 10**9, context=4096, dtype=mx.float32, device="cpu")
    eight = estimate(args, 10**9, context=4096, dtype=mx.float32, device="cpu", batch=8)
    assert eight.kv_cache == 8 * one.kv_cache and eight.weights == one.weights
    assert "8 rows x 4096 tokens" in eight.rows()[1][2]
    budget = one.weights + one.activations + 5 * one.kv_cache + one.kv_cache // 2
    assert largest_batch(one, budget) == 5 and largest_batch(one, 0) == 1
    with pytest.raises(ValueError, match="batch must be at least 1"):
        estimate(args, 10**9, context=4096, batch=0)


def test_peak_memory_of_eight_rows_is_within_15_percent_of_the_estimate(tmp_path):
    context, step = 512, 256
    path = make_tiny_checkpoint(tmp_path, head_dim=64, max_position_embeddings=4096)
    est = estimate_memory(path, max_context=context, prefill_step=step, dtype="float32", batch=8)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model, tokenizer = load(path, dtype="float32", max_context=context)
    rng = np.random.default_rng(5)
    # Two chunks each, one chunk a step: the first row still decodes when the last joins.
    prompts = [rng.integers(0, 512, 400 - i).tolist() for i in range(8)]
    gen = BatchGenerator(model, tokenizer, prefill_step_size=step)
    for p in prompts:
        gen.insert(p, max_tokens=100, sampling=GREEDY, logits_processors=[])
    together = 0
    while len(gen):
        gen.step()
        together = max(together, len(gen.decoding))
    mx.synchronize()
    assert together == 8
    peak = mx.get_peak_memory() - before
    assert est.total == pytest.approx(peak, rel=0.15)


def test_a_row_whose_processor_raises_fails_alone_and_the_others_go_on(loaded):
    model, tokenizer = loaded
    calls = []

    def broken(tokens, logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the grammar broke")
        return logits

    gen = BatchGenerator(model, tokenizer)
    ok = gen.insert(PROMPTS[3], max_tokens=8, sampling=GREEDY)
    bad = gen.insert(PROMPTS[4], max_tokens=8, sampling=GREEDY, logits_processors=[broken])
    tokens, errors = [], []
    while len(gen):
        for uid, r in gen.step():
            if isinstance(r, Exception):
                errors.append((uid, str(r)))
            elif uid == ok and r.finish_reason is None:
                tokens.append(r.token)
    assert errors == [(bad, "the grammar broke")]
    assert tokens == alone(model, tokenizer, PROMPTS[3], max_tokens=8, sampling=GREEDY)[0]
