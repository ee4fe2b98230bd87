"""The fake hub (hub_server.py) drives huggingface_hub's real download code, errors included."""

import os
import subprocess
import sys
import types
from pathlib import Path

import httpx2
import pytest
from hub_server import HubServer, use_hub
from huggingface_hub import constants, file_download, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "HuggingFaceTB/SmolLM3-3B"
ALLOW = ["*.json", "*.safetensors"]
WANTED = ["config.json", "model.safetensors"]


@pytest.fixture
def repo_dir(tmp_path):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "smollm3"}')
    (repo / "model.safetensors").write_bytes(os.urandom(5000))
    (repo / "pytorch_model.bin").write_bytes(os.urandom(300))  # must not be fetched
    (repo / "README.md").write_text("# fake\n")
    (repo / "sub" / "notes.txt").write_text("nested\n")
    return repo


@pytest.fixture
def hf_home(tmp_path):
    return tmp_path / "hf_home"


@pytest.fixture
def hub(repo_dir, hf_home, monkeypatch):
    with HubServer({REPO: repo_dir}) as server:
        use_hub(monkeypatch, server.url, hf_home)
        yield server


def retry_fast(monkeypatch):
    """http_get sleeps 1 s before each retry: record the sleeps instead, to stay fast. It resumes
    from whole DOWNLOAD_CHUNK_SIZE chunks only (10 MiB): 1 KiB ones make it resume our 5 KB file.
    Call after use_hub, which resets every constant."""
    calls = []
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=calls.append))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    return calls


def starts(hub, name="model.safetensors"):
    return [start for _, path, start in hub.downloads if path == name]


def assert_same_files(got, want, names):
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


@pytest.mark.parametrize("target", ["cache", "local_dir"])
def test_snapshot_download_gets_only_allowed_files(hub, repo_dir, hf_home, tmp_path, target):
    local_dir = tmp_path / "out" if target == "local_dir" else None
    path = snapshot_download(REPO, allow_patterns=ALLOW, local_dir=local_dir)

    sha = hub.commit(REPO)
    if local_dir is None:
        assert path == str(
            hf_home / "hub" / "models--HuggingFaceTB--SmolLM3-3B" / "snapshots" / sha
        )
    else:
        (local_dir / ".cache").rename(tmp_path / "metadata")  # huggingface_hub's own bookkeeping
    assert_same_files(local_dir or Path(path), repo_dir, WANTED)
    assert hub.fetched() == WANTED
    assert sorted(hub.requests) == sorted([
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/{sha}?recursive=true&expand=false"),
        ("HEAD", f"/{REPO}/resolve/{sha}/config.json"),
        ("GET", f"/{REPO}/resolve/{sha}/config.json"),
        ("HEAD", f"/{REPO}/resolve/{sha}/model.safetensors"),  # 302 to the CDN origin
        ("GET", f"/lfs/{REPO}/model.safetensors"),
    ])  # fmt: skip


def test_hf_hub_download_and_missing_entries(hub, repo_dir):
    assert Path(hf_hub_download(REPO, "sub/notes.txt")).read_bytes() == b"nested\n"
    assert hub.requests[0] == ("HEAD", f"/{REPO}/resolve/main/sub/notes.txt")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "nope.json")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("HuggingFaceTB/NoSuchModel", allow_patterns=ALLOW)


def test_private_repo_needs_the_token_from_hf_token(repo_dir, hf_home, monkeypatch):
    with HubServer({REPO: repo_dir}, token="hf_secret") as hub:
        use_hub(monkeypatch, hub.url, hf_home)  # clears HF_TOKEN
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(REPO, allow_patterns=ALLOW)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(REPO, allow_patterns=ALLOW)
        assert hub.fetched() == []
        monkeypatch.setenv("HF_TOKEN", "hf_secret")  # read at each call, not at import
        path = snapshot_download(REPO, allow_patterns=ALLOW)
    assert_same_files(Path(path), repo_dir, WANTED)


def test_cut_connection_is_resumed_with_range(repo_dir, hf_home, monkeypatch):
    with HubServer({REPO: repo_dir}, drop={"model.safetensors": 1}) as hub:
        use_hub(monkeypatch, hub.url, hf_home)
        sleeps = retry_fast(monkeypatch)
        path = snapshot_download(REPO, allow_patterns=ALLOW)
    assert_same_files(Path(path), repo_dir, WANTED)
    # Cut at byte 2500; 2 whole chunks were written, so the retry asks `Range: bytes=2048-`.
    assert starts(hub) == [0, 2048] and sleeps == [1]


def test_cut_connection_every_time_raises_and_leaves_no_file(repo_dir, hf_home, monkeypatch):
    with HubServer({REPO: repo_dir}, drop={"model.safetensors": None}) as hub:
        use_hub(monkeypatch, hub.url, hf_home)
        sleeps = retry_fast(monkeypatch)
        # httpx2's own error, not an HfHubHTTPError/OSError: callers must catch it explicitly.
        with pytest.raises(httpx2.RemoteProtocolError, match="without sending complete"):
            snapshot_download(REPO, allow_patterns=ALLOW)
        # 5 resumes in a row that bring no whole new chunk, then it gives up.
        assert starts(hub) == [0] + [2048] * 5 and sleeps == [1] * 5
        repo_cache = hf_home / "hub" / "models--HuggingFaceTB--SmolLM3-3B"
        blobs = sorted(p.name for p in (repo_cache / "blobs").iterdir())
        assert len(blobs) == 1 and not blobs[0].endswith(".incomplete")  # config.json only
        assert not list(repo_cache.rglob("model.safetensors"))

        hub.drop.clear()  # the network is back: a new call downloads everything
        path = snapshot_download(REPO, allow_patterns=ALLOW)
    assert_same_files(Path(path), repo_dir, WANTED)


def test_offline_mode_serves_the_warm_cache(hub, repo_dir, hf_home, monkeypatch):
    path = snapshot_download(REPO, allow_patterns=ALLOW)
    hub.requests.clear()
    use_hub(monkeypatch, hub.url, hf_home, offline=True)
    assert snapshot_download(REPO, allow_patterns=ALLOW) == path
    assert hub.requests == []  # not even tried, while the server is up
    hub.stop()
    assert snapshot_download(REPO, allow_patterns=ALLOW) == path
    assert_same_files(Path(path), repo_dir, WANTED)


def test_environment_alone_points_a_fresh_process_at_the_server(hub, repo_dir):
    # use_hub set HF_ENDPOINT and HF_HOME; a new interpreter reads them at import.
    code = (
        f"import huggingface_hub as h; print(h.snapshot_download({REPO!r}, allow_patterns={ALLOW}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_same_files(Path(out.stdout.strip()), repo_dir, WANTED)
    assert hub.fetched() == WANTED
