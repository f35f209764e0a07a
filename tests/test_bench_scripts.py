"""The bench scripts run as their users run them: each, cut to its smallest, prints its final JSON line with every
figure. (A change to RagModule's methods once broke bench/train_throughput.py unnoticed.) Nothing is asserted
about speed here: the benches report their targets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, cli_env


@pytest.mark.slow
def test_the_training_throughput_bench_prints_every_sides_figures():
    """One round of --quick on 500 passages, without the pretrained and SmolLM2 rows."""
    command = [sys.executable, "bench/train_throughput.py", "--quick", "--rounds", "1", "--passages", "500"]
    command += ["--pretrained-steps", "0", "--smollm2-steps", "0"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in ("sequence", "token", "causal_tiny", "causal_tiny_spare_core"):
        assert figures[f"ours_{row}"] > 0 and figures[f"floor_{row}"] > 0, row
        assert figures[f"floor_fraction_{row}"] == pytest.approx(figures[f"ours_{row}"] / figures[f"floor_{row}"], 1e-3)
    for kind in ("sequence", "token"):
        assert figures[f"ratio_{kind}"] == pytest.approx(figures[f"ours_{kind}"] / figures[f"baseline_{kind}"], 1e-3)
    assert isinstance(figures["meets_targets"], bool) and "ours_causal_smollm2" not in figures
