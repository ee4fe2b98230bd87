"""A local stand-in for the Hugging Face hub's download API, for tests of real hub-download code.

`HubServer` serves fake model repos from local folders over the endpoints huggingface_hub 2.4's
`snapshot_download` and `hf_hub_download` use (all read from its source):

- ``GET /api/models/{repo}/revision/{rev}``: model info; snapshot_download reads ``sha`` from it.
- ``GET /api/models/{repo}/tree/{rev}?recursive=true``: the file list (one page, no ``Link``).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a regular file answers 200 with ``ETag`` (its
  git blob id), ``X-Repo-Commit`` and ``Content-Length``. An LFS file (``lfs`` patterns) answers 302
  with ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``Location`` on a second "CDN" origin (same
  host, other port, like the real hub's CDN), which serves ``/lfs/{repo}/{path}``; the client stops
  at a redirect to another origin and downloads from ``Location``.
- ``Range: bytes=N-`` answers 206: huggingface_hub resumes a cut download with it.
- Errors are 404s with the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``), which `hf_raise_for_status` maps to `RepositoryNotFoundError`,
  `RevisionNotFoundError` and `RemoteEntryNotFoundError`.
- ``slow={"model.safetensors": 0.05}`` sends that file's body in 1 KiB pieces, sleeping that many
  seconds after each: a download still running when the test acts (a Ctrl-C, say).
- ``token="hf_..."`` makes every repo private: a hub request without ``Authorization: Bearer
  <token>`` answers 401 ``RepoNotFound``, as the hub does (the client raises
  `RepositoryNotFoundError`). The CDN origin, like the hub's signed URLs, checks nothing.
- No ``X-Xet-*`` header, ``Link: xet-auth`` or tree ``xetHash`` is ever sent, so hf_xet is never
  used, even though it is installed: every byte goes through plain HTTP ``http_get``.

Each repo has a fixed commit sha (derived from its repo id and files, or given in ``commits``);
the revision must be ``main`` or that sha. ``hub.requests`` records ``(method, path)`` of every
request on both origins, ``hub.fetched(repo)`` the files whose bodies were sent.

Dropped connections: ``drop={"model.safetensors": n}`` cuts the first ``n`` GETs of that file
(``None``: every GET): the full ``Content-Length`` is announced, the body is sent up to byte
``drop_at`` of the file (default: half of it), then the socket is closed. What huggingface_hub 2.4's
`http_get` does then: the client raises ``httpx2.RemoteProtocolError`` ("peer closed connection
without sending complete message body"), which `http_get` treats as transient: it sleeps 1 s and
GETs again with ``Range: bytes=K-``, K being what it has written so far. It writes whole
``constants.DOWNLOAD_CHUNK_SIZE`` chunks (10 MiB) only, so for a smaller file K is 0 and it starts
over (patch that constant to exercise the ``Range`` path). After 5 attempts in a row that wrote
nothing new it re-raises ``httpx2.RemoteProtocolError`` (not an `HfHubHTTPError` nor an `OSError`),
deletes its temp file, and `snapshot_download` propagates the error as is. So ``n=1`` tests a
recovered download, ``None`` a failed one (6 GETs, 5 s of sleeps unless the test patches
``huggingface_hub.file_download.time``). ``hub.downloads`` lists ``(repo, path, first byte)`` of
every body sent, cut or not.

Pointing huggingface_hub at the server: it reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` (and its timeouts, xet switches, ...) once, into `huggingface_hub.constants`,
when first imported. A fresh process only needs the environment variables (``HF_ENDPOINT=hub.url``,
``HF_HOME=...``). Inside an already running test process, setting them changes nothing by itself;
`use_hub` sets them *and* patches the constants they feed, so code calling
``snapshot_download(repo_id)`` without ``endpoint=``/``cache_dir=`` (as the project does) hits the
server. Passing ``endpoint=hub.url, cache_dir=...`` explicitly also works, but not for offline mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Imported now, with the environment of the session: imported first inside use_hub, its constants
# would take the test's values for good, out of monkeypatch's reach.
from huggingface_hub import constants

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pytest

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # "org/name", or a legacy "name"
_API = re.compile(rf"/api/models/{_REPO}(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+))?(?P<sub>/.*)?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_CDN = re.compile(rf"/lfs/{_REPO}/(?P<path>.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass(frozen=True)
class HubFile:
    data: bytes
    blob_id: str  # git blob sha1: the ETag of a regular file
    sha256: str  # the ETag of an LFS file
    lfs: bool


def _scan(folder: Path, lfs: tuple[str, ...]) -> dict[str, HubFile]:
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data, path = file.read_bytes(), file.relative_to(folder).as_posix()
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs_file = any(fnmatch(path, pattern) for pattern in lfs)
        files[path] = HubFile(data, blob_id, hashlib.sha256(data).hexdigest(), lfs_file)
    return files


class HubServer:
    """``with HubServer({"org/name": folder}) as hub:`` serves the folders at ``hub.url``."""

    def __init__(
        self,
        repos: Mapping[str, Path],
        *,
        lfs: tuple[str, ...] = LFS_PATTERNS,
        drop: Mapping[str, int | None] | None = None,
        drop_at: int | None = None,
        token: str | None = None,
        slow: Mapping[str, float] | None = None,
        commits: Mapping[str, str] | None = None,
    ):
        self.token = token
        self.commits = dict(commits or {})  # repo -> a fixed commit sha, e.g. a pinned revision
        self.slow = dict(slow or {})  # filename -> seconds of sleep per KiB of body
        self.repos = {repo: _scan(Path(folder), lfs) for repo, folder in repos.items()}
        self.drop = dict(drop or {})  # filename -> GETs left to cut (None: all); mutable
        self.drop_at = drop_at
        self.requests: list[tuple[str, str]] = []
        self.downloads: list[tuple[str, str, int]] = []  # (repo, path, first byte) of each body
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    def commit(self, repo_id: str) -> str:
        if repo_id in self.commits:
            return self.commits[repo_id]
        listing = "".join(f"{p}:{f.blob_id}\n" for p, f in self.repos[repo_id].items())
        return hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    @property
    def url(self) -> str:
        return self._url(0)

    @property
    def cdn_url(self) -> str:
        return self._url(1)

    def _url(self, i: int) -> str:
        return f"http://127.0.0.1:{self._servers[i].server_address[1]}"

    def fetched(self, repo_id: str | None = None) -> list[str]:
        """Sorted repo paths whose bodies were sent by a GET (each once, however many GETs)."""
        return sorted({path for repo, path, _ in self.downloads if repo_id in (None, repo)})

    def start(self) -> HubServer:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True  # a stuck connection must not block stop()
            server.hub, server.role = self, role  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server, thread in zip(self._servers, self._threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _cut_this_get(self, path: str) -> bool:
        with self._lock:
            if path not in self.drop:
                return False
            left = self.drop[path]
            if left is None:
                return True
            if left > 0:
                self.drop[path] = left - 1
            return left > 0


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no idle keep-alive socket outlives a test.
    timeout = 10  # socket timeout: a silent client cannot pin a handler thread
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # hub.requests is the log

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _handle(self, head: bool) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub.requests.append((self.command, self.path))
        url = urlsplit(self.path)
        if self.server.role == "cdn":  # type: ignore[attr-defined]
            match = _CDN.fullmatch(url.path)
            repo, path = (match["repo"], unquote(match["path"])) if match else ("", "")
            if path not in hub.repos.get(repo, {}):
                return self._error(404, "EntryNotFound", "Entry not found", head)
            return self._send_file(hub, repo, path, {}, head)
        if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self._error(401, "RepoNotFound", "Invalid username or password.", head)
        if match := _API.fullmatch(url.path):
            sha = self._resolve_revision(hub, match["repo"], unquote(match["rev"] or "main"), head)
            if sha is None:
                return None
            if match["kind"] == "tree":
                recursive = parse_qs(url.query).get("recursive", [""])[0].lower() == "true"
                sub = unquote(match["sub"] or "").strip("/")
                return self._json(_tree(hub.repos[match["repo"]], sub, recursive), head)
            if match["sub"]:
                return self._error(404, None, "Not found", head)
            return self._json(_model_info(hub, match["repo"], sha), head)
        if match := _RESOLVE.fullmatch(url.path):
            repo, path = match["repo"], unquote(match["path"])
            sha = self._resolve_revision(hub, repo, unquote(match["rev"]), head)
            if sha is None:
                return None
            file = hub.repos[repo].get(path)
            if file is None:
                return self._error(404, "EntryNotFound", "Entry not found", head, commit=sha)
            headers = {"X-Repo-Commit": sha}
            if not file.lfs:
                return self._send_file(
                    hub, repo, path, {**headers, "ETag": f'"{file.blob_id}"'}, head
                )
            self.send_response(302)
            for key, value in {
                **headers,
                "X-Linked-Etag": f'"{file.sha256}"',
                "X-Linked-Size": str(len(file.data)),
                "Location": f"{hub.cdn_url}/lfs/{repo}/{quote(path)}",
                "Content-Length": "0",
            }.items():
                self.send_header(key, value)
            self.end_headers()
            return None
        return self._error(404, None, "Not found", head)

    def _resolve_revision(self, hub: HubServer, repo: str, rev: str, head: bool) -> str | None:
        if repo not in hub.repos:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        sha = hub.commit(repo)
        if rev not in ("main", sha):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, head)
            return None
        return sha

    def _send_file(
        self, hub: HubServer, repo: str, path: str, headers: dict[str, str], head: bool
    ) -> None:
        data = hub.repos[repo][path].data
        start, end, status = 0, len(data), 200
        if match := _RANGE.fullmatch(self.headers.get("Range", "")):
            start, end, status = int(match[1]), len(data), 206
            if match[2]:
                end = min(end, int(match[2]) + 1)
            if start >= len(data):
                return self._error(416, None, "Range not satisfiable", head)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        name = path.rsplit("/", 1)[-1]
        self._send(
            status,
            data[start:end],
            head,
            {
                **headers,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
            cut=None if head else self._cut(hub, repo, path, start, len(data)),
            pause=hub.slow.get(path),
        )

    def _cut(self, hub: HubServer, repo: str, path: str, start: int, size: int) -> int | None:
        """How many body bytes to send before dropping the connection; None: all of them."""
        with hub._lock:
            hub.downloads.append((repo, path, start))
        if not hub._cut_this_get(path):
            return None
        drop_at = size // 2 if hub.drop_at is None else hub.drop_at
        return max(0, drop_at - start)

    def _send(
        self,
        status: int,
        body: bytes,
        head: bool,
        headers: dict[str, str],
        cut: int | None = None,
        pause: float | None = None,
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))  # the full length, even when cut
        self.end_headers()
        if head:
            return
        try:
            body = body if cut is None else body[:cut]
            piece = 1024 if pause else max(len(body), 1)
            for i in range(0, len(body), piece):
                self.wfile.write(body[i : i + piece])
                if pause:
                    time.sleep(pause)
            if cut is not None:
                # FIN, not RST: the client must see a short body (RemoteProtocolError), as when a
                # peer or proxy goes away mid-transfer.
                self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client gave up first

    def _json(self, payload: object, head: bool) -> None:
        self._send(200, json.dumps(payload).encode(), head, {"Content-Type": "application/json"})

    def _error(
        self, status: int, code: str | None, message: str, head: bool, commit: str | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:  # the hub names the commit of a missing entry; the client caches the miss
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), head, headers)


def _model_info(hub: HubServer, repo: str, sha: str) -> dict:
    return {
        "id": repo,
        "modelId": repo,
        "sha": sha,
        "private": False,
        "siblings": [{"rfilename": path} for path in hub.repos[repo]],
    }


def _tree(files: Mapping[str, HubFile], sub: str, recursive: bool) -> list[dict]:
    prefix = f"{sub}/" if sub else ""
    entries, folders = [], set()
    for path, file in files.items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        if not recursive and "/" in rest:
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        entry = {"type": "file", "oid": file.blob_id, "size": len(file.data), "path": path}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
        entries.append(entry)
    tree_id = "0" * 40  # nothing reads a folder's tree id
    return [{"type": "directory", "oid": tree_id, "path": f} for f in sorted(folders)] + entries


def reload_hub_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-read `huggingface_hub.constants` from the current environment, until the test ends.

    The module is executed afresh from its source and each constant that changed is patched in,
    so every environment-derived constant follows (endpoint, URL template, cache paths, offline
    mode, timeouts), and monkeypatch restores all of them at teardown. It also resets constants
    patched earlier in the test: patch those (e.g. DOWNLOAD_CHUNK_SIZE) after calling this.
    """
    spec = importlib.util.spec_from_file_location("_fresh_hub_constants", constants.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(constants, name, None) != value:
            monkeypatch.setattr(constants, name, value)


def use_hub(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, hf_home: Path, *, offline: bool = False
) -> None:
    """Point huggingface_hub at `endpoint` with its cache in `hf_home`, for this test only.

    Sets the environment (for subprocesses) and the import-time constants (for this process).
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_ASSETS_CACHE",
                "HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    if endpoint is not None:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reload_hub_constants(monkeypatch)
