"""Convert a SmolLM3 checkpoint (hub repo or folder) into a quantized MLX folder, streaming.

Every output shape is known from the config and the recipe, so the shards and their safetensors
headers are planned first; then row blocks of each source tensor are read straight from the
source bytes, quantized and written at their planned offsets. Memory stays near a few blocks.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import recipe as recipe_module
from .card import model_card
from .checkpoint import (
    DTYPES,
    ModelLoadError,
    check_tensors,
    error_line,
    load_config,
    model_args,
    read_safetensors_header,
    weight_files,
)
from .convert_checks import (
    ConvertError,
    ConvertInterrupted,
    check_download_space,
    check_out,
    check_upload_repo,
    upload,
)
from .files import (
    Terminated,
    existing_parent,
    human_size,
    make_temp,
    remove_stale,
    replace_folder,
    signals_as_interrupt,
    unmark,
)
from .hub import DEFAULT_REPO, Progress, hub_error, local_source, snapshot
from .loading import load_model
from .model import Model, ModelArgs

DEFAULT_SHARD_SIZE = 5 * 10**9
BITS, GROUP_SIZES, OUT_DTYPES = (4, 8), (32, 64, 128), DTYPES
RECIPES = ("uniform", "mixed", "measured")  # measured: chosen for --target-bpw (recipe.py)
CPU_MEASURE_WINDOWS = 4  # on the CPU, `--measure` samples this many windows unless told
COPIED_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
COPIED_FILES += ["chat_template.jinja", "generation_config.json"]
SMALL_FILES = ["config.json", "model.safetensors.index.json", *COPIED_FILES]
SOURCE_FILES = [*SMALL_FILES, "model*.safetensors"]
# What the output needs beside the weights: without them it loads but cannot chat as it should.
NEEDED_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
HEAD_MODULES = ("model.embed_tokens", "lm_head")  # the mixed recipe keeps them at 8 bits
CHUNK_ELEMENTS = 1 << 23  # source elements per row block: 16 MB of bf16
CHECK_TOKENS = 2  # the check's forward pass; CPU quantized matmuls cost ~0.1 s a layer a token
WORKERS = 2  # threads quantizing row blocks: MLX and file I/O release the GIL
# safetensors dtype name -> (numpy dtype of its bytes, MLX dtype); and MLX dtype -> name
ST_DTYPES = {"BF16": ("<u2", mx.bfloat16), "F16": ("<f2", mx.float16), "F32": ("<f4", mx.float32)}
ST_NAMES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}

SPACE_MARGIN = 1 << 20  # bytes beyond the planned output: the card, the configs' rewrites


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    path: Path
    bits_per_weight: float  # stored bits (codes, scales, biases, norms) per model parameter
    size_bytes: int  # of the safetensors shards
    seconds: float
    source: str
    revision: str | None  # the hub commit converted; None for a local folder
    recipe: str
    bits: int
    group_size: int
    dtype: str
    upload_repo: str | None = None
    target_bpw: float | None = None  # of the measured recipe
    quality: Any = None  # a quality.Quality when measured


@dataclasses.dataclass(frozen=True)
class _Job:
    """One source tensor, and where each of its output tensors starts in its output shard."""

    name: str
    file: Path
    offset: int  # where its data starts in `file`
    dtype: str
    shape: tuple[int, ...]
    quant: tuple[int, int] | None = None  # (group_size, bits); None: cast to the output dtype
    outputs: dict[str, int] = dataclasses.field(default_factory=dict)
    importance: Any = None  # the measured recipe's column weights for rounding (recipe.py)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(ST_DTYPES[self.dtype][0]).itemsize

    @property
    def row(self) -> int:  # tensors are read as rows of their last dimension
        return self.shape[-1] if self.shape else 1

    @property
    def rows(self) -> int:
        return math.prod(self.shape) // max(self.row, 1)


def convert(
    source: str | Path = DEFAULT_REPO,
    out: str | Path = "SmolLM3-3B-mlx-4bit",
    *,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
    dtype: str = "bfloat16",
    revision: str | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    note: Callable[[str], None] | None = None,
    target_bpw: float | None = None,
    measure: bool | None = None,
    measure_windows: int | None = None,
) -> ConvertResult:
    """Quantize a SmolLM3 checkpoint into an MLX folder that both smollm3-mlx and mlx-lm load.

    Args:
        source: a hub repo id or a local folder holding a Hugging Face checkpoint, with its
            tokenizer files, chat template and generation_config.json.
        out: the folder to create; built in a temporary folder beside it, renamed when complete.
            It may not be the current folder, nor be, hold or lie inside the source.
        bits: bits per weight of the quantized layers (4 or 8).
        group_size: weights sharing one scale and bias (32, 64 or 128).
        recipe: "mixed" keeps the embedding (the tied output head) at 8 bits; "uniform" uses
            `bits` everywhere; "measured" chooses each matrix's bits and group size for
            `target_bpw` from its sensitivity on the shipped calibration text, and rounds
            activation-aware (see recipe.py; it holds the float32 source and its gradient).
            Default: measured when `target_bpw` is given, else mixed for 4-bit, uniform for 8.
        dtype: of the scales, biases and unquantized tensors ("bfloat16" or "float16").
        revision: the hub revision (branch, tag or commit) of a repo id.
        upload_repo: push the finished folder to this hub repo ("user/name"); checked (its
            form, a token, not offline) before anything is converted.
        force: replace an existing `out`, once the new folder is complete.
        progress: called as progress(done, total, name) with bytes: of the hub download
            (name "downloading <repo>", from download threads), then of the source tensors.
        shard_size: the most tensor bytes per output shard (a larger tensor gets its own).
        note: called with one line for each stale temporary folder of an earlier conversion
            (killed, its process gone) that this one removes; default: `warnings.warn`; and
            with what the measurement is doing.
        target_bpw: stored bits per parameter (embedding included) of the measured recipe.
        measure: compare the output with the source on the shipped evaluation text (quality.py)
            and write the figures into the model card and quality.json. Default: on a GPU.
        measure_windows: measure only this many windows of the text, evenly spaced. Default:
            all on a GPU, CPU_MEASURE_WINDOWS on the CPU (where a 3B pass takes minutes).

    Raises:
        ConvertError: bad arguments or source, an existing `out`, a failed download, a full
            disk, an interrupt. The message is one line; no output or temporary folder remains.
            ConvertInterrupted (a ConvertError) for Ctrl-C, SIGTERM and SIGHUP, which are
            handled alike while converting on the main thread.
    """
    start = time.perf_counter()
    recipe = recipe or ("measured" if target_bpw else "mixed" if bits == 4 else "uniform")
    _check_arguments(bits, group_size, recipe, dtype, target_bpw)
    if measure is None:
        measure = mx.default_device() == mx.gpu
    if measure and measure_windows is None and mx.default_device() != mx.gpu:
        measure_windows = CPU_MEASURE_WINDOWS
    out = Path(out).expanduser()
    local = _local_source(str(source), revision)
    check_out(out, local)
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    if upload_repo:
        check_upload_repo(upload_repo)
    remove_stale(out.parent, note)

    tmp = None
    with signals_as_interrupt():
        try:
            if local is None:
                path, revision = _fetch(str(source), revision, progress)
                check_out(out, path)
            else:
                path = local
                _check_needed_files(path, str(path), " (copy from the original repo)")
            config = load_config(path)
            if "quantization" in config or "quantization_config" in config:
                raise ConvertError(f"{path / 'config.json'}: the source is already quantized")
            model = Model(model_args(config, path))  # lazy: its random weights are never computed
            jobs, n_params = _validate(path, model)
            plan = _plan(path, target_bpw, dtype, note) if recipe == "measured" else None
            if plan is not None:
                bits, group_size = recipe_module.DEFAULT[0], recipe_module.DEFAULT[1]
            outputs, overrides = _quantized_layout(
                model, jobs, bits, group_size, recipe, dtype, plan
            )
            shards = _plan_shards(jobs, outputs, shard_size)
            _check_space(out, path, shards)

            tmp = make_temp(out, "tmp")
            _write_shards(tmp, shards, DTYPES[dtype], progress)
            quantization = {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}
            config = {**config, **_rope_spellings(model.args)}
            _write_metadata(tmp, path, config, shards, outputs, n_params, quantization, dtype)
            data_bytes = sum(math.prod(shape) * d.size for d, shape in outputs.values())
            result = ConvertResult(
                out, 8 * data_bytes / n_params, sum((tmp / f).stat().st_size for f in shards),
                0.0, str(source), revision, recipe, bits, group_size, dtype, upload_repo,
                target_bpw if plan is not None else None,
            )  # fmt: skip
            _check(tmp)
            if measure:
                result = _measure(result, path, tmp, measure_windows, note)
            (tmp / "README.md").write_text(model_card(result, config, plan))
            unmark(tmp)
            held = replace_folder(tmp, out)
            if held:
                raise _stopped_after_swap(held[0], out)
        except BaseException as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            error = _one_line_error(e, out)
            if error is None:
                raise
            raise error from e
    result = dataclasses.replace(result, seconds=time.perf_counter() - start)
    if upload_repo:
        upload(out, upload_repo)
    return result


def _check_arguments(bits, group_size, recipe, dtype, target_bpw) -> None:
    half = [d for d in OUT_DTYPES if d != "float32"]
    for name, value, allowed in [("bits", bits, BITS), ("group_size", group_size, GROUP_SIZES),
                                 ("recipe", recipe, RECIPES), ("dtype", dtype, half)]:  # fmt: skip
        if value not in allowed:
            raise ConvertError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value}")
    if (recipe == "measured") != (target_bpw is not None):
        raise ConvertError("the measured recipe and a target bits per weight go together")
    lowest, highest = (recipe_module.option_bpw(o) for o in recipe_module.OPTIONS[::6])
    if target_bpw is not None and not lowest <= target_bpw <= highest:
        raise ConvertError(f"target bits per weight must be from {lowest} to {highest}")


def _plan(path: Path, target_bpw: float, dtype: str, note) -> recipe_module.Plan:
    """The measured recipe: sensitivities on the calibration text, then the bits they buy."""
    from .tokenizer import Tokenizer

    windows = recipe_module.calibration_windows(Tokenizer.from_folder(path))
    (note or _quiet)(f"measuring sensitivity on {len(windows)} windows of the calibration text")
    try:
        return recipe_module.plan(path, target_bpw, dtype=DTYPES[dtype], windows=windows)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _measure(result: ConvertResult, source: Path, tmp: Path, windows: int | None, note):
    """Compare the written folder with the source; the figures go to quality.json and the card."""
    from . import quality

    (note or _quiet)("measuring the conversion against the source" + (
        f" on a sample of {windows} windows (--measure-windows)" if windows else ""))  # fmt: skip
    q = quality.compare(source, tmp, windows=windows)
    q = dataclasses.replace(q, source=result.source, quantized=str(result.path))
    quality.write(q, tmp)
    return dataclasses.replace(result, quality=q)


def _quiet(line: str) -> None:
    pass


def _one_line_error(e: BaseException, out: Path) -> ConvertError | None:
    """The ConvertError an exception becomes; None to re-raise it as it is."""
    if isinstance(e, ConvertError) or not isinstance(e, (Exception, KeyboardInterrupt)):
        return None
    if isinstance(e, ModelLoadError):
        return ConvertError(str(e))
    if isinstance(e, Terminated):
        name = signal.Signals(e.signum).name
        return ConvertInterrupted(f"stopped by {name}; nothing was written to {out}", e.signum)
    if isinstance(e, KeyboardInterrupt):
        return ConvertInterrupted(f"interrupted; nothing was written to {out}")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ConvertError(f"disk full writing {out} ({e.strerror}); nothing was written")
    return ConvertError(f"conversion to {out} failed: {error_line(e)}")


def _stopped_after_swap(signum: int, out: Path) -> ConvertInterrupted:
    """A signal held during the final swap: the conversion is complete and `out` holds it."""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return ConvertInterrupted(
        f"{what} after {out} was written: it holds the new conversion", signum
    )


def _check_needed_files(path: Path, source: str, hint: str = "") -> None:
    """Refuse a source without what the output needs to be used: tokenizer, template, defaults."""
    missing = [name for name in NEEDED_FILES if not (path / name).is_file()]
    template = (path / "chat_template.jinja").is_file()
    if not template and (path / "tokenizer_config.json").is_file():
        try:
            template = bool(json.loads((path / "tokenizer_config.json").read_text()).get(
                "chat_template"))  # fmt: skip
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise ConvertError(f"{path / 'tokenizer_config.json'}: not valid JSON") from None
    if not template:
        missing.append("a chat template (chat_template.jinja)")
    if missing:
        them = "them" if len(missing) > 1 else "it"
        raise ConvertError(
            f"{source} has no {', '.join(missing)}; the converted model needs {them}{hint}"
        )
    from .tokenizer import Tokenizer

    try:
        Tokenizer.from_folder(path)
    except Exception as e:  # tokenizers raises its own Exception subclass for a bad file
        raise ConvertError(f"{path / 'tokenizer.json'}: cannot be read ({error_line(e)})") from e


def _check_space(out: Path, source: Path, shards: dict[str, tuple]) -> None:
    """Refuse to start what the disk cannot hold: the shards' sizes are known from their plan."""
    need = sum(len(header) + _data_bytes(header) for header, _ in shards.values())
    need += sum((source / n).stat().st_size for n in COPIED_FILES if (source / n).is_file())
    need += SPACE_MARGIN
    parent = out.parent if out.parent.exists() else existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConvertError(
            f"not enough disk space for {out}: it needs {human_size(need)}, {parent} has "
            f"{human_size(free)} free"
        )


def _data_bytes(header: bytes) -> int:
    table = json.loads(header[8:])
    return max((t["data_offsets"][1] for k, t in table.items() if k != "__metadata__"), default=0)


def _local_source(source: str, revision: str | None) -> Path | None:
    """The folder `source` names; None when it is a hub repo id (OWNER/NAME), as for `load`."""
    try:
        return local_source(source, revision)
    except ModelLoadError as e:
        raise ConvertError(str(e)) from None


def _fetch(source: str, revision: str | None, progress: Progress | None) -> tuple[Path, str]:
    """(local folder, hub commit) of a hub repo: its small files first, checked, then the
    weights of that same commit, so that a repo lacking what the output needs costs no download."""
    try:
        folder = Path(snapshot(source, revision, progress, SMALL_FILES))
        commit = folder.name  # snapshot folders are named by their commit
        _check_needed_files(folder, source)
        done = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        check_download_space(source, commit, SOURCE_FILES)
        snapshot(source, commit, progress, SOURCE_FILES, offset=done)
    except ConvertError:
        raise
    except Exception as e:  # network, auth, missing revision, offline cache miss: all end here
        raise ConvertError(f"download of {source} failed: {hub_error(e)}") from e
    return folder, commit


def _validate(path: Path, model: Model) -> tuple[dict[str, _Job], int]:
    """A job per source tensor, checked against the model's parameters; and their count."""
    jobs = {}
    for file in weight_files(path):
        header = read_safetensors_header(file)
        with open(file, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
        for name, t in header.items():
            if name in jobs:
                raise ConvertError(f"{file}: tensor {name} is also in {jobs[name].file}")
            offset = start + t["data_offsets"][0]
            jobs[name] = _Job(name, file, offset, t["dtype"], tuple(t["shape"]))
    jobs = model.sanitize(jobs)
    check_tensors(
        model, {n: j.shape for n, j in jobs.items()}, {n: j.file for n, j in jobs.items()}, path
    )
    for name, job in jobs.items():
        if job.dtype not in ST_DTYPES:
            raise ConvertError(f"{job.file}: tensor {name} has unsupported dtype {job.dtype}")
    return jobs, sum(v.size for _, v in tree_flatten(model.parameters()))


def _quantized_layout(model, jobs, bits, group_size, recipe, dtype, plan=None):
    """Output tensors {name: (dtype, shape)} and per-layer overrides, from nn.quantize on the lazy
    model: the very layout the loaders rebuild. Sets each quantized job's (group_size, bits)."""
    overrides = {}

    def predicate(p: str, m: nn.Module) -> bool | dict:
        if plan is not None:
            if p not in plan.options:
                return False
            b, g = plan.options[p]
            if (b, g) != (bits, group_size):
                overrides[p] = {"group_size": g, "bits": b}
            return {"group_size": g, "bits": b}
        if not hasattr(m, "to_quantized") or m.weight.shape[-1] % group_size:
            return False  # as mlx-lm: rows that are not whole groups stay unquantized
        if recipe == "mixed" and p in HEAD_MODULES:
            overrides[p] = {"group_size": group_size, "bits": 8}
            return dict(overrides[p])
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    for p, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            importance = plan.importance[p] if plan is not None else None
            jobs[f"{p}.weight"] = dataclasses.replace(
                jobs[f"{p}.weight"], quant=(m.group_size, m.bits), importance=importance
            )
    outputs = {
        k: (v.dtype if v.dtype == mx.uint32 else DTYPES[dtype], tuple(v.shape))
        for k, v in tree_flatten(model.parameters())
    }
    return outputs, dict(sorted(overrides.items()))


def plan_shards(sizes: Sequence[int], max_size: int) -> list[tuple[str, list[int]]]:
    """Shard file names with the indices of the tensors each holds: filled in order, a new shard
    whenever the next tensor would pass `max_size` (as huggingface_hub splits a state dict)."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if groups[-1] and size + n > max_size:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return [
        (f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)
    ]


def safetensors_header(
    tensors: Sequence[tuple[str, str, Sequence[int], int]], fmt: str
) -> tuple[bytes, dict[str, int]]:
    """The header of a safetensors file holding `tensors` (name, dtype name, shape, bytes), their
    data in this order from an 8-byte aligned start; and where each tensor starts in the file."""
    table: dict[str, Any] = {"__metadata__": {"format": fmt}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        table[name] = dict(dtype=dtype, shape=list(shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # so that the data starts 8-byte aligned
    header = len(raw).to_bytes(8, "little") + raw
    return header, {t[0]: len(header) + table[t[0]]["data_offsets"][0] for t in tensors}


def _plan_shards(jobs: dict[str, _Job], outputs, shard_size: int) -> dict[str, tuple]:
    """Shard file name -> (its safetensors header, its jobs with their output offsets)."""

    def names(job: _Job) -> list[str]:
        stem = job.name.removesuffix(".weight")
        return [f"{stem}.{s}" for s in ("weight", "scales", "biases")] if job.quant else [job.name]

    def nbytes(name: str) -> int:
        dtype, shape = outputs[name]
        return math.prod(shape) * dtype.size

    ordered = [jobs[name] for name in sorted(jobs)]
    shards = {}
    for file, indices in plan_shards(
        [sum(map(nbytes, names(ordered[i]))) for i in range(len(ordered))], shard_size
    ):
        group = [ordered[i] for i in indices]
        tensors = [
            (n, ST_NAMES[outputs[n][0]], outputs[n][1], nbytes(n))
            for job in group
            for n in names(job)
        ]
        header, offsets = safetensors_header(tensors, "mlx")
        group = [
            dataclasses.replace(job, outputs={n: offsets[n] for n in names(job)}) for job in group
        ]
        shards[file] = (header, group)
    return shards


def _write_shards(folder: Path, shards, dtype: mx.Dtype, progress: Progress | None) -> None:
    """Write each shard's header, then quantize and write the row blocks on WORKERS threads."""
    blocks = []
    for name, (header, jobs) in shards.items():
        (folder / name).write_bytes(header)
        for job in jobs:
            step = max(1, CHUNK_ELEMENTS // max(job.row, 1))
            blocks += [
                (folder / name, job, r, min(job.rows, r + step)) for r in range(0, job.rows, step)
            ]
    total, done = sum(j.nbytes for _, jobs in shards.values() for j in jobs), 0
    with ThreadPoolExecutor(WORKERS) as pool:
        pending: deque = deque()
        try:
            for i, block in enumerate(blocks):
                pending.append((block, pool.submit(_write_block, *block, dtype)))
                # Finish the oldest blocks first: a few in memory at a time, progress in order.
                while len(pending) > 2 * WORKERS or (pending and i == len(blocks) - 1):
                    (_, job, r0, r1), future = pending.popleft()
                    future.result()
                    done += job.nbytes * (r1 - r0) // job.rows
                    if progress is not None:
                        progress(done, total, job.name)
        finally:
            for _, future in pending:
                future.cancel()


def _write_block(shard: Path, job: _Job, r0: int, r1: int, dtype: mx.Dtype) -> None:
    raw, src_dtype = ST_DTYPES[job.dtype]
    buf = np.empty((r1 - r0, job.row), raw)
    with open(job.file, "rb") as f:
        f.seek(job.offset + r0 * buf[0].nbytes)
        if f.readinto(buf) != buf.nbytes:
            raise ConvertError(f"{job.file}: truncated while reading {job.name}")
    w = mx.array(buf).view(src_dtype)
    if job.importance is not None:
        parts = recipe_module.quantize(w, *job.quant, mx.array(job.importance), dtype)
    elif job.quant:
        parts = _quantize(w, *job.quant, dtype)
    else:
        parts = (w.astype(dtype),)
    mx.eval(parts)
    fd = os.open(shard, os.O_WRONLY)
    try:
        for offset, part in zip(job.outputs.values(), parts, strict=True):
            data, at = _bytes(part), offset + r0 * (part.nbytes // (r1 - r0))
            while data:  # pwrite may write less than asked
                n = os.pwrite(fd, data, at)
                data, at = data[n:], at + n
    finally:
        os.close(fd)


def _quantize(w: mx.array, group_size: int, bits: int, dtype: mx.Dtype):
    """Affine quantization, computed in float32 (mx.quantize does so for any input dtype).

    At 8 bits the codes are refit to the scales and biases as stored, rounded to `dtype`:
    mx.quantize picks them before that rounding, which adds ~20% to the 8-bit weight error.
    At 4 bits the steps are 16x coarser and refitting changes nothing measurable.
    """
    q, scales, biases = mx.quantize(
        w if w.dtype == dtype else w.astype(mx.float32), group_size, bits
    )
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    if bits == 8:  # codes from float32 math: bf16 weights minus float32 biases promote
        groups = w.reshape(*w.shape[:-1], -1, group_size)
        codes = _codes8(groups, scales.astype(mx.float32), biases.astype(mx.float32))
        q = codes.reshape(w.shape).view(mx.uint32)  # MLX's 8-bit packing is a byte view
    return q, scales, biases


def _codes8(groups: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    s = mx.where(scales == 0, 1, scales)[..., None]
    return mx.clip(mx.round((groups - biases[..., None]) / s), 0, 255).astype(mx.uint8)


def _bytes(a: mx.array) -> memoryview:
    return memoryview(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)).cast("B")


def _rope_spellings(args: ModelArgs) -> dict[str, Any]:
    """RoPE as we run it, in both spellings: mlx-lm and transformers 4 read the top-level
    rope_theta and rope_scaling (mlx-lm falls back to theta 10000 without them), transformers 5
    reads rope_parameters; our loader reads either the same."""
    spellings = ("rope_theta", "rope_scaling", "rope_parameters")
    return {key: getattr(args, key) for key in spellings}


def _write_metadata(folder, source, config, shards, outputs, n_params, quantization, dtype):
    """The index; config.json with the quantization recorded as mlx-lm does; the copied files."""
    weight_map = {n: f for f, (_, jobs) in shards.items() for j in jobs for n in j.outputs}
    total = sum(math.prod(shape) * d.size for d, shape in outputs.values())
    index = {"metadata": {"total_size": total, "total_parameters": n_params},
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    config.update(quantization=quantization, quantization_config=quantization)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def _check(folder: Path) -> None:
    """Load the output with our loader and run it on a few tokens, holding one layer at a time."""
    try:
        model = load_model(folder, lazy=True)
    except ModelLoadError as e:
        raise ConvertError(f"check of the converted model failed: {e}") from None

    def evicting(layer: nn.Module) -> Callable:
        def run(x, mask=None, cache=None):
            h = layer(x, mask, cache)
            mx.eval(h)
            layer.update(tree_map(lambda _: mx.array([]), layer.parameters()))
            return h

        return run

    model.model.layers = [evicting(layer) for layer in model.model.layers]
    tokens = mx.arange(CHECK_TOKENS)[None] % model.args.vocab_size
    finite = mx.all(mx.isfinite(model(tokens))).item()
    del model
    mx.clear_cache()  # hand the check's buffers back
    if not finite:
        raise ConvertError(f"check of the converted model failed: non-finite logits ({folder})")
