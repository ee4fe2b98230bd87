"""A model folder read and checked without building a model: config.json and its field checks,
the context window (YaRN), the safetensors headers and tensor checks, the dtype rule, and the
sampling defaults of generation_config.json. Every problem is a one-line ModelLoadError."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .model import Model, ModelArgs
from .sample import Sampling

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

MAX_YARN_FACTOR = 2.0  # SmolLM3's model card: YaRN factor 2 over the trained 64K reaches 128K


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


def sampling_defaults(path: Path) -> Sampling:
    """The sampling of a folder's generation_config.json (greedy when do_sample is false)."""
    file = path / "generation_config.json"
    cfg = _read_json(file) if file.exists() else {}

    def value(key: str, default: float) -> Any:
        v = cfg.get(key)
        if key == "top_k" and isinstance(v, float) and v.is_integer():
            return int(v)
        return default if v is None else v  # null means the default, as for transformers

    values = {"repetition_penalty": value("repetition_penalty", 1.0)}
    if cfg.get("do_sample", False):
        values |= {k: value(k, d) for k, d in [("temperature", 1.0), ("top_p", 1.0),
                                                ("top_k", 0), ("min_p", 0.0)]}  # fmt: skip
    else:
        values |= {"temperature": 0.0, "top_p": 1.0}
    try:
        return Sampling(**values)
    except ValueError as e:
        raise ModelLoadError(f"{file}: {e}") from None


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from a file a user handed us; anything else is a ModelLoadError."""
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{file}: not valid JSON (not UTF-8 text)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({message_line(e)})") from None
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


def message_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """The dtype to compute in: "auto" (see `default_dtype`), a name in DTYPES, an mx.Dtype, or
    None (as stored).

    Raises:
        ModelLoadError: an unknown name.
    """
    dtype = default_dtype() if dtype == "auto" else dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype


def default_dtype() -> mx.Dtype | None:
    """float32 on the CPU, whose half-precision quantized kernels lose precision; else None.

    None keeps the stored dtype (bfloat16 for SmolLM3), right on Metal and CUDA.
    """
    return mx.float32 if mx.default_device() == mx.cpu else None


def error_line(e: BaseException) -> str:
    """An exception as one line: its type, then the first line of its message when it has one."""
    name = type(e).__name__
    return f"{name}: {message_line(e)}" if str(e).strip() else name


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


# config.json fields and what they must hold (a field may be absent: its default is used).
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "vocab_size", "max_position_embeddings", "no_rope_layer_interval")  # fmt: skip

_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim")

_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")

_OPTIONAL_DICTS = ("rope_scaling", "rope_parameters", "quantization")

_MAX_DIM = 2**31 - 1


def model_args(config: dict[str, Any], path: Path | None = None) -> ModelArgs:
    where = f"{path / 'config.json'}: " if path else ""
    problem = _config_problem(config)
    if problem:
        raise ModelLoadError(f"{where}{problem}")
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError, ArithmeticError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{where}{message_line(e)}") from None


def _config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the types and ranges of config.json's fields, or None."""

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _MAX_DIM

    for key in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        if key in config and not positive_int(config[key]):
            if config[key] is None and key in _OPTIONAL_POSITIVE_INTS:
                continue
            return f"{key} must be a positive integer, not {config[key]!r:.40}"
    for key in ("rms_norm_eps", "rope_theta"):
        v = config.get(key)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if key in config and not (v is None or number and math.isfinite(v) and v >= 0):
            return f"{key} must be a finite number >= 0, not {v!r:.40}"
    for key in _BOOLS:
        if key in config and not isinstance(config[key], bool):
            return f"{key} must be true or false, not {config[key]!r:.40}"
    for key in _OPTIONAL_DICTS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            return f"{key} must be an object or null, not {config[key]!r:.40}"
    layers = config.get("no_rope_layers")
    if layers is not None and not (
        isinstance(layers, list) and all(type(v) is int and v in (0, 1) for v in layers)
    ):
        return "no_rope_layers must be a list of 0 (NoPE) and 1 (RoPE)"
    for key in ("rope_scaling", "rope_parameters"):
        for name, v in (config.get(key) or {}).items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if name not in ("rope_type", "type") and not (number and math.isfinite(v) and v > 0):
                return f"{key}.{name} must be a positive number, not {v!r:.40}"
    return None


def longest_context(args: ModelArgs) -> int:
    """The longest context a model allows: its YaRN factor times the window it was trained on."""
    scaling = args.rope_scaling
    if scaling and scaling["rope_type"] == "yarn":
        return int(scaling["factor"] * scaling["original_max_position_embeddings"])
    return int(MAX_YARN_FACTOR * args.max_position_embeddings)


def context_window(args: ModelArgs, max_context: int | None) -> tuple[int, dict[str, Any] | None]:
    """The context to allow, and the YaRN settings to switch on for it (None: leave RoPE as is).

    YaRN rescales attention at every length, so it is enabled only past the trained window, and
    a config that already carries YaRN is honoured as it is.
    """
    trained = args.max_position_embeddings
    scaling = args.rope_scaling
    supported = longest_context(args)
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


# safetensors dtypes MLX loads, and their sizes in bytes
ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "C64": 8}  # fmt: skip

WEIGHT_DTYPES = ("F32", "F16", "BF16", "U32")  # float weights, and quantized codes

MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the header


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, every entry checked against the format and the
    file's size, so that nothing malformed reaches MLX's reader."""
    return read_safetensors(file)[0]


def read_safetensors(file: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor table, metadata, the file size the header accounts for) of a safetensors file,
    checked as for `read_safetensors_header` (a shorter file is an error; a longer one is not).

    Raises:
        ModelLoadError: not a well-formed safetensors file (one line naming it).
        OSError: it cannot be read.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise ModelLoadError(f"{file}: truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ModelLoadError(f"{file}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)  # MLX writes null
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelLoadError(f"{file}: corrupt safetensors header (__metadata__)")
    for name, t in header.items():
        problem = _tensor_problem(t)
        if problem:
            raise ModelLoadError(f"{file}: corrupt safetensors header: tensor {name} {problem}")
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if end > size:
        raise ModelLoadError(
            f"{file}: truncated safetensors file ({size} bytes, its header needs {end})"
        )
    return header, metadata, end


def _tensor_problem(t: Any) -> str | None:
    if not isinstance(t, dict) or not {"dtype", "shape", "data_offsets"} <= t.keys():
        return "needs dtype, shape and data_offsets"
    dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_SIZES:
        return f"has unsupported dtype {dtype!r:.20}"

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    if not (isinstance(shape, list) and all(count(d) for d in shape)):
        return f"has a bad shape {shape!r:.40}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(count, offsets))):
        return f"has bad data_offsets {offsets!r:.40}"
    if offsets[1] - offsets[0] != math.prod(shape) * ST_SIZES[dtype]:
        return f"has data_offsets {offsets} that do not fit its shape {shape} and dtype {dtype}"
    return None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: those its index names, else model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(
            isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
            for n in weight_map.values()
        ):
            raise ModelLoadError(f"{index}: weight_map must map tensor names to file names")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).exists():
                raise ModelLoadError(f"{path}: shard {name} named in {index.name} is missing")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no safetensors weights (model*.safetensors)")
    return files


def check_tensors(
    model: Model,
    shapes: dict[str, tuple[int, ...]],
    where: dict[str, Path],
    folder: Path,
    *,
    dtypes: dict[str, str] | None = None,
) -> None:
    """Every tensor (sanitized names) is one of the model's, of its shape (and of a weight dtype,
    where `dtypes` gives the stored ones), and none is missing.

    Raises:
        ModelLoadError: naming the file (`where[name]`) and the tensor.
    """
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for name, shape in shapes.items():
        if name not in expected:
            raise ModelLoadError(f"{where[name]}: unexpected tensor {name}")
        if tuple(shape) != expected[name]:
            raise ModelLoadError(
                f"{where[name]}: tensor {name} has shape {tuple(shape)}, expected {expected[name]}"
            )
        if dtypes is not None and dtypes[name] not in WEIGHT_DTYPES:
            raise ModelLoadError(f"{where[name]}: tensor {name} has dtype {dtypes[name]}, expected "
                                 f"one of {', '.join(WEIGHT_DTYPES)}")  # fmt: skip
    missing = sorted(set(expected) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{folder}: tensor {missing[0]} is missing{more}")
