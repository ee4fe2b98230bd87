"""Outputs written whole or not at all: a temporary file or folder beside the target, renamed
over it when complete; SIGTERM and SIGHUP stop the writing as Ctrl-C does, so that it cleans up;
and what a killed process left (it could not clean up) is found and removed by the next run.
JSON we did not write is read within a bound on its nesting (`parse_json`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Our temporary folders: .OUT.tmp-PID-XXXXXXXX (being written) and .OUT.old-PID-XXXXXXXX (an old
# OUT while a new one replaces it), each with a MARKER naming the process and host that made it.
TEMP_NAME = re.compile(r"\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[a-z0-9_]{8}")
MARKER = ".smollm3-mlx-convert.json"
# Our temporary files: .NAME.HOST-PID-XXXXXXXX.tmp[.ext], HOST a hash of the machine's name (a
# process id means something only there); too small for a marker inside, the name says it all.
TEMP_FILE = re.compile(
    r"\.(?P<out>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}\.tmp(\..+)?"
)
STALE_AFTER = 24 * 3600  # seconds: another machine's temporary file this old is abandoned
MAX_JSON_DEPTH = 64  # nesting: a request or a file of ours never comes near


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C raises KeyboardInterrupt, so that both clean up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated, so that a killed writer cleans up after itself.
    Only where Python would otherwise die of them: a handler the application set stays."""
    signums = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous, fired = {}, []

    def terminate(signum: int, frame: object) -> None:
        if not fired:  # once: a second signal must not cut the clean-up short
            fired.append(signum)
            raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, terminate)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename, so that a failure leaves the old file whole."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside `path` for a writer that takes a file name; when the block ends
    without error it is synced and renamed over `path`, else removed (the old file stays whole).
    `suffix` ends the temporary name (mx.save_safetensors appends ".safetensors" otherwise)."""
    prefix = f".{path.name}.{_host_tag()}-{os.getpid()}-"  # stale once the process is gone
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp's is 0o600
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk with the folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def make_temp(out: Path, kind: str) -> Path:
    """A hidden folder beside `out`, named and marked as ours so that a later run can tell it
    is stale once this process is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    tmp.chmod(0o755)
    return tmp


def unmark(folder: Path) -> None:
    """Take the marker out of a finished folder, before it becomes the output."""
    (folder / MARKER).unlink()


def replace_folder(tmp: Path, out: Path) -> list[int]:
    """Rename the finished folder to `out`; an old `out` is removed only after that. Ctrl-C,
    SIGTERM and SIGHUP wait until the swap and the removal are done (a stop half way would leave
    the old folder beside the new one); the signals that came are returned, for the caller to
    stop on, knowing that `out` now holds the new folder."""
    with held_signals() as held:
        if not (out.exists() or out.is_symlink()):
            tmp.rename(out)
            return held
        old = make_temp(out, "old")
        out.rename(old / out.name)
        try:
            tmp.rename(out)
        except BaseException:
            (old / out.name).rename(out)
            remove_temp(old)
            raise
        remove_temp(old)
    return held


def remove_temp(folder: Path) -> None:
    """Remove one of our temporary folders, its marker last: a process killed half way leaves a
    folder that the next run still knows as ours, and removes."""
    for path in folder.iterdir():
        if path.name != MARKER:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def held_signals() -> Iterator[list[int]]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends; yields the list of those that came.
    Off the main thread (where Python runs no handler) the block runs as it is."""
    held: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        names = ("SIGINT", "SIGTERM", "SIGHUP")
        for signum in [getattr(signal, n) for n in names if hasattr(signal, n)]:
            if signal.getsignal(signum) is not None:  # None: a handler Python cannot put back
                previous[signum] = signal.signal(signum, lambda n, _: held.append(n))
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def remove_stale(folder: Path, note: Callable[[str], None] | None) -> None:
    """Remove the temporary folders that killed processes left in `folder`, and say so (to
    `note`, else as a warning). An old OUT set aside before the kill is put back if OUT is gone."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        match = TEMP_NAME.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or not yet marked
        if not isinstance(marker, dict) or marker.get("pid") != int(match["pid"]):
            continue
        if marker.get("host") != socket.gethostname() or _alive(marker["pid"]):
            continue  # alive, or another machine's on a shared disk (it may be alive)
        pid = marker["pid"]
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        old, out = path / match["out"], folder / match["out"]
        if match["kind"] == "old" and old.exists() and not (out.exists() or out.is_symlink()):
            old.rename(out)
            message = f"put back {out}, set aside by a conversion (process {pid}) that was killed"
        else:
            message = (f"removed {path} ({human_size(size)}), left by a conversion (process "
                       f"{pid}) that was killed")  # fmt: skip
        remove_temp(path)
        if note is None:
            warnings.warn(message, stacklevel=3)
        else:
            note(message)


def remove_stale_files(folder: Path, out: re.Pattern[str]) -> list[Path]:
    """Remove the temporary files of `atomic_path` that killed processes left in `folder` for
    targets named like `out` (a process of this machine that is gone, or older than
    STALE_AFTER); returns them. Nothing else is touched, a live writer's file included."""
    removed = []
    for path in folder.glob(".*.tmp*"):
        match = TEMP_FILE.fullmatch(path.name)
        if not match or not out.fullmatch(match["out"]) or not path.is_file():
            continue
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            continue  # renamed or removed by its writer meanwhile
        ours = match["host"] == _host_tag()
        if (ours and not _alive(int(match["pid"]))) or age > STALE_AFTER:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def parse_json(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for text we did not write: nesting deeper than `max_depth` (which would
    exhaust the stack of a recursive reader: the parser, a schema compiler) is a ValueError,
    as malformed JSON is; so is bytes that are not UTF-8."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"nested more than {max_depth} levels deep")
        items = v.values() if isinstance(v, dict) else v
        stack.extend((x, depth + 1) for x in items if isinstance(x, (dict, list)))
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def existing_parent(path: Path) -> Path:
    """The nearest folder above `path` that exists (where its disk space can be asked)."""
    for parent in path.resolve().parents:
        if parent.exists():
            return parent
    return Path("/")


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
