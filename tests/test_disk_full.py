"""A full disk: whatever was being written is not left half-written under its name, what was there before stays,
and the command ends with one line naming the file, exit code 2.

The disk is a small tmpfs mounted in a mount namespace of the test's own (`unshare -m`, as root), which vanishes
with the command; the command and a look at what it left run inside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from helpers import TINY_KB_ENCODER, cli_env, skip_unless_required, write_documents

pytestmark = pytest.mark.slow  # a real command (or Python) in a namespace of its own

CAN_MOUNT = os.getuid() == 0 and shutil.which("unshare") is not None


def _on_a_full_disk(tmp_path, size: str, script: str) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a fresh tmpfs of `size` at $DISK; its output and exit code."""
    skip_unless_required(
        None if CAN_MOUNT else "mounting a tmpfs needs root and unshare", "RAG_LIGHTNING_REQUIRE_MULTINODE"
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$DISK" && {script}'],
        cwd=tmp_path,
        env={**cli_env(), "DISK": str(disk)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_build_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    source = tmp_path / "kb.jsonl"
    write_documents(source, 40)
    proc = _on_a_full_disk(
        tmp_path,
        "48k",
        f"{sys.executable} -m rag_lightning.build_kb {' '.join(TINY_KB_ENCODER)} "
        f'kb.source={source} kb.dir="$DISK/kb" hydra.run.dir={tmp_path / "run"}; code=$?; '
        'find "$DISK/kb" -mindepth 1 -printf "left: %p\\n"; exit $code',
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {tmp_path / 'disk' / 'kb'}/") and "No space left on device" in errors[0]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("left: ")], proc.stdout[-3000:]


CHECKPOINTS = """
import os, sys, torch
from rag_lightning.callbacks.checkpoints import AtomicCheckpointIO
path = os.path.join(os.environ["DISK"], "last.ckpt")
io = AtomicCheckpointIO()
io.save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, path)
try:
    io.save_checkpoint({"step": 2, "weights": torch.zeros(100_000)}, path)
except OSError as e:
    print("refused:", e.errno, e.filename)
print("kept:", torch.load(path, weights_only=True)["step"], sorted(os.listdir(os.environ["DISK"])))
"""


def test_a_checkpoint_on_a_full_disk_leaves_the_last_one_whole(tmp_path):
    """Lightning's own writing copied a temporary file from /tmp over last.ckpt, truncated on a full disk."""
    proc = _on_a_full_disk(tmp_path, "64k", f"{sys.executable} -c '{CHECKPOINTS}'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    disk = tmp_path / "disk"
    assert proc.stdout.splitlines() == [f"refused: 28 {disk / 'last.ckpt'}", "kept: 1 ['last.ckpt']"], proc.stdout
