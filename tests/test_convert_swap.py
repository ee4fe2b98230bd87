"""`convert --force`'s last step, the swap of a finished folder for the old OUT: a signal or a kill
there leaves no backup behind for good, and the message says what OUT now holds."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from checkpoints import REPO_ROOT, make_tiny_checkpoint
from typer.testing import CliRunner

from smollm3_mlx import files
from smollm3_mlx.cli import app as cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "bf16"
    return make_tiny_checkpoint(path, dtype="bfloat16", initializer_range=0.02)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out."))


def bits_of(out) -> int:
    return json.loads((out / "config.json").read_text())["quantization"]["bits"]


def test_sigterm_while_the_old_out_is_removed_finishes_the_swap_and_says_out_is_new(
    ckpt, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    assert (
        CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out), "--bits", "8"]).exit_code
        == 0
    )
    rmtree = shutil.rmtree

    def signalled(path, *args, **kwargs):  # SIGTERM arrives as the old OUT is being removed
        if ".out.old-" in str(path):
            os.kill(os.getpid(), signal.SIGTERM)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", signalled)
    r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out), "--force"])
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert (
        r.stderr
        == f"error: stopped by SIGTERM after {out} was written: it holds the new conversion\n"
    )
    assert bits_of(out) == 4  # the new conversion, whole
    assert leftovers(tmp_path) == []


KILLED_IN_REMOVAL = """
import os, signal, shutil, sys
from smollm3_mlx.cli.app import app

def first_unlink_then_killed(path, *args, **kwargs):
    # SIGKILL after rmtree's first unlink, taking names in sorted order (rmtree's own order is
    # the folder's, which may put the marker first)
    if ".out.old-" in str(path):
        for root, dirs, names in sorted(os.walk(path)):
            if names:
                os.unlink(os.path.join(root, sorted(names)[0]))
                os.kill(os.getpid(), signal.SIGKILL)

shutil.rmtree = first_unlink_then_killed
app(sys.argv[1:])
"""


def test_a_conversion_killed_while_removing_the_old_out_leaves_a_backup_the_next_run_removes(
    ckpt, tmp_path
):
    out = tmp_path / "out"
    assert (
        CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(out), "--bits", "8"]).exit_code
        == 0
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["convert", str(ckpt), "-o", str(out), "--force"]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_REMOVAL, *argv], capture_output=True, env=env, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert bits_of(out) == 4  # the swap was done; the old copy was being removed
    [backup] = leftovers(tmp_path)
    assert (tmp_path / backup / files.MARKER).exists()  # still known as ours

    r = CliRunner().invoke(cli.app, ["convert", str(ckpt), "-o", str(tmp_path / "other")])
    assert r.exit_code == 0, r.output
    assert f"removed {tmp_path / backup} (" in r.stderr
    assert leftovers(tmp_path) == []
    assert bits_of(out) == 4  # a complete OUT is never replaced by a backup


def test_a_backup_is_put_back_only_when_out_is_missing(ckpt, tmp_path):
    out = tmp_path / "out"
    backup = files.make_temp(out, "old")
    (backup / "out").mkdir()
    (backup / "out" / "config.json").write_text('{"old": true}')
    (backup / files.MARKER).write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
    dead = tmp_path / backup.name.replace(f"-{os.getpid()}-", f"-{2**22 + 1}-")
    backup.rename(dead)
    files.remove_stale(tmp_path, note=lambda line: None)
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    assert leftovers(tmp_path) == []
