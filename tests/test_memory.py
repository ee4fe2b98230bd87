"""Memory guardrails: the estimate against measured peaks, the refusal and its override, limits."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from checkpoints import REFERENCE_MODEL_DIR, make_tiny_checkpoint, requires_reference
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from smollm3_mlx import memory
from smollm3_mlx.cache import PromptCache
from smollm3_mlx.cli import app as cli
from smollm3_mlx.loading import load, load_model
from smollm3_mlx.memory import MemoryBudgetError, estimate, estimate_memory
from smollm3_mlx.model import Model, ModelArgs
from smollm3_mlx.step import generate_step

# head_dim 64, so that the KV cache can be quantized; a context long enough for attention to show.
TINY = dict(head_dim=64, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mem"), **TINY)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chat"), with_tokenizer=True)


def _measured_peak(load_it, context: int, prefill_step: int, kv_bits: int | None) -> tuple:
    """Peak bytes while loading and prefilling `context` tokens, and the cache's final bytes."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = load_it()
    cache = model.make_cache(bits=kv_bits)
    prompt = mx.arange(context, dtype=mx.uint32) % model.args.vocab_size
    for _ in generate_step(
        prompt, model, max_tokens=1, prompt_cache=PromptCache(cache), prefill_step_size=prefill_step
    ):
        pass
    mx.synchronize()
    return mx.get_peak_memory() - before, sum(c.nbytes for c in cache)


@pytest.mark.parametrize(
    "context, prefill_step, kv_bits",
    [(1024, 512, None), (1024, 512, 4), (1024, 256, 8)],
    ids=["dense", "kv4", "kv8-short-chunks"],
)
def test_estimate_is_within_15_percent_of_the_measured_peak_on_the_tiny_model(
    tiny, context, prefill_step, kv_bits
):
    est = estimate_memory(
        tiny, max_context=context, kv_bits=kv_bits, prefill_step=prefill_step, dtype="float32"
    )
    peak, cache_bytes = _measured_peak(
        lambda: load_model(tiny, dtype="float32", max_context=context),
        context, prefill_step, kv_bits,
    )  # fmt: skip
    # The context is a whole number of cache steps: what the cache holds is all it allocated.
    assert cache_bytes == est.kv_cache
    assert est.total == pytest.approx(peak, rel=0.15)


def test_estimate_is_within_15_percent_on_a_full_size_layer_stack():
    # SmolLM3-3B's real dimensions, two of its 36 layers (the first one attends and runs its MLP
    # during prefill; the last one's output is not needed until the last token) and a small
    # vocabulary; a short context: MLX's CPU matmul would take minutes at 512-token chunks.
    # benchmarks/bench_memory.py measures 512-token chunks at this size.
    args = ModelArgs(num_hidden_layers=2, vocab_size=1024)
    model = Model(args)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    est = estimate(args, weights, context=32, prefill_step=16, dtype=mx.float32, device="cpu")

    def build():
        mx.eval(model.parameters())
        return model

    peak, _ = _measured_peak(build, 32, 16, None)
    assert est.total == pytest.approx(peak, rel=0.15)


def test_weights_are_counted_as_loaded_from_the_safetensors_headers(tmp_path):
    path = make_tiny_checkpoint(tmp_path, dtype="bfloat16")
    for dtype, size in [("float32", 4), (None, 2)]:
        model = load_model(path, dtype=dtype, lazy=True)
        loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        assert estimate_memory(path, dtype=dtype).weights == loaded
        assert loaded % size == 0


def test_planned_weights_equal_what_convert_writes(tmp_path):
    from smollm3_mlx.convert import convert

    source = make_tiny_checkpoint(tmp_path / "hf", hidden_size=128, intermediate_size=256)
    out = convert(source, tmp_path / "q4", bits=4, group_size=64).path
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    planned = memory.planned_weights_bytes(ModelArgs.from_dict(_config(source)), 4)
    headers = sum(len(f.read_bytes()) - _data_bytes(f) for f in out.glob("*.safetensors"))
    assert planned == written - headers


def _config(path):
    return json.loads((path / "config.json").read_text())


def _data_bytes(f) -> int:
    from smollm3_mlx.checkpoint import read_safetensors_header

    return sum(
        t["data_offsets"][1] - t["data_offsets"][0] for t in read_safetensors_header(f).values()
    )


@requires_reference
def test_a_session_that_does_not_fit_is_refused_in_one_line_naming_the_fix(tiny_chat, monkeypatch):
    tiny = tiny_chat
    need = estimate_memory(tiny, dtype="float32").total
    monkeypatch.setattr(memory, "available_memory", lambda: (need - 1, "simulated RAM"))
    with pytest.raises(MemoryBudgetError) as e:
        load(tiny, dtype="float32")
    message = str(e.value)
    assert "\n" not in message and "simulated RAM" in message
    assert f"{need / 1e9:.1f} GB" in message and "--kv-bits 8" in message
    model, _ = load(tiny, dtype="float32", check_memory=False)  # the override
    assert model.args.num_hidden_layers == 4


def test_the_cheapest_fix_falls_back_to_a_smaller_context():
    args = ModelArgs(quantization={"group_size": 64, "bits": 4})  # SmolLM3-3B's dimensions
    est = estimate(args, 2 * 10**9, context=131072, kv_bits=4, device="gpu")
    assert memory.cheapest_fix(est, est.total - 1).startswith("--max-context ")
    context = int(memory.cheapest_fix(est, 4 * 10**9).split()[-1])
    assert 0 < context < 131072
    assert estimate(args, 2 * 10**9, context=context, kv_bits=4, device="gpu").total <= 4 * 10**9
    dense = estimate(args, 2 * 10**9, context=131072, device="gpu")
    assert memory.cheapest_fix(dense, dense.total - 1).startswith("--kv-bits 8")


@requires_reference
def test_the_cli_refuses_and_the_override_goes_on(tiny_chat, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: (1000, "simulated RAM"))
    runner = CliRunner()
    args = [
        "generate",
        "-m",
        str(tiny_chat),
        "--raw",
        "hello",
        "--max-tokens",
        "2",
        "--dtype",
        "float32",
    ]
    refused = runner.invoke(cli.app, args)
    assert refused.exit_code == 1 and "simulated RAM" in refused.output
    assert runner.invoke(cli.app, [*args, "--no-memory-check"]).exit_code == 0


@requires_reference
def test_estimate_command_prints_the_breakdown_for_the_reference_config():
    result = CliRunner().invoke(
        cli.app,
        ["estimate", "-m", str(REFERENCE_MODEL_DIR), "--bits", "4", "--max-context", "8192",
         "--dtype", "bfloat16", "--device", "gpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for part in ("weights", "KV cache", "activations", "total", "available"):
        assert part in result.output


def test_memory_limits_are_a_no_op_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    est = estimate(ModelArgs(), 10**9, context=1024, device="cpu")
    with memory.memory_limits(est):
        mx.eval(mx.ones(4) + 1)
    assert calls == []


def test_memory_limits_wire_what_the_session_needs_and_restore_on_exit(monkeypatch):
    wired, cached = [0], [7]

    def setter(box):
        def set_limit(n):
            old, box[0] = box[0], n
            return old

        return set_limit

    monkeypatch.setattr(memory, "_on_gpu", lambda: True)
    monkeypatch.setattr(
        memory, "_device_info", lambda: {"max_recommended_working_set_size": 10**10}
    )
    monkeypatch.setattr(mx, "set_wired_limit", setter(wired))
    monkeypatch.setattr(mx, "set_cache_limit", setter(cached))
    est = estimate(ModelArgs(), 2 * 10**9, context=8192, device="gpu")
    with memory.memory_limits(est):
        assert wired[0] == est.weights + est.kv_cache < 10**10
        assert cached[0] == max(est.activations, 256 * 2**20)
    assert wired == [0] and cached == [7]


def test_available_memory_reads_this_machine():
    size, source = memory.available_memory()
    assert size > 0 and source


def test_the_estimate_reads_the_prompt_in_the_chunks_generation_uses_on_the_device(tiny):
    """The CPU prefills the 3B a few tokens at a time: its estimate counts that chunk, not 512
    (a false refusal on a 24 GB machine at 128K), and generation uses the same number."""
    from smollm3_mlx.step import default_prefill_step, prefill_step_for

    args = ModelArgs()  # SmolLM3-3B's dimensions
    assert (prefill_step_for(args, gpu=False), prefill_step_for(args, gpu=True)) == (4, 512)
    cpu = estimate(args, 6 * 10**9, context=131072, dtype=mx.float32, device="cpu")
    gpu = estimate(args, 6 * 10**9, context=131072, device="gpu")
    assert (cpu.prefill_step, gpu.prefill_step) == (4, 512)
    at_512 = estimate(
        args, 6 * 10**9, context=131072, dtype=mx.float32, device="cpu", prefill_step=512
    )
    assert cpu.total < at_512.total - 4 * 10**9
    model = load_model(tiny, dtype="float32")
    assert estimate_memory(tiny, dtype="float32", device="cpu").prefill_step == (
        default_prefill_step(model) if mx.default_device().type == mx.cpu else 512
    )


@requires_reference
def test_serve_counts_kv_bits_and_takes_the_override_it_advises(tiny_chat, monkeypatch):
    import smollm3_mlx.serve.app as serve_app

    served = []
    monkeypatch.setattr(serve_app, "serve", lambda *a, **kw: served.append(kw["kv_bits"]))
    dense = estimate_memory(tiny_chat, dtype="float32").total
    kv8 = estimate_memory(tiny_chat, dtype="float32", kv_bits=8).total
    assert kv8 < dense
    monkeypatch.setattr(memory, "available_memory", lambda: (kv8, "simulated RAM"))
    runner = CliRunner()
    args = ["serve", "-m", str(tiny_chat), "--dtype", "float32"]
    refused = runner.invoke(cli.app, args)
    assert refused.exit_code == 1 and "simulated RAM" in refused.output
    assert "--kv-bits 8" in refused.output and "--no-memory-check" in refused.output
    assert served == []
    assert runner.invoke(cli.app, [*args, "--kv-bits", "8"]).exit_code == 0  # counted: it fits
    two_rows = runner.invoke(cli.app, [*args, "--kv-bits", "8", "--max-batch", "2"])
    assert two_rows.exit_code == 1 and "simulated RAM" in two_rows.output  # each row's cache
    assert runner.invoke(cli.app, [*args, "--no-memory-check"]).exit_code == 0  # the override
    assert served == [8, None]
