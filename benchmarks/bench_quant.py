"""Quantization recipes side by side on the trained stand-in: how far each is from the source.

Each recipe converts the stand-in of bench_quant_standin.py (trained on the Python standard
library's source); each is then measured against the source on held-out source files it never
trained on and no recipe calibrated on: mean KL(source || quantized) per token, top-1 agreement,
perplexity change, over the same windows of 128 tokens, so that recipes compare pair by pair (the
ratio to mlx-lm's uniform 4-bit, with its standard error, in each half of the text as well).

    nice -n 10 python benchmarks/bench_quant.py [--windows N] [--only NAME ...]

mlx_lm.dynamic_quant calibrates on ~/.cache/mlx-lm/calibration_v5.txt, which it would fetch from
the internet: this writes smollm3-mlx's own calibration text there first, so that both measured
recipes fit to the same text. Outputs and results.json go to benchmarks/.cache/quant/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from bench_quant_standin import CACHE, STANDIN, held_out_text  # noqa: E402

OUT = CACHE / "quant"
MLX_CALIBRATION = Path.home() / ".cache" / "mlx-lm" / "calibration_v5.txt"
REFERENCE = "mlx-lm q4"
DYNAMIC = [
    "--low-bits", "4", "--low-group-size", "128", "--high-bits", "5", "--high-group-size", "64",
]  # fmt: skip


def _mlx_lm(bits: int):
    def build(out: Path) -> None:
        from mlx_lm.convert import convert

        convert(str(STANDIN), str(out), quantize=True, q_bits=bits, q_group_size=64)

    return build


def _ours(**kw):
    def build(out: Path) -> None:
        from smollm3_mlx.convert import convert

        convert(STANDIN, out, measure=False, **kw)

    return build


def _dynamic(target: float):
    def build(out: Path) -> None:
        from smollm3_mlx.quality import shipped_text

        MLX_CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
        MLX_CALIBRATION.write_text(shipped_text("calibration"))
        argv = ["--model", str(STANDIN), "--mlx-path", str(out), "--target-bpw", str(target)]
        cmd = [sys.executable, "-m", "mlx_lm.quant.dynamic_quant", *argv, *DYNAMIC]
        subprocess.run(cmd, check=True, cwd=OUT)

    return build


RECIPES = {
    "mlx-lm q4": ("uniform 4-bit, group 64", _mlx_lm(4)),
    "mlx-lm dynamic_quant 4.5": ("4-bit g128 / 5-bit g64 by gradient sensitivity", _dynamic(4.5)),
    "smollm3-mlx measured 4.5": ("--target-bpw 4.5", _ours(target_bpw=4.5)),
    "smollm3-mlx mixed q4": ("4-bit, embedding 8-bit (default)", _ours(bits=4)),
    "mlx-lm q8": ("uniform 8-bit, group 64", _mlx_lm(8)),
    "smollm3-mlx q8": ("uniform 8-bit, codes refit", _ours(bits=8)),
}


def bits_per_weight(folder: Path, n_params: int) -> float:
    from smollm3_mlx.checkpoint import read_safetensors_header

    total = 0
    for f in folder.glob("*.safetensors"):
        header = read_safetensors_header(f)
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    return 8 * total / n_params


def ratio(x, ref, rows=None) -> tuple[float, float]:
    """KL(x) / KL(ref) over the same windows, and its standard error (delta method, paired)."""
    rows = rows or slice(None)
    a, b = [w[0] for w in x.per_window[rows]], [w[0] for w in ref.per_window[rows]]
    r = sum(a) / sum(b)
    d = [ai - r * bi for ai, bi in zip(a, b, strict=True)]
    mean_d = sum(d) / len(d)
    se = math.sqrt(sum((v - mean_d) ** 2 for v in d) / (len(d) - 1) / len(d))
    return r, se / (sum(b) / len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    from smollm3_mlx import quality

    if not (STANDIN / "config.json").exists():
        sys.exit(f"{STANDIN} is missing: run benchmarks/bench_quant_standin.py first")
    OUT.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    config = json.loads((STANDIN / "config.json").read_text())
    n_params = _params(config)
    text = held_out_text()
    for name, (what, build) in RECIPES.items():
        if args.only and name not in args.only:
            continue
        out = OUT / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        build(out)
        seconds = time.perf_counter() - start
        q = quality.compare(STANDIN, out, text=text, windows=args.windows)
        results[name] = {
            "what": what,
            "bpw": bits_per_weight(out, n_params),
            "seconds": seconds,
            "quality": q.to_json(),
        }
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{name}: {results[name]['bpw']:.3f} bpw, {quality.summary(q)}", flush=True)
    print(table(results))


def _params(config: dict) -> int:
    from mlx.utils import tree_flatten

    from smollm3_mlx.loading import load_model

    model = load_model(STANDIN, dtype="float32", lazy=True)
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def table(results: dict) -> str:
    from smollm3_mlx.quality import Quality

    qs = {n: Quality.from_json(r["quality"]) for n, r in results.items()}
    ref = qs.get(REFERENCE)
    lines = [
        "| recipe | bits/weight | mean KL (nats/token) | KL / mlx-lm q4 | 1st half | 2nd half "
        "| top-1 | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        q = qs[name]
        n = len(q.per_window)
        cells = ["", "", ""]
        if ref is not None:
            parts = [slice(None), slice(0, n // 2), slice(n // 2, n)]
            cells = [f"{a:.3f} ± {b:.3f}" for a, b in (ratio(q, ref, p) for p in parts)]
        lines.append(
            f"| {name} ({r['what']}) | {r['bpw']:.3f} | {q.kl:.5f} ± {q.kl_se:.5f} | "
            f"{' | '.join(cells)} | {q.top1:.2%} | {q.ppl_source:.3f} -> {q.ppl_quantized:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
