"""Where the reference folder is absent (a contributor's machine), the tests fetch the few files
they need from the hub once, at a pinned commit, checked against pinned sha256 sums."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from checkpoints import (
    REFERENCE_MODEL_DIR,
    REFERENCE_REPO,
    REFERENCE_REVISION,
    REFERENCE_SHA256,
    REPO_ROOT,
    fetch_reference,
    requires_reference,
)
from hub_server import HubServer, use_hub

pytestmark = requires_reference  # the files served to the fake hub


@pytest.fixture
def repo(tmp_path):
    """The hub repo as it is at the pinned commit, weights aside (never fetched)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in REFERENCE_SHA256:
        shutil.copy(REFERENCE_MODEL_DIR / name, repo / name)
    (repo / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    return repo


def serve(repo):
    return HubServer({REFERENCE_REPO: repo}, commits={REFERENCE_REPO: REFERENCE_REVISION})


def test_pinned_sums_are_those_of_the_reference_files():
    for name, sha256 in REFERENCE_SHA256.items():
        assert hashlib.sha256((REFERENCE_MODEL_DIR / name).read_bytes()).hexdigest() == sha256


def test_reference_files_are_fetched_once_at_the_pinned_commit(repo, tmp_path, monkeypatch):
    with serve(repo) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        folder, why = fetch_reference()
        assert why == ""
        assert sorted(hub.fetched(REFERENCE_REPO)) == sorted(REFERENCE_SHA256)
        assert all(REFERENCE_REVISION in path for _, path in hub.requests if "/resolve/" in path)
        requests = len(hub.requests)
        assert fetch_reference() == (folder, "")  # from the cache, without a request
        assert len(hub.requests) == requests
    snapshot = tmp_path / "hf_home" / "hub" / "models--HuggingFaceTB--SmolLM3-3B" / "snapshots"
    assert (folder / "SmolLM3-3B").resolve() == (snapshot / REFERENCE_REVISION).resolve()
    for name in REFERENCE_SHA256:
        assert (folder / "SmolLM3-3B" / name).read_bytes() == (repo / name).read_bytes()


def test_a_file_that_is_not_the_pinned_one_is_refused(repo, tmp_path, monkeypatch):
    (repo / "chat_template.jinja").write_text("{{ messages }}")
    with serve(repo) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_home")
        assert fetch_reference() == (
            None,
            f"chat_template.jinja of {REFERENCE_REPO}@{REFERENCE_REVISION[:12]} is not the "
            "pinned file",
        )


def test_offline_without_the_files_in_the_cache_says_why(tmp_path, monkeypatch):
    use_hub(monkeypatch, None, tmp_path / "hf_home", offline=True)
    folder, why = fetch_reference()
    assert folder is None and why.startswith(f"fetching {REFERENCE_REPO} failed: ")
    assert "\n" not in why


PROBE = """
from checkpoints import requires_reference

@requires_reference
def test_needs_the_reference():
    pass

def test_plain():
    pass
"""


def test_a_run_without_the_files_says_so_in_one_line_at_the_end(tmp_path):
    # A clone without ../shared/smollm3-reference: the test helpers and hooks, copied.
    tests = tmp_path / "clone" / "tests"
    tests.mkdir(parents=True)
    for name in ("checkpoints.py", "conftest.py"):
        shutil.copy(REPO_ROOT / "tests" / name, tests / name)
    (tests / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SMOLLM3_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")

    offline = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True, text=True, cwd=tests.parent, env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )  # fmt: skip
    assert offline.returncode == 0, offline.stdout
    lines = offline.stdout.splitlines()
    said = [line for line in lines if "reference files unavailable" in line]
    assert said == [
        f"1 test skipped: SmolLM3 reference files unavailable (fetching {REFERENCE_REPO} "
        + said[0].split(f"(fetching {REFERENCE_REPO} ", 1)[1]
    ]
    assert said[0].endswith("run once online to fetch them into the Hugging Face cache, or set "
                            "SMOLLM3_REFERENCE_DIR")  # fmt: skip
    assert lines.index(said[0]) >= len(lines) - 3 and "1 passed, 1 skipped" in lines[-1]
