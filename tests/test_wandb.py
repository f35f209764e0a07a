"""An offline W&B run of the CLI: the transaction log holds the config, the metrics and the sample table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from wandb_log import config_values, history_keys, read_records

from helpers import REPO_ROOT

SECRET = "0123456789abcdef0123456789abcdef01234567"  # a made-up API key (40 hex digits, as W&B's)


@pytest.mark.slow
def test_offline_wandb_run_logs_config_metrics_and_samples_and_never_the_key(tmp_path, subprocess_env):
    run_dir = tmp_path / "run"
    env = {
        **subprocess_env,
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": "1",  # as in a requeued job
        "WANDB_API_KEY": SECRET,
        "WANDB_MODE": "offline",
    }  # a key, but WANDB_MODE honoured
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_lightning.train",
            "experiment=tiny",
            "logger=wandb",
            "retriever.train_context_encoder=true",
            "index_refresh=background",
            "index_refresh.every_n_steps=3",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, "one offline run, made by rank 0"
    records = read_records(logs[0])
    keys = history_keys(records)
    for key in (
        "train/loss",
        "val/em",
        "val/f1",
        "val/recall@2",
        "test/em",
        "test/f1",
        "test/recall@2",
        "test/loss",
        "retrieval/latency_ms",
        "retrieval/id_entropy",
        "index/version",
        "index/staleness",
        "refresh/version",
        "refresh/completed",
        "trainer/global_step",
    ):
        assert key in keys, key
    assert "test/samples/_type" in keys and "val/samples/_type" in keys
    table = next(run_dir.glob("wandb/offline-run-*/files/media/table/test/samples_*.table.json"))
    content = json.loads(table.read_text())
    assert content["columns"] == ["question", "prediction", "answers", "retrieved", "top_score"]
    assert 0 < len(content["data"]) <= 16 and " | " in content["data"][0][3]  # n_docs=2 titles

    config = config_values(records)
    assert config["model"]["kind"] == "rag_sequence" and config["index_refresh"]["every_n_steps"] == 3
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.display_name) == ("4242", "4242-restart1")

    leaks = [str(p) for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"the W&B API key was written to {leaks}"
    assert SECRET not in proc.stdout + proc.stderr
