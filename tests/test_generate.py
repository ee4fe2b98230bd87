"""Generation: cached decoding equals one forward pass, samplers, stop conditions, stats."""

import importlib
import inspect

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference

from smollm3_mlx.cache import KVCache, PromptCache, trim_prompt_cache
from smollm3_mlx.generate import stream_generate
from smollm3_mlx.loading import load, load_model
from smollm3_mlx.sample import make_logits_processors, make_sampler
from smollm3_mlx.step import generate_step

IDS = np.random.default_rng(1).integers(0, 512, 40).tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("gen")))


def full_logits(model, ids):
    return np.array(model(mx.array([ids]))[0])


def test_incremental_decoding_equals_one_forward_pass(model):
    cache = model.make_cache()
    steps = [np.array(model(mx.array([IDS[:5]]), cache=cache)[0])]
    for t in IDS[5:]:
        steps.append(np.array(model(mx.array([[t]]), cache=cache)[0]))
    assert np.abs(np.concatenate(steps) - full_logits(model, IDS)).max() <= 1e-4


@pytest.mark.parametrize("step", [1, 3, 7, 16])
def test_chunked_prefill_equals_one_shot(model, step):
    one_shot = PromptCache.new(model)
    last_one_shot = list(generate_step(mx.array(IDS), model, max_tokens=4, prompt_cache=one_shot))
    chunked = PromptCache.new(model)
    last_chunked = list(
        generate_step(
            mx.array(IDS), model, max_tokens=4, prompt_cache=chunked, prefill_step_size=step
        )
    )
    assert [t for t, _ in last_one_shot] == [t for t, _ in last_chunked]
    for a, b in zip(last_one_shot, last_chunked, strict=True):
        assert np.abs(np.array(a[1]) - np.array(b[1])).max() <= 1e-4
    for a, b in zip(one_shot.layers, chunked.layers, strict=True):
        assert np.abs(np.array(a.state[0]) - np.array(b.state[0])).max() <= 1e-5


def test_greedy_generation_is_argmax_of_full_forward(model):
    generated = [t for t, _ in generate_step(mx.array(IDS), model, max_tokens=8)]
    seq = list(IDS)
    for t in generated:
        assert t == int(np.argmax(full_logits(model, seq)[-1]))
        seq.append(t)


def test_generate_step_yields_exactly_max_tokens(model):
    assert len(list(generate_step(mx.array(IDS), model, max_tokens=5))) == 5
    assert list(generate_step(mx.array(IDS), model, max_tokens=0)) == []


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="empty"):
        next(generate_step(mx.array([], dtype=mx.uint32), model))


def test_trimmed_cache_resumes_like_a_fresh_one(model):
    cache = model.make_cache()
    list(generate_step(mx.array(IDS), model, max_tokens=3, prompt_cache=PromptCache(cache)))
    # The cache now holds the prompt and the generated tokens; drop back to 30 prompt tokens.
    assert trim_prompt_cache(cache, cache[0].offset - 30) > 0
    assert cache[0].offset == 30
    resumed = np.array(model(mx.array([IDS[30:]]), cache=cache)[0])
    assert np.abs(resumed - full_logits(model, IDS)[30:]).max() <= 1e-4


def test_cache_grows_past_its_step():
    cache = KVCache()
    k = mx.ones((1, 2, 300, 8))
    keys, _ = cache.update_and_fetch(k, k)
    keys, _ = cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert keys.shape[2] == 301 and cache.offset == 301 and cache.nbytes > 0


def test_samplers_respect_their_filters():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    mx.random.seed(0)
    draw = lambda s: {int(s(logprobs).item()) for _ in range(200)}  # noqa: E731
    assert draw(make_sampler(0.0)) == {0}
    assert draw(make_sampler(1.0, top_k=2)) == {0, 1}
    assert draw(make_sampler(1.0, top_p=0.7)) == {0, 1}
    assert draw(make_sampler(1.0, min_p=0.25)) == {0, 1, 2}
    assert draw(make_sampler(1.0)) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens_the_distribution():
    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    mx.random.seed(0)

    def counts(temperature):
        sampler = make_sampler(temperature)
        draws = [int(sampler(logprobs).item()) for _ in range(400)]
        return [draws.count(i) / len(draws) for i in range(4)]

    assert counts(0.1)[0] > 0.97  # p ~ 0.5**10: 99.4 % on the top token
    assert 0.4 < counts(1.0)[0] < 0.6  # the model's own 50 %
    assert counts(10.0)[3] > 0.15  # p ~ 0.05**0.1: 22 % on the least likely token


def test_repetition_penalty_lowers_seen_tokens():
    (penalty,) = make_logits_processors(repetition_penalty=2.0)
    logits = mx.array([[2.0, -2.0, 1.0]])
    out = penalty(mx.array([0, 1]), logits)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    # The real vocabulary and tokenizer around a tiny random body.
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tok"), with_tokenizer=True)
    return load(path)


@requires_reference
def test_stream_generate_text_and_stats(chat_model):
    model, tokenizer = chat_model
    prompt = "The quick brown fox"
    responses = list(
        stream_generate(model, tokenizer, prompt, max_tokens=12, sampler=make_sampler(0.0))
    )
    ids = [t for t, _ in generate_step(mx.array(tokenizer.encode(prompt)), model, max_tokens=12)]
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    text = "".join(r.text for r in responses)
    eos = next((i for i, t in enumerate(ids) if t in tokenizer.eos_token_ids), len(ids))
    assert text == tokenizer.decode(ids[:eos])
    assert last.prompt_tokens == len(tokenizer.encode(prompt))
    assert last.generation_tokens == min(eos + 1, 12)
    assert last.peak_memory > 0 and last.prompt_tps > 0 and last.time_to_first_token > 0
    assert last.generation_tps > 0 or last.generation_tokens == 1


@requires_reference
def test_stop_string_ends_generation_before_it(chat_model):
    model, tokenizer = chat_model
    greedy = make_sampler(0.0)
    full = "".join(
        r.text for r in stream_generate(model, tokenizer, "Once", max_tokens=16, sampler=greedy)
    )
    stop = full[5:8]
    assert len(stop) == 3, "the tiny model must produce some text for this test"
    responses = list(
        stream_generate(
            model, tokenizer, "Once", max_tokens=16, sampler=greedy, stop_strings=[stop]
        )
    )
    text = "".join(r.text for r in responses)
    assert text == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"


@requires_reference
def test_end_of_turn_token_stops_generation(chat_model):
    model, tokenizer = chat_model
    prompt = tokenizer.encode("Hi")
    eos = tokenizer.token_to_id("<|im_end|>")
    # Force the end-of-turn token after two steps with a sampler that picks it.
    calls = {"n": 0}

    def sampler(logprobs):
        calls["n"] += 1
        return mx.array([eos if calls["n"] >= 3 else 0])

    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=50, sampler=sampler))
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].generation_tokens == 3


@requires_reference
def test_generation_defaults_come_from_generation_config(chat_model):
    model, _ = chat_model
    cfg = model.info.sampling
    assert (cfg.temperature, cfg.top_p) == (0.6, 0.95)


def scripted(ids, pad):
    """A sampler that emits `ids` in order, then `pad` (generate_step samples one step ahead)."""
    script = iter(ids)
    return lambda logprobs: mx.array([next(script, pad)])


@requires_reference
@pytest.mark.parametrize(
    "stop, expected",
    [
        ("d, st", "Hello worl"),  # spans three tokens: held back until it resolves
        ("world, go", "Hello world, stop here please"),  # a prefix held, then released
        ("please", "Hello world, stop here "),
    ],
)
def test_stop_strings_across_token_boundaries(chat_model, stop, expected):
    model, tokenizer = chat_model
    text = "Hello world, stop here please"
    ids = tokenizer.encode(text)
    responses = list(
        stream_generate(
            model, tokenizer, "Hi", max_tokens=len(ids), sampler=scripted(ids, ids[0]),
            stop_strings=[stop],
        )
    )  # fmt: skip
    assert "".join(r.text for r in responses) == expected
    assert responses[-1].finish_reason == ("length" if expected == text else "stop")
    assert not any(stop in r.text for r in responses)


@requires_reference
def test_stream_generate_never_emits_broken_utf8(chat_model):
    model, tokenizer = chat_model
    text = "emoji 🤗🚀 Grüße 日本語 👩‍👩‍👧 ❤️"
    ids = tokenizer.encode(text)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # characters are split
    responses = list(
        stream_generate(model, tokenizer, "Hi", max_tokens=len(ids), sampler=scripted(ids, ids[0]))
    )
    assert "".join(r.text for r in responses) == text
    assert not any("\ufffd" in r.text for r in responses)
    assert any(r.text == "" for r in responses)  # held back while a character was incomplete


@requires_reference
def test_stream_generate_samples_with_the_generation_config_by_default(chat_model, monkeypatch):
    gen = importlib.import_module("smollm3_mlx.sample")
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return make_sampler(0.0)

    monkeypatch.setattr(gen, "make_sampler", recording)
    model, tokenizer = chat_model
    list(stream_generate(model, tokenizer, "Hi", max_tokens=1))
    ((args, kwargs),) = calls
    settings = inspect.signature(make_sampler).bind(*args, **kwargs)
    settings.apply_defaults()
    # SmolLM3's generation_config.json: do_sample, temperature 0.6, top_p 0.95
    assert settings.arguments == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 0,
        "min_p": 0.0,
        "seed": None,
    }  # seed None: the global generator, which stream_generate seeds itself
