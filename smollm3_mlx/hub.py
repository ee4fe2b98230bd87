"""A model source to a local folder: a folder as it is, an OWNER/NAME hub repo id downloaded (or
found in the Hugging Face cache), with Ctrl-C stopping a download and hub errors in one line."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from .checkpoint import ModelLoadError

DEFAULT_REPO = "HuggingFaceTB/SmolLM3-3B"

# What a model folder needs from the hub: weights, configs, tokenizer and template.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.md"]

Progress = Callable[[int, int, str], None]  # (done, total, label)


def resolve_model_path(
    path_or_repo: str | Path,
    revision: str | None = None,
    *,
    patterns: list[str] = HUB_PATTERNS,
    progress: Progress | None = None,
) -> Path:
    """A local folder as is; anything else is a hub repo id, downloaded (or found in the cache).

    Only the files matching `patterns` are fetched; Ctrl-C stops a download at once.

    Args:
        progress: called as (bytes done, bytes in all, label) instead of drawing tqdm bars.

    Raises:
        ModelLoadError: not a folder nor a repo id, a revision for a folder, a failed download.
    """
    source = str(path_or_repo)
    local = local_source(source, revision)
    if local is not None:
        return local
    try:
        return Path(snapshot(source, revision, progress, patterns))
    except Exception as e:  # network, auth, unknown repo or revision, offline cache miss
        raise ModelLoadError(
            f"{source}: no local folder of that name, and the hub download failed: {hub_error(e)}"
        ) from e


def local_source(source: str, revision: str | None) -> Path | None:
    """The folder `source` names; None when it is a hub repo id (OWNER/NAME): the one rule that
    `load` and `convert` share.

    Raises:
        ModelLoadError: a revision for a folder, a path (it exists, or starts with . / ~) that is
            no folder, or a name that is neither a folder nor OWNER/NAME.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise ModelLoadError(f"{path} is a local folder; --revision applies to hub repos only")
        return path
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"{path}: not a model folder")
    if source.count("/") != 1:  # every SmolLM3 repo lives under an owner: "typo" is a typo
        raise ModelLoadError(
            f"{source}: no local folder of that name, and not a hub repo id (OWNER/NAME)"
        )
    return None


def snapshot(
    source: str,
    revision: str | None,
    progress: Progress | None,
    patterns: list[str],
    offset: int = 0,
) -> str:
    """snapshot_download on a thread of its own, so that Ctrl-C stops it: huggingface_hub
    itself would let KeyboardInterrupt through only once every file it started is complete.
    `offset`: bytes an earlier call reported, added to this one's progress."""
    from huggingface_hub import snapshot_download  # only when the hub is really needed

    cancel, result = threading.Event(), {}
    bar = download_bar(progress, f"downloading {source}", cancel, offset)

    def fetch() -> None:
        try:
            result["folder"] = snapshot_download(
                source, revision=revision, allow_patterns=patterns, tqdm_class=bar
            )
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=fetch, name="smollm3-mlx-download", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        cancel.set()  # each download thread stops at its next block of bytes
        thread.join(timeout=10)
        raise
    if "error" in result:
        raise result["error"]
    return result["folder"]


def download_bar(
    progress: Progress | None, label: str, cancel: threading.Event, offset: int = 0
) -> type:
    """A tqdm class for snapshot_download that stops the download once `cancel` is set, and
    with a `progress` callback draws nothing but hands it the byte counts (bytes written, not the
    network's), so that one bar shows the download and the conversion."""
    from huggingface_hub.utils import tqdm

    lock = threading.Lock()

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            name = kwargs.get("name") or ""
            self.reports = kwargs.get("unit") == "B" and not name.endswith(".transfer")
            if progress is not None:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise _Cancelled("download cancelled")
            if progress is None:
                return super().update(n)
            with lock:  # the files download on several threads
                self.n += n or 0
                done, total = int(self.n), int(self.total or 0)
            if self.reports and total:
                progress(offset + min(done, total), offset + total, label)
            return None

    return Bar


class _Cancelled(Exception):
    """Raised inside huggingface_hub's download threads to stop them."""


def hub_error(e: Exception) -> str:
    """Why a hub download failed, in one line: the hub's own reason when it sent one."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):  # offline, or the hub unreachable: not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return f"not in the Hugging Face cache ({why})"
    text = str(e).strip()
    text = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    reason = (getattr(e, "server_message", None) or "").strip()
    if reason:
        text = f"{text.rstrip('.')}: {reason.splitlines()[0]}"
    if isinstance(e, RepositoryNotFoundError):  # what the hub answers for private repos too
        text += " (a private or gated repo needs HF_TOKEN with access)"
    return text
