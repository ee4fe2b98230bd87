"""The server's `--cache-dir`: prompt caches kept on disk across restarts, within a byte budget.

Each file is a `PromptCache` saved by cache_file.py, named by its fingerprint and ids, with its ids
also in its metadata so that the folder is indexed from the headers alone. A file made for another
model or other KV settings is left alone and never used; one of ours whose data are corrupt is
deleted. Only files of ours are ever deleted: named as `cache_file_name` names them and, unless the
folder is ours (made by us: it carries MARKER), with a prompt-cache header. Whatever else the folder
holds is neither read past its header, nor counted against the budget, nor touched; the temporary
files of a writer that was killed are removed at start. A failed write (a full disk) costs the
file, never the request. Used on the engine's worker thread only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..cache import KVSettings, PromptCache, is_prefix, longest_shared
from ..cache_file import (
    CACHE_FILE_NAME,
    Fingerprint,
    PromptCacheError,
    cache_file_name,
    file_fingerprint,
    fingerprint,
    load_prompt_cache,
    prune_cache_dir,
    read_metadata,
    save_prompt_cache,
)
from ..files import parse_json, remove_stale_files

DEFAULT_DIR_BYTES = 8 * 1024**3
MIN_TOKENS = 256  # a shorter prompt prefills faster than a file is written and read
MARKER = ".smollm3-mlx-cache-dir"  # in a folder we made (it was missing or empty)


class CacheDir:
    """Prompt caches in `folder` (created if missing), at most `max_bytes` of them.

    Args:
        folder: the directory; files of other models or settings may share it.
        model, tokenizer: the engine's.
        kv: the engine's KV settings (a cache of other settings is never used).
        max_bytes: the folder's budget; the least recently used files go first.
        min_tokens: the fewest ids worth a file.
    """

    def __init__(self, folder, model, tokenizer, *, kv: KVSettings | None = None,
                 max_bytes: int = DEFAULT_DIR_BYTES, min_tokens: int = MIN_TOKENS):  # fmt: skip
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ours = _mark(self.folder)
        self.model, self.max_bytes, self.min_tokens = model, max_bytes, min_tokens
        fresh = PromptCache.new(model, kv=kv or KVSettings())
        self.fp: Fingerprint = fingerprint(
            model, tokenizer, kv=fresh.kv, window=fresh.window, keep=fresh.keep
        )
        self.index: dict[Path, list[int]] = {}
        remove_stale_files(self.folder, CACHE_FILE_NAME)
        for path in sorted(self.folder.glob("*.safetensors")):
            if CACHE_FILE_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                self._add(path)

    def _add(self, path: Path) -> None:
        try:
            meta = read_metadata(path)
        except PromptCacheError:  # truncated, corrupt, or not a prompt cache at all
            if self.ours:
                path.unlink(missing_ok=True)  # named as ours, in our folder: of no use to anyone
            return
        try:
            found = file_fingerprint(meta)
            ids = parse_json(meta["ids"]) if "ids" in meta else None
        except (KeyError, TypeError, ValueError):
            path.unlink(missing_ok=True)  # a prompt cache of ours, its metadata corrupt
            return
        if self.fp.differences(found) or ids is None:
            return  # another model's or settings' (or a chat's): not ours to use
        if isinstance(ids, list) and all(type(i) is int for i in ids):
            self.index[path] = ids
        else:
            path.unlink(missing_ok=True)

    def take(self, prompt: Sequence[int]) -> PromptCache | None:
        """The cache of the file sharing the longest prefix with `prompt` (at least
        `min_tokens`), or None. A file that fails to load is forgotten (deleted if corrupt)."""
        while True:
            best, n = longest_shared(self.index, self.index.__getitem__, prompt)
            if best is None or n < self.min_tokens:
                return None
            ids = self.index.pop(best)
            try:
                cache = load_prompt_cache(best, self.model, expect=self.fp, recompute=True)
            except PromptCacheError:
                best.unlink(missing_ok=True)
                continue
            if cache is None or cache.ids != ids:  # made for something else after all
                continue
            self.index[best] = ids
            _touch(best)
            return cache

    def put(self, cache: PromptCache) -> None:
        """Save `cache` unless it is short or already on disk; drop the files it extends and
        then the least recently used ones beyond the budget."""
        ids = list(cache.ids)
        if len(ids) < self.min_tokens or (cache.kv, cache.window, cache.keep) != (
            self.fp.kv, self.fp.window, self.fp.keep,
        ):  # fmt: skip
            return
        path = self.folder / cache_file_name(self.fp, ids)
        if path in self.index and path.exists():
            _touch(path)
            return
        try:
            save_prompt_cache(path, cache, self.fp, extra={"ids": json.dumps(ids)})
        except OSError:  # a full disk (cache_file turns MLX's writer errors into OSError)
            return  # costs a prefill later, never the request
        for other, held in list(self.index.items()):
            if is_prefix(held, ids):
                other.unlink(missing_ok=True)
                del self.index[other]
        self.index[path] = ids
        for gone in prune_cache_dir(self.folder, self.max_bytes):
            self.index.pop(gone, None)


def _mark(folder: Path) -> bool:
    """Whether `folder` is ours: it carries MARKER, or it is empty (just made) and now does."""
    marker = folder / MARKER
    if marker.is_file():
        return True
    try:
        if next(folder.iterdir(), None) is not None:
            return False  # someone else's folder: only files fingerprinted as ours are ours
        marker.write_text(json.dumps({"made_by": "smollm3-mlx serve --cache-dir"}) + "\n")
    except OSError:
        return False
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
