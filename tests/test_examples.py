"""The examples run as a user runs them, against the trained tiny SmolLM3."""

import subprocess
import sys

import pytest
from checkpoints import REPO_ROOT, requires_reference
from trained_model import trained_checkpoint

pytestmark = requires_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def example(name, *args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


def test_long_document_reads_past_the_trained_window_with_yarn(model_dir, tmp_path):
    # The trained model's window is 2048 tokens; a ~3000-token document needs YaRN (factor 2).
    doc = tmp_path / "doc.txt"
    doc.write_text("The audit found nothing unusual in the ledgers. " * 300)
    r = example("long_document.py", model_dir, doc, "What did the audit find?",
                "--max-context", 4096, "--max-tokens", 8)  # fmt: skip
    assert r.returncode == 0, r.stderr
    n = int(r.stderr.split(" prompt tokens")[0].lstrip("["))
    assert 2048 < n < 4096
    r = example("long_document.py", model_dir, doc, "What did the audit find?",
                "--max-context", 2048)  # fmt: skip
    assert r.returncode == 1 and "more than the 2048 allowed" in r.stderr
