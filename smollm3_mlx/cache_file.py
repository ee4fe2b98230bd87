"""Prompt-cache files: a `PromptCache` saved so that a long system prompt is not prefilled again.

A file is safetensors (no pickle): the token ids it stands for and every layer's keys and values,
as the cache holds them (dense or quantized; cut to what is held, so the file is the cache's
bytes). Its metadata carries a fingerprint of what it is valid for: the model (config.json, the
weight files' headers and the RoPE in effect), the tokenizer, the chat template, the compute dtype
and the KV settings (bits, group size, start, window, kept tokens); and a CRC-32 per tensor. A file
is written to a temporary file beside the target, synced and renamed: never half-written; a
failed write (a full disk) is an OSError, whatever MLX's writer raised.

Loading checks all of it: another model, tokenizer, template, dtype or KV settings is a
`PromptCacheMismatch` (or, where asked, None: the caller prefills again); a truncated or corrupt
file is a `PromptCacheError`. Never a cache that would give a wrong answer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import stat
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .cache import KVSettings, PromptCache
from .checkpoint import ModelLoadError, read_safetensors
from .files import atomic_path, parse_json

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

FORMAT, VERSION = "smollm3-mlx-prompt-cache", "1"
KINDS = ("model", "tokenizer", "template", "dtype", "kv")  # what a fingerprint compares
CACHE_FILE_NAME = re.compile(r"[0-9a-f]{32}\.safetensors")  # what cache_file_name makes
MAX_METADATA = 16 * 2**20  # header bytes: the ids of 131072 tokens and a long chat take ~2 MB
_TOKENIZER_HASHES: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used: one line naming the file and the problem."""


class PromptCacheMismatch(PromptCacheError):
    """A sound file made for something else; `kind` is one of KINDS."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Fingerprint:
    """What a prompt cache is valid for. `keep` None accepts the file's kept prefix."""

    model: str
    tokenizer: str
    template: str
    dtype: str
    kv: KVSettings = KVSettings()
    window: int | None = None
    keep: int | None = None

    def to_metadata(self) -> dict[str, str]:
        return {
            "model": self.model, "tokenizer": self.tokenizer, "template": self.template,
            "dtype": self.dtype,
            "kv": json.dumps({**self.kv.meta(), "window": self.window, "keep": self.keep}),
        }  # fmt: skip

    def differences(self, other: Fingerprint) -> list[str]:
        """The KINDS in which `other` (a file's) differs from this (what is expected)."""
        kinds = [k for k in KINDS[:4] if getattr(self, k) != getattr(other, k)]
        keep_differs = self.keep is not None and self.keep != other.keep
        if (self.kv, self.window) != (other.kv, other.window) or keep_differs:
            kinds.append("kv")
        return kinds


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()[:32]


def _model_hash(model: Model) -> str:
    """config.json, the weights' headers (names, dtypes, shapes, offsets: cheap, no tensor read)
    and the RoPE actually in effect (YaRN switched on by max_context changes every key)."""
    from .checkpoint import weight_files

    path = model.info.path if model.info is not None else None
    if path is None:
        raise ValueError("the model has no folder to fingerprint: load it with smollm3_mlx.load")
    parts = [(path / "config.json").read_bytes()]
    for f in weight_files(path):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            parts.append(fh.read(n))
    rope = {"rope": model.args.rope_parameters, "quantization": model.args.quantization}
    return _sha(*parts, json.dumps(rope, sort_keys=True).encode())


def _tokenizer_hashes(tokenizer: Tokenizer) -> tuple[str, str]:
    """(the tokenizer: vocabulary, merges, added tokens, config; the chat template)."""
    if tokenizer not in _TOKENIZER_HASHES:
        config = json.dumps(tokenizer.config, sort_keys=True, default=str).encode()
        tok = _sha(tokenizer.backend.to_str().encode(), config)
        _TOKENIZER_HASHES[tokenizer] = (tok, _sha((tokenizer.chat_template or "").encode()))
    return _TOKENIZER_HASHES[tokenizer]


def fingerprint(
    model: Model,
    tokenizer: Tokenizer | None = None,
    *,
    kv: KVSettings | None = None,
    window: int | None = None,
    keep: int | None = None,
) -> Fingerprint:
    """The fingerprint of a cache of `model` with these KV settings (`tokenizer`: the model's)."""
    tokenizer = tokenizer or (model.info.tokenizer if model.info is not None else None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass the one `load` returned")
    tok, template = _tokenizer_hashes(tokenizer)
    dtype = str(model.model.norm.weight.dtype).removeprefix("mlx.core.")  # the compute dtype
    return Fingerprint(_model_hash(model), tok, template, dtype, kv or KVSettings(), window, keep)


def _crc(a: mx.array) -> int:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: checksum the same bytes as uint16
        a = a.view(mx.uint16)
    return zlib.crc32(np.ascontiguousarray(a).data.cast("B"))


def save_prompt_cache(
    path: str | Path, pc: PromptCache, fp: Fingerprint, *, extra: dict[str, str] | None = None
) -> Path:
    """Write `pc` to `path` atomically, with the fingerprint `fp` (its KV settings must be pc's).

    Args:
        path: the file to write (replaced if it exists).
        pc: the prompt cache; its ids are stored with it.
        fp: from `fingerprint(model, kv=pc.kv, window=pc.window, keep=pc.keep)`.
        extra: more metadata strings for the caller (a chat stores its conversation here).
    """
    if (fp.kv, fp.window, fp.keep) != (pc.kv, pc.window, pc.keep):
        raise ValueError("the fingerprint's KV settings are not the prompt cache's")
    arrays, meta = pc.export()
    mx.eval(list(arrays.values()))
    names = sorted(arrays)
    metadata = {
        **(extra or {}),
        "format": FORMAT, "version": VERSION, **fp.to_metadata(),
        "cache": json.dumps(meta), "crc32": json.dumps([_crc(arrays[n]) for n in names]),
    }  # fmt: skip
    path = Path(path).expanduser()
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        except RuntimeError as e:  # MLX's "[write] Unable to write 2579 bytes to file."
            why = str(e).split("\n")[0]
            problem = f"cannot write it ({why}; is the disk full?)"
            raise OSError(errno.EIO, problem, str(path)) from None
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a prompt-cache file, from its header alone.

    Raises:
        PromptCacheError: missing, truncated, or not a smollm3-mlx prompt-cache file.
    """
    path = Path(path).expanduser()
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never end
            raise PromptCacheError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        if MAX_METADATA < n <= st.st_size - 8:  # refused before any of it is parsed
            raise PromptCacheError(f"{path}: a header of {n} bytes, more than a prompt cache's")
        _, meta, end = read_safetensors(path)
        size = path.stat().st_size
    except OSError as e:
        raise PromptCacheError(f"{path}: cannot read ({e.strerror or e})") from None
    except ModelLoadError as e:  # truncated, or not a safetensors file
        raise PromptCacheError(str(e)) from None
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: not a smollm3-mlx prompt-cache file")
    if meta.get("version") != VERSION:
        raise PromptCacheError(f"{path}: prompt-cache format version {meta.get('version')}")
    if end != size:
        raise PromptCacheError(f"{path}: {size} bytes, where its header accounts for {end}")
    return meta


def file_fingerprint(meta: dict[str, str]) -> Fingerprint:
    """The fingerprint a file's metadata carries.

    Raises:
        KeyError, TypeError, ValueError: the metadata is not a fingerprint.
    """
    kv = parse_json(meta["kv"])
    if not isinstance(kv, dict):
        raise ValueError("the KV settings are not a JSON object")
    window, keep = kv.pop("window"), kv.pop("keep")
    return Fingerprint(
        meta["model"], meta["tokenizer"], meta["template"], meta["dtype"], KVSettings.from_meta(kv),
        window, keep,
    )  # fmt: skip


def load_prompt_cache(
    path: str | Path, model: Model, *, expect: Fingerprint, recompute: bool = False
) -> PromptCache | None:
    """The prompt cache saved in `path`, checked against `expect` (see `open_prompt_cache`)."""
    return open_prompt_cache(path, model, expect=expect, recompute=recompute)[0]


def open_prompt_cache(
    path: str | Path, model: Model, *, expect: Fingerprint, recompute: bool = False
) -> tuple[PromptCache | None, dict[str, str]]:
    """The prompt cache saved in `path`, checked against `expect`, and the file's metadata
    (what the caller stored there too): the file is read once.

    Args:
        path: a file written by `save_prompt_cache`.
        model: the model to attach it to (`expect` should be its `fingerprint`).
        expect: what the cache must be valid for; `keep` None takes the file's.
        recompute: on a mismatch give None for the cache (the caller prefills again) instead
            of raising.

    Raises:
        PromptCacheMismatch: made for another model, tokenizer, template, dtype or KV settings.
        PromptCacheError: unreadable, truncated or corrupt.
    """
    path = Path(path).expanduser()
    meta = read_metadata(path)
    try:
        found = file_fingerprint(meta)
    except (KeyError, TypeError, ValueError):
        raise PromptCacheError(f"{path}: corrupt prompt-cache metadata") from None
    kinds = expect.differences(found)
    if kinds:
        if recompute:
            return None, meta
        what = _what(kinds[0]) if kinds[0] != "kv" else _kv_difference(expect, found)
        raise PromptCacheMismatch(f"{path}: made for another {what}", kinds[0])
    try:
        arrays = mx.load(str(path), format="safetensors")
        if not isinstance(arrays, dict):
            raise ValueError("not a table of tensors")
        names = sorted(arrays)
        if parse_json(meta["crc32"]) != [_crc(arrays[n]) for n in names]:
            raise ValueError("checksum")
        return PromptCache.restore(model, arrays, parse_json(meta["cache"])), meta
    except (RuntimeError, ValueError, LookupError, TypeError, AttributeError, ArithmeticError) as e:
        problem = "its data fail their checksum" if str(e) == "checksum" else str(e).split("\n")[0]
        raise PromptCacheError(f"{path}: corrupt prompt-cache file ({problem})") from None


def _kv_difference(expect: Fingerprint, found: Fingerprint) -> str:
    def settings(fp: Fingerprint) -> dict[str, Any]:
        return {**fp.kv.meta(), "window": fp.window, "keep": fp.keep}

    want, have = settings(expect), settings(found)
    diff = [f"{k} {have[k]} (this session: {v})" for k, v in want.items() if v != have[k]]
    diff = [d for d in diff if not (d.startswith("keep") and expect.keep is None)]
    return "KV cache setting: " + ", ".join(diff).replace("start", "KV start")


def _what(kind: str) -> str:
    return {
        "model": "model (weights, config or RoPE settings)",
        "tokenizer": "tokenizer",
        "template": "chat template",
        "dtype": "compute dtype",
    }[kind]


def cache_file_name(fp: Fingerprint, ids: Sequence[int]) -> str:
    """A file name for the cache of `ids` under `fp`: same ids and settings, same name (a
    server's --cache-dir keys its files so)."""
    key = json.dumps(fp.to_metadata(), sort_keys=True).encode()
    return _sha(key, np.asarray(ids, dtype=np.int64).tobytes()) + ".safetensors"


def prune_cache_dir(folder: str | Path, max_bytes: int) -> list[Path]:
    """Delete the least recently modified prompt-cache files of `folder` until the rest fit in
    `max_bytes` (touch a file when it is used to keep it); returns the deleted paths. Only files
    named by `cache_file_name` whose header says they are prompt caches count or go: whatever
    else shares the folder (a model's weights, a temporary file) is left alone."""
    files = []
    for f in Path(folder).glob("*.safetensors"):
        if not CACHE_FILE_NAME.fullmatch(f.name) or f.is_symlink():
            continue
        try:
            read_metadata(f)
            st = f.stat()
        except (PromptCacheError, FileNotFoundError):  # not a cache, or deleted meanwhile
            continue
        files.append((st.st_mtime, st.st_size, f))
    files.sort()
    total, deleted = sum(size for _, size, _ in files), []
    for _, size, f in files:
        if total <= max_bytes:
            break
        f.unlink(missing_ok=True)
        total -= size
        deleted.append(f)
    return deleted
