"""Load a SmolLM3 folder (Hugging Face or MLX layout) or hub repo into a model and tokenizer."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVSettings
from .checkpoint import (
    ModelLoadError,
    check_tensors,
    context_window,
    error_line,
    load_config,
    message_line,
    model_args,
    read_safetensors_header,
    resolve_dtype,
    sampling_defaults,
    weight_files,
)
from .hub import DEFAULT_REPO, resolve_model_path
from .model import Model, ModelInfo

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


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


def _build(path: Path, config: dict[str, Any], max_context: int | None, stored: set[str]) -> Model:
    """The model config.json describes, quantized as stored, its weights not loaded yet."""
    file = path / "config.json"
    args = model_args(config, path)
    layers = {int(m[1]) for k in stored if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers != set(range(args.num_hidden_layers)):
        raise ModelLoadError(
            f"{file}: num_hidden_layers is {args.num_hidden_layers}, the weights hold "
            f"{len(layers)} layers"
        )
    try:
        window, yarn = context_window(args, max_context)
        if yarn:
            rope = {"rope_theta": args.rope_theta, **yarn}
            args = model_args({**config, "rope_scaling": None, "rope_parameters": rope}, path)
        model = Model(args)
        if args.quantization:
            if not {"group_size", "bits"} <= args.quantization.keys():
                raise ModelLoadError(f"{file}: quantization needs group_size and bits")
            _quantize(model, args.quantization, stored)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, ArithmeticError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{file}: cannot build the model ({message_line(e)})") from None
    model.info = ModelInfo(path=path, max_context=window, sampling=sampling_defaults(path))
    return model


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
    dtype = resolve_dtype(dtype)
    path = Path(path)
    config = load_config(path)
    headers = {f: read_safetensors_header(f) for f in weight_files(path)}
    where = {k: f for f, h in headers.items() for k in h}
    model = _build(path, config, max_context, set(where))
    shapes = model.sanitize({k: tuple(h[k]["shape"]) for h in headers.values() for k in h})

    dtypes = {k: h[k]["dtype"] for h in headers.values() for k in h}
    check_tensors(model, shapes, where, path, dtypes=model.sanitize(dtypes))

    weights: dict[str, mx.array] = {}
    for f in headers:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{f}: cannot be read ({message_line(e)})") from None
    model.load_weights(list(model.sanitize(weights).items()), strict=True)

    if dtype is not None:
        if dtype != mx.float32 and model.args.quantization and mx.default_device() == mx.cpu:
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
    from concurrent.futures import ThreadPoolExecutor

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
    # The tokenizer (parsing tokenizer.json, ~1 s for SmolLM3's) is read beside the weights;
    # its thread runs no MLX work.
    with ThreadPoolExecutor(1, thread_name_prefix="smollm3-mlx tokenizer") as pool:
        reading = pool.submit(Tokenizer.from_folder, path)
        model = load_model(path, dtype=dtype, lazy=lazy, max_context=max_context)
        try:
            tokenizer = reading.result()
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
        except Exception as e:  # tokenizers raises bare Exceptions; any bad file ends here, named
            raise ModelLoadError(
                f"{path}: its tokenizer files cannot be read ({error_line(e)})"
            ) from None
    model.info = replace(model.info, tokenizer=tokenizer)  # so that `Chat(model)` needs no more
    return model, tokenizer
