"""Load a SmolLM3 folder (Hugging Face or MLX layout) or hub repo into a model and tokenizer."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import KVSettings
from .model import Model, ModelArgs
from .sample import Sampling

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DEFAULT_REPO = "HuggingFaceTB/SmolLM3-3B"
# What a model folder needs from the hub: weights, configs, tokenizer and template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.md"]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
MAX_YARN_FACTOR = 2.0  # SmolLM3's model card: YaRN factor 2 over the trained 64K reaches 128K


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelInfo:
    """What `load` learnt about a model beside its weights (`model.info`).

    Args:
        path: the model folder.
        max_context: the longest context allowed (the trained window, or what YaRN reaches).
        sampling: the sampling defaults of the folder's generation_config.json.
        tokenizer: the folder's tokenizer (None from `load_model`, which reads no tokenizer).
    """

    path: Path | None = None
    max_context: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tokenizer: Tokenizer | None = None


def sampling_defaults(path: Path) -> Sampling:
    """The sampling of a folder's generation_config.json (greedy when do_sample is false)."""
    file = path / "generation_config.json"
    cfg = _read_json(file) if file.exists() else {}
    greedy = Sampling(temperature=0.0, top_p=1.0)
    penalty = float(cfg.get("repetition_penalty", 1.0))
    if not cfg.get("do_sample", False):
        return greedy.updated(repetition_penalty=penalty)
    return greedy.updated(
        temperature=float(cfg.get("temperature", 1.0)),
        top_p=float(cfg.get("top_p", 1.0)),
        top_k=int(cfg.get("top_k", 0) or 0),
        min_p=float(cfg.get("min_p", 0.0) or 0.0),
        repetition_penalty=penalty,
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from None


def default_dtype() -> mx.Dtype | None:
    """float32 on the CPU, whose half-precision quantized kernels lose precision; else None.

    None keeps the stored dtype (bfloat16 for SmolLM3), right on Metal and CUDA.
    """
    return mx.float32 if mx.default_device() == mx.cpu else None


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; anything else is a hub repo id, downloaded (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo).startswith((".", "/", "~")):
        raise ModelLoadError(f"{path}: not a model folder")
    from huggingface_hub import snapshot_download  # only when the hub is really needed

    return Path(
        snapshot_download(str(path_or_repo), revision=revision, allow_patterns=HUB_PATTERNS)
    )


def load_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise ModelLoadError(f"{path}: no config.json (not a model folder)")
    config = _read_json(file)
    if config.get("model_type") != "smollm3":
        raise ModelLoadError(
            f"{file}: model_type is {config.get('model_type')!r}, expected 'smollm3'"
        )
    return config


def model_args(config: dict[str, Any], path: Path | None = None) -> ModelArgs:
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        where = f"{path / 'config.json'}: " if path else ""
        raise ModelLoadError(f"{where}{e}") from None


def context_window(args: ModelArgs, max_context: int | None) -> tuple[int, dict[str, Any] | None]:
    """The context to allow, and the YaRN settings to switch on for it (None: leave RoPE as is).

    YaRN rescales attention at every length, so it is enabled only past the trained window, and
    a config that already carries YaRN is honoured as it is.
    """
    trained = args.max_position_embeddings
    scaling = args.rope_scaling
    if scaling and scaling["rope_type"] == "yarn":
        supported = int(scaling["factor"] * scaling["original_max_position_embeddings"])
    else:
        supported = int(MAX_YARN_FACTOR * trained)
    if max_context is None:
        return (supported if scaling else trained), None
    if not 0 < max_context <= supported:
        raise ModelLoadError(
            f"max_context {max_context} is outside what this model supports (1 to {supported})"
        )
    if scaling or max_context <= trained:
        return max_context, None
    yarn = {
        "rope_type": "yarn",
        "factor": max_context / trained,
        "original_max_position_embeddings": trained,
    }
    return max_context, yarn


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ModelLoadError(f"{file}: truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{file}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})"
        )
    return header


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: those its index names, else model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        for name in names:
            if not (path / name).exists():
                raise ModelLoadError(f"{path}: shard {name} named in {index.name} is missing")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no safetensors weights (model*.safetensors)")
    return files


def _quantize(model: Model, quantization: dict[str, Any], stored: set[str]) -> None:
    def predicate(p: str, m: nn.Module) -> bool | dict:
        if p in quantization:  # per-layer override, as mlx-lm records it
            return quantization[p]
        return hasattr(m, "to_quantized") and f"{p}.scales" in stored

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(
    path: Path,
    *,
    dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
    max_context: int | None = None,
) -> Model:
    """Build the model from a folder and load its weights, checking every tensor's name and shape.

    Args:
        path: a folder with config.json and safetensors weights.
        dtype: what to compute in: "auto" (float32 on the CPU, stored dtype on the GPU), a dtype
            name or mx.Dtype, or None to keep the stored dtype.
        lazy: leave the weights unevaluated (they load on first use).
        max_context: the longest context to allow; past the trained window (64K) and up to
            twice it, YaRN is switched on for it. Default: the trained window.
    """
    dtype = default_dtype() if dtype == "auto" else dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = Path(path)
    config = load_config(path)
    args = model_args(config, path)
    window, yarn = context_window(args, max_context)
    if yarn:
        rope = {"rope_theta": args.rope_theta, **yarn}
        config = {**config, "rope_scaling": None, "rope_parameters": rope}
        args = model_args(config, path)
    model = Model(args)
    model.info = ModelInfo(path=path, max_context=window, sampling=sampling_defaults(path))

    headers = {f: read_safetensors_header(f) for f in weight_files(path)}
    where = {k: f for f, h in headers.items() for k in h}
    shapes = {k: tuple(h[k]["shape"]) for h in headers.values() for k in h}
    if args.quantization:
        if not {"group_size", "bits"} <= args.quantization.keys():
            raise ModelLoadError(f"{path / 'config.json'}: quantization needs group_size and bits")
        _quantize(model, args.quantization, set(where))
    shapes = model.sanitize(shapes)

    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    for key, shape in shapes.items():
        if key not in expected:
            raise ModelLoadError(f"{where[key]}: unexpected tensor {key}")
        if tuple(shape) != tuple(expected[key]):
            raise ModelLoadError(
                f"{where[key]}: tensor {key} has shape {tuple(shape)}, "
                f"expected {tuple(expected[key])}"
            )
    missing = sorted(set(expected) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: tensor {missing[0]} is missing{more}")

    weights: dict[str, mx.array] = {}
    for f in headers:
        weights.update(mx.load(str(f)))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)

    if dtype is not None:
        if dtype != mx.float32 and args.quantization and mx.default_device() == mx.cpu:
            warnings.warn(
                "half-precision compute with quantized weights on the CPU loses 2-17% "
                "precision in MLX's CPU kernels; float32 is the default there",
                stacklevel=2,
            )
        model.set_dtype(dtype)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(
    path_or_repo: str | Path = DEFAULT_REPO,
    *,
    dtype: str | mx.Dtype | None = "auto",
    revision: str | None = None,
    lazy: bool = False,
    max_context: int | None = None,
    check_memory: bool = True,
    kv: KVSettings | None = None,
) -> tuple[Model, Tokenizer]:
    """Load a SmolLM3 model and its tokenizer from a folder or a hub repo id.

    Args:
        path_or_repo: a local folder (Hugging Face or MLX layout) or a hub repo id.
        dtype: what to compute in; see `load_model`.
        revision: the hub revision, for a repo id.
        lazy: leave the weights unevaluated until first use.
        max_context: the longest context to allow (YaRN past 64K, up to 128K).
        check_memory: before reading any weight, estimate what a session at `max_context`
            needs (weights, a KV cache with the settings `kv`, activations) and raise
            `memory.MemoryBudgetError` when the machine offers less (see `memory.py`).
        kv: the KV cache settings the session will use, for the memory check (default dense).

    Returns:
        (model, tokenizer); `model.info` holds the folder's path, context window, sampling
        defaults and the tokenizer.
    """
    from .tokenizer import Tokenizer

    path = resolve_model_path(path_or_repo, revision)
    if check_memory:
        from .memory import check_memory as check, estimate_memory

        kv = kv or KVSettings()
        est = estimate_memory(
            path, max_context=max_context, kv_bits=kv.bits, kv_group_size=kv.group_size,
            kv_start=kv.start, dtype=dtype,
        )  # fmt: skip
        check(est)
    model = load_model(path, dtype=dtype, lazy=lazy, max_context=max_context)
    try:
        tokenizer = Tokenizer.from_folder(path)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from None
    model.info = replace(model.info, tokenizer=tokenizer)  # so that `Chat(model)` needs no more
    return model, tokenizer
