"""What `convert` refuses before it starts, in one line each: an output that would destroy the
source or the folder we are in, an upload that cannot happen, a download the disk cannot hold;
and the upload itself, once the folder is written."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

from .checkpoint import error_line
from .files import existing_parent, human_size
from .hub import download_bar


class ConvertError(ValueError):
    """A conversion that cannot be done or did not finish; one line saying why. Nothing is left."""


class ConvertInterrupted(ConvertError):
    """Ctrl-C, SIGTERM or SIGHUP stopped the conversion; `signum` says which."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def check_out(out: Path, source: Path | None) -> None:
    """Refuse an output whose replacement would destroy the source or the folder we are in."""
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        what = "the current folder" if target == cwd else "a folder holding the current folder"
        raise ConvertError(f"{out} is {what}; choose a new folder for the output")
    if source is None:
        return
    src = source.resolve()
    if target == src or src in target.parents or target in src.parents:
        relation = "is" if target == src else "lies inside" if src in target.parents else "holds"
        raise ConvertError(f"{out} {relation} the source folder {source}; choose another output")


def check_upload_repo(repo: str) -> None:
    """Refuse an upload that cannot happen before converting, not after."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo.count("/") != 1:
        raise ConvertError(f"upload repo {repo!r} must be USER/NAME or ORG/NAME")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConvertError(
            f"upload repo {repo!r} is not a valid repo id (letters, digits, '-', '_', '.'; "
            "at most 96 characters)"
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise ConvertError(f"cannot upload to {repo}: HF_HUB_OFFLINE is set")
    if not get_token():
        raise ConvertError(
            f"uploading to {repo} needs a hub token with write access: set HF_TOKEN or run "
            "`hf auth login`"
        )


def check_download_space(source: str, commit: str, patterns: list[str]) -> None:
    """Refuse a download the Hugging Face cache's disk cannot hold (sizes from a dry run)."""
    from huggingface_hub import constants, snapshot_download

    try:
        quiet = download_bar(lambda *_: None, "", threading.Event())  # draws nothing
        plan = snapshot_download(
            source, revision=commit, allow_patterns=patterns, dry_run=True, tqdm_class=quiet
        )
    except Exception:  # offline, say: the download itself will tell
        return
    need = sum(f.file_size or 0 for f in plan if f.will_download)
    cache = Path(constants.HF_HUB_CACHE)
    cache = cache if cache.exists() else existing_parent(cache)
    free = shutil.disk_usage(cache).free
    if need and free < need:
        raise ConvertError(
            f"not enough disk space to download {source}: it needs {human_size(need)}, {cache} has "
            f"{human_size(free)} free"
        )


def upload(folder: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model")
    except (Exception, KeyboardInterrupt) as e:
        raise ConvertError(f"{folder} was written, but the upload to {repo} failed: "
                           f"{error_line(e)}") from e  # fmt: skip
