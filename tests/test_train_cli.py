"""The whole job from the command line on a tiny config: data, KB, Ray service, evaluate, fit, test."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["model=rag_sequence"], ["model=rag_token", "index=hnsw", "index.shards=3"]],
                         ids=["sequence-flat", "token-hnsw"])
def test_tiny_training_run_writes_its_run_dir(tmp_path, subprocess_env, overrides):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rag_lightning.train", "experiment=tiny", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT, env=subprocess_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((run_dir / "results.json").read_text())
    for key in ("initial/em", "initial/recall@2", "test/em", "test/f1", "test/recall@2"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["train/steps"] == 6
    assert results["kb/num_passages"] == 40
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert results["best_checkpoint"].startswith(str(run_dir / "checkpoints"))
    assert (run_dir / "logs" / "metrics.csv").read_text().startswith("epoch,step")
    manifest = json.loads((run_dir / "kb" / "manifest.json").read_text())
    assert len(manifest["shards"]) == (3 if "index.shards=3" in overrides else 2)
