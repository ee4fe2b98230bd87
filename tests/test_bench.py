"""smollm3_mlx.bench and `smollm3-mlx bench` on a tiny 4-bit SmolLM3 (numbers sane; no timing)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import mlx.core as mx
import pytest
from checkpoints import make_tiny_checkpoint, requires_reference
from typer.testing import CliRunner

from smollm3_mlx import load
from smollm3_mlx.bench import bench, mlx_lm_runners, nbytes, random_prompt, smollm3_runner
from smollm3_mlx.cli import app as cli
from smollm3_mlx.convert import convert
from smollm3_mlx.generate import stream_generate

pytestmark = requires_reference
WIDE = {"COLUMNS": "200"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = make_tiny_checkpoint(root / "bf16", dtype="bfloat16", with_tokenizer=True)
    return convert(src, root / "q4", bits=4).path


def test_bench_times_ours_and_mlx_lm_with_sane_numbers(q4):
    model, tokenizer = load(q4)
    runners = [smollm3_runner(model, tokenizer), *mlx_lm_runners(q4, [None, mx.float32])]
    assert [(r.name, r.dtype) for r in runners] == [
        ("smollm3-mlx", "float32"),  # the CPU default
        ("mlx-lm", "bfloat16"),  # as mlx-lm runs the bf16-scaled folder
        ("mlx-lm float32", "float32"),
    ]
    results = bench(runners, prompt_tokens=20, generation_tokens=6, runs=2)
    assert [r.runtime for r in results] == ["smollm3-mlx", "mlx-lm", "mlx-lm float32"]
    for r in results:
        assert (r.prompt_tokens, r.runs) == (20, 2)
        assert r.generation_tokens == 6  # all of them: end of sequence is never chosen
        for value in (r.prefill_tps, r.decode_tps, r.time_to_first_token):
            assert 0 < value < math.inf
    # Peak memory counts the weights each runtime holds (bf16 scales are half of float32 ones).
    assert results[0].peak_memory >= nbytes(model) / 1e9
    assert results[1].peak_memory < results[2].peak_memory
    # The swaps restore each runner's own weights.
    runners[1].before()
    assert runners[1].model.model.norm.weight.dtype == mx.bfloat16


def test_ours_and_mlx_lm_in_float32_do_the_same_work(q4):
    """Same prompt, same greedy tokens: the ratio compares identical work."""
    model, tokenizer = load(q4)
    ours, theirs = smollm3_runner(model, tokenizer), mlx_lm_runners(q4, [mx.float32])[0]
    theirs.before()
    prompt = random_prompt(16, seed=3)
    tokens = [[r.token for r in runner.stream(prompt, 8)] for runner in (ours, theirs)]
    assert len(tokens[1]) == 8 and tokens[0][:8] == tokens[1]  # ours repeats the last one


def test_bench_command_prints_a_table_with_ratios(q4):
    args = ["bench", "-m", str(q4), "--prompt-tokens", "12", "--generation-tokens", "4"]
    r = CliRunner().invoke(cli.app, [*args, "--runs", "1", "--compare-mlx-lm"], env=WIDE)
    assert r.exit_code == 0, r.output
    for text in ("smollm3-mlx", "mlx-lm", "mlx-lm float32", "decode tok/s", "1.00x"):
        assert text in r.output
    assert "12-token random prompt, 4 tokens greedy, median of 1 runs" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "0"], "--runs must be at least 1, not 0"),
        (["--prompt-tokens", "100000"], "must fit in the context"),
    ],
)
def test_bench_command_bad_sizes_are_one_line_errors(q4, args, message):
    r = CliRunner().invoke(cli.app, ["bench", "-m", str(q4), *args])
    assert r.exit_code != 0
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_bench_without_compare_imports_no_mlx_lm_transformers_or_torch(q4):
    code = (
        "import sys; from typer.testing import CliRunner; from smollm3_mlx.cli import app as cli\n"
        f"r = CliRunner().invoke(cli.app, ['bench', '-m', {str(q4)!r}, '--prompt-tokens', '8',"
        " '--generation-tokens', '3', '--runs', '1'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bench_defaults_on_the_cpu_take_minutes_not_hours(q4):
    r = CliRunner().invoke(cli.app, ["bench", "-m", str(q4)], env=WIDE)
    assert r.exit_code == 0, r.output
    assert "8-token random prompt, 4 tokens greedy, median of 2 runs" in r.output


def test_bench_in_a_pipe_shows_each_run_as_it_ends_and_the_whole_table(q4):
    args = ["bench", "-m", str(q4), "--prompt-tokens", "12", "--generation-tokens", "3"]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "smollm3_mlx.cli", *args, "--runs", "2", "--compare-mlx-lm"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    runs = re.findall(r"run (\d) of 6: (.+?) prefill [\d.]+ tok/s, decode [\d.]+ tok/s", r.stderr)
    assert [int(n) for n, _ in runs] == [1, 2, 3, 4, 5, 6]
    assert [name for _, name in runs[:3]] == ["smollm3-mlx", "mlx-lm", "mlx-lm float32"]
    assert len(re.findall(r"about \d+ (s|min|h) left", r.stderr)) == 5  # none after the last
    assert "…" not in r.stdout  # an 80-column pipe used to cut `smoll…`, `float…`
    for text in ("smollm3-mlx", "mlx-lm float32", "bfloat16", "ours/this prefill", "1.00x"):
        assert text in r.stdout


def test_compare_without_mlx_lm_says_in_one_line_how_to_install_it(q4, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # `import mlx_lm` raises ImportError
    r = CliRunner().invoke(cli.app, ["bench", "-m", str(q4), "--compare-mlx-lm"], env=WIDE)
    assert r.exit_code == 1
    install = "pip install 'smollm3-mlx[compare]'"
    assert r.output.strip() == f"error: --compare-mlx-lm needs mlx-lm: {install}"


def _ends_at_once(root):
    """A tiny model whose greedy answer is end of sequence after any prompt: every embedding row
    leans far along one axis, the end-of-sequence row (tied to the head) twice as far."""
    from safetensors.numpy import load_file, save_file

    path = make_tiny_checkpoint(root / "eos", with_tokenizer=True)
    weights = load_file(path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    embed[:, 0] = 100.0
    embed[128012, 0] = 200.0  # <|im_end|>, the folder's eos_token_id
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_both_runtimes_generate_every_token_asked_for_where_the_model_would_end_at_once(
    tmp_path,
):
    path = _ends_at_once(tmp_path)
    model, tokenizer = load(path)
    runners = [smollm3_runner(model, tokenizer), *mlx_lm_runners(path)]
    *_, plain = stream_generate(model, tokenizer, random_prompt(8), max_tokens=4)
    assert plain.finish_reason == "stop"  # unmasked, greedy ends the answer at once
    results = bench(runners, prompt_tokens=8, generation_tokens=4, runs=1, warmup=False)
    assert [(r.runtime, r.generation_tokens) for r in results] == [
        ("smollm3-mlx", 4),
        ("mlx-lm", 4),
    ]
    assert all(r.decode_tps > 0 for r in results)


def test_a_longer_run_that_took_no_longer_than_the_prefill_still_has_a_decode_figure(monkeypatch):
    """Noise larger than the decode (a loaded machine, a tiny model) used to leave it out."""
    import types

    import mlx.nn as nn

    from smollm3_mlx import bench as bench_module
    from smollm3_mlx.bench import Runner

    # start, first token, end: the 1-token run takes 5 s, the 3-token run 4 s (first token at 3)
    ticks = iter([0.0, 5.0, 5.0, 0.0, 3.0, 4.0])
    monkeypatch.setattr(
        bench_module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks))
    )

    def stream(prompt, max_tokens):
        for n in range(1, max_tokens + 1):
            yield types.SimpleNamespace(generation_tokens=n)

    runner = Runner("fake", "float32", stream, nn.Linear(1, 1), sync=lambda: None)
    (result,) = bench([runner], prompt_tokens=4, generation_tokens=3, runs=1, warmup=False)
    assert result.decode_tps == 2.0  # 2 further tokens in the 1 s after the first
