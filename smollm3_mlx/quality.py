"""What quantization cost: two model folders compared on the same text, window by window.

The figure that separates recipes is the mean KL divergence from the source model's next-token
distribution to the quantized one's (perplexity moves by less than its noise). Each window of
text is run from a fresh context, so windows are independent samples: standard errors come from
the spread of the per-window means, and two conversions measured on the same windows can be
compared pair by pair (`paired_difference`).

Both models run layer by layer over all windows at once, each layer's weights freed once it has
run, so memory holds one layer of each model, the embeddings and the hidden states; the output
heads then run one window at a time.

The text ships with the package (smollm3_mlx/data): SmolLM3's six languages and code, in its chat
template, thinking and answers. `calibration.txt` is what recipes may fit to; `evaluation.txt`,
never seen by a recipe, is what they are measured on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

SPLITS = ("calibration", "evaluation")
DEFAULT_WINDOW = 128  # tokens per window: each is run from a fresh context
QUALITY_FILE = "quality.json"  # written beside the weights by `convert --measure`
BATCH_TOKENS = 2048  # tokens through a layer at a time: bounds the 3B's activations (~0.3 GB)


class QualityError(ValueError):
    """Two folders that cannot be compared, or text too short; one line saying why."""


def shipped_text(split: str = "evaluation") -> str:
    """The shipped text: "calibration" (what recipes fit to) or "evaluation" (held out)."""
    if split not in SPLITS:
        raise QualityError(f"split must be one of {', '.join(SPLITS)}, not {split}")
    return resources.files("smollm3_mlx").joinpath(f"data/{split}.txt").read_text("utf-8")


def make_windows(ids: Sequence[int], window: int, count: int | None = None) -> list[list[int]]:
    """Consecutive windows of `window` tokens (a shorter tail is dropped); with `count`, that
    many of them, evenly spaced over the text (a sample, said so where it is reported)."""
    windows = [list(ids[i : i + window]) for i in range(0, len(ids) - window + 1, window)]
    if not windows:
        raise QualityError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    if count is not None and count < len(windows):
        step = len(windows) / count
        windows = [windows[int(i * step)] for i in range(count)]
    return windows


@dataclasses.dataclass(frozen=True)
class Quality:
    """How far `quantized` is from `source`, per token, over `windows` windows of text.

    kl: mean KL(source || quantized) of the next-token distributions, in nats per token.
    top1: how often both models' most likely next token agree.
    nll_source, nll_quantized: mean negative log-likelihood of the text's next tokens.
    The *_se fields are standard errors over windows; nll_delta_se is the paired one.
    per_window: (kl, top1, nll_source, nll_quantized) of each window, for paired comparisons.
    """

    source: str
    quantized: str
    text: str
    window: int
    windows: int
    of_windows: int  # in the whole text: fewer measured means a sample
    tokens: int
    kl: float
    kl_se: float
    top1: float
    top1_se: float
    nll_source: float
    nll_quantized: float
    nll_delta_se: float
    per_window: tuple[tuple[float, float, float, float], ...] = ()

    @property
    def ppl_source(self) -> float:
        return math.exp(self.nll_source)

    @property
    def ppl_quantized(self) -> float:
        return math.exp(self.nll_quantized)

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, e.g. 0.012 for +1.2%."""
        return math.exp(self.nll_quantized - self.nll_source) - 1

    @property
    def sampled(self) -> bool:
        return self.windows < self.of_windows

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_window"] = [list(w) for w in self.per_window]
        d.update(ppl_source=self.ppl_source, ppl_quantized=self.ppl_quantized)
        return {"ppl_change": self.ppl_change, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Quality:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        return cls(**{**d, "per_window": tuple(tuple(w) for w in d.get("per_window", ()))})


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: Quality, b: Quality, field: int = 0) -> tuple[float, float]:
    """Mean of (b - a) over the same windows, and its standard error: field 0 is KL, 1 top-1,
    3 the quantized NLL. Both must have measured the same text the same way."""
    if (a.text, a.window, len(a.per_window)) != (b.text, b.window, len(b.per_window)):
        raise QualityError("the two measurements are not over the same windows")
    return mean_se(
        [wb[field] - wa[field] for wa, wb in zip(a.per_window, b.per_window, strict=True)]
    )


def compare(
    source: str | Path,
    quantized: str | Path,
    *,
    split: str = "evaluation",
    text: str | None = None,
    window: int = DEFAULT_WINDOW,
    windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Quality:
    """Measure how far the model in `quantized` is from the one in `source`, on the same text.

    Args:
        source, quantized: model folders or hub repo ids (any mix of full-precision and
            quantized) sharing a tokenizer; `source` is the reference distribution.
        split: the shipped text to use, "evaluation" (held out) or "calibration".
        text: other text instead (its name in the result is "custom").
        window: tokens per window.
        windows: measure only this many windows, evenly spaced (default: all).
        progress: called as progress(layers done, layers in all).
    """
    from .checkpoint import ModelLoadError
    from .hub import resolve_model_path
    from .loading import load_model
    from .tokenizer import Tokenizer

    try:
        source, quantized = (resolve_model_path(p) for p in (source, quantized))
        tokenizer = Tokenizer.from_folder(source)
        models = [load_model(p, dtype="float32", lazy=True) for p in (source, quantized)]
    except (ModelLoadError, FileNotFoundError) as e:
        raise QualityError(str(e)) from None
    vocab = {m.args.vocab_size for m in models}
    if len(vocab) > 1 or {m.args.hidden_size for m in models} != {models[0].args.hidden_size}:
        raise QualityError(f"{source} and {quantized} are not the same model shape")
    body = shipped_text(split) if text is None else text
    ids = tokenizer.backend.encode(body).ids
    if max(ids, default=0) >= min(vocab):
        raise QualityError(f"the tokenizer of {source} has ids past the model's vocabulary")
    all_windows = make_windows(ids, window + 1)  # +1: the last position's next token
    chosen = make_windows(ids, window + 1, windows)
    tokens = mx.array(chosen)
    total = 2 * len(models[0].layers)
    hidden = [
        _final_hidden(m, tokens, lambda i, k=k: progress and progress(k + i, total))
        for k, m in zip((0, total // 2), models, strict=True)
    ]
    per_window = [
        _window_stats(models, [h[w] for h in hidden], tokens[w]) for w in range(len(chosen))
    ]
    del models, hidden
    mx.clear_cache()
    kl, kl_se = mean_se([w[0] for w in per_window])
    top1, top1_se = mean_se([w[1] for w in per_window])
    _, delta_se = mean_se([w[3] - w[2] for w in per_window])
    return Quality(
        source=str(source),
        quantized=str(quantized),
        text="custom" if text is not None else split,
        window=window,
        windows=len(chosen),
        of_windows=len(all_windows),
        tokens=len(chosen) * window,
        kl=kl,
        kl_se=kl_se,
        top1=top1,
        top1_se=top1_se,
        nll_source=sum(w[2] for w in per_window) / len(per_window),
        nll_quantized=sum(w[3] for w in per_window) / len(per_window),
        nll_delta_se=delta_se,
        per_window=tuple(per_window),
    )


def _final_hidden(model, tokens: mx.array, done: Callable[[int], Any]) -> mx.array:
    """The final normed hidden states of every window, one layer at a time, each layer's weights
    freed once it has run (the embedding stays: the tied head needs it)."""
    inner = model.model
    rows = max(1, BATCH_TOKENS // tokens.shape[1])
    h = inner.embed_tokens(tokens[:, :-1])
    mx.eval(h)
    for i, layer in enumerate(inner.layers):
        h = mx.concatenate([layer(h[r : r + rows], "causal") for r in range(0, len(h), rows)])
        mx.eval(h)
        layer.update(tree_map(lambda _: mx.array([]), layer.parameters()))
        done(i + 1)
    h = inner.norm(h)
    mx.eval(h)
    return h


def _head(model, h: mx.array) -> mx.array:
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _window_stats(models, hidden, window: mx.array) -> tuple[float, float, float, float]:
    """(mean KL, top-1 agreement, NLL of the source, NLL of the quantized) over one window."""
    logp = [
        nn.log_softmax(_head(m, h).astype(mx.float32), axis=-1)
        for m, h in zip(models, hidden, strict=True)
    ]
    p, q = logp
    kl = mx.sum(mx.exp(p) * (p - q), axis=-1).mean()
    top1 = (mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1)).astype(mx.float32).mean()
    targets = window[1:, None]
    nll = [-mx.take_along_axis(x, targets, axis=-1).mean() for x in logp]
    mx.eval(kl, top1, *nll)
    return kl.item(), top1.item(), nll[0].item(), nll[1].item()


def write(quality: Quality, folder: Path) -> Path:
    """quality.json beside the weights: the figures, how they were measured, and per window."""
    file = folder / QUALITY_FILE
    file.write_text(json.dumps(quality.to_json(), indent=2) + "\n")
    return file


def read(folder: Path) -> Quality | None:
    file = Path(folder) / QUALITY_FILE
    if not file.is_file():
        return None
    return Quality.from_json(json.loads(file.read_text()))


def summary(q: Quality) -> str:
    """One line of the figures, as printed and as in the model card."""
    sample = f", a sample of {q.windows} of {q.of_windows} windows" if q.sampled else ""
    return (
        f"KL {q.kl:.4f} ± {q.kl_se:.4f} nats/token, top-1 agreement {q.top1:.1%}, "
        f"perplexity {q.ppl_source:.3f} -> {q.ppl_quantized:.3f} ({q.ppl_change:+.2%}) over "
        f"{q.tokens} tokens of the {q.text} text{sample}"
    )
