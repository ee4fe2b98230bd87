"""The model card (README.md) of a converted folder: what it is, how it was made, what it cost."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from ._version import __version__


def model_card(r: Any, config: dict[str, Any], plan: Any = None) -> str:
    """The card of a ConvertResult; `plan` is the measured recipe's recipe.Plan, if any."""
    hub = not Path(r.source).expanduser().is_dir()
    at = f" at revision `{r.revision}`" if r.revision else ""
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags: [mlx, smollm3]
{f"base_model: {r.source}{chr(10)}" if hub else ""}---

# {r.path.name}

SmolLM3 ({config.get("num_hidden_layers")} layers) quantized for [MLX](https://github.com/ml-explore/mlx)
by smollm3-mlx {__version__}.

| | |
|---|---|
| source | `{r.source}`{at} |
| recipe | {_recipe_line(r, plan)} |
| quantization | affine, group size {r.group_size}{_group_note(plan)}; {_stored(r.dtype)} |
| bits per weight | {r.bits_per_weight:.3f} |
| size on disk | {r.size_bytes / 1e6:,.1f} MB |
{_quality_rows(r.quality)}
Made with:

```sh
{shlex.join(_command(r))}
```
{_reproduce(r)}
Run it with `smollm3-mlx chat -m {shlex.quote(r.upload_repo or str(r.path))}`; mlx-lm runs it too.
"""


def _command(r: Any) -> list[str]:
    cmd = ["smollm3-mlx", "convert", r.source, "-o", str(r.path)]
    if r.target_bpw is not None:
        cmd += ["--recipe", r.recipe, "--target-bpw", f"{r.target_bpw:g}"]
    else:
        cmd += ["--bits", str(r.bits), "--group-size", str(r.group_size), "--recipe", r.recipe]
    cmd += ["--dtype", r.dtype]
    cmd += ["--revision", r.revision] if r.revision else []
    cmd += ["--upload-repo", r.upload_repo] if r.upload_repo else []
    q = r.quality
    cmd += ["--measure"] if q is not None else []
    cmd += ["--measure-windows", str(q.windows)] if q is not None and q.sampled else []
    return cmd


def _recipe_line(r: Any, plan: Any) -> str:
    if plan is None:
        head = "the embedding / tied output head at 8 bits, " if r.recipe == "mixed" else ""
        return f"{r.recipe}: {head}everything else at {r.bits} bits"
    counts = ", ".join(f"{n} at {b} bits (group {g})" for (b, g), n in plan.counts().items())
    embed = plan.options.get("model.embed_tokens")
    head = f"; the embedding at {embed[0]} bits (group {embed[1]})" if embed else ""
    return (
        f"measured, for {plan.target_bpw:g} bits per weight: each matrix's bits chosen by its "
        f"sensitivity on the calibration text, activation-aware rounding: {counts}{head}"
    )


def _stored(dtype: str) -> str:
    return f"scales, biases and norms in {dtype}"


def _group_note(plan: Any) -> str:
    return " unless config.json's per-layer entries say otherwise" if plan is not None else ""


def _quality_rows(q: Any) -> str:
    if q is None:
        return ""
    sample = f", a sample of {q.windows} of {q.of_windows} windows" if q.sampled else ""
    where = f"{q.tokens} tokens of the shipped {q.text} text{sample}, windows of {q.window}"
    return f"""| measured on | {where} |
| mean KL to the source | {q.kl:.5f} ± {q.kl_se:.5f} nats per token |
| top-1 agreement | {q.top1:.2%} ± {q.top1_se:.2%} |
| perplexity | {q.ppl_source:.4f} -> {q.ppl_quantized:.4f} ({q.ppl_change:+.3%}) |
"""


def _reproduce(r: Any) -> str:
    q = r.quality
    if q is None:
        return ""
    sample = ["--windows", str(q.windows)] if q.sampled else []
    cmd = ["smollm3-mlx", "compare-models", r.source, str(r.path), *sample]
    return f"""
The figures (per window in quality.json) are measured again, on any two folders, by:

```sh
{shlex.join(cmd)}
```
"""
