"""slurm/train.sbatch on a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge), started by the test:
a job whose Ray does not come up, a job requeued by USR1 that resumes, and a Hydra sweep of SLURM jobs. A fresh job
that trains to the end is tests/test_multinode.py's two-node one (test_sbatch_on_two_slurm_nodes_trains_across_both).

Marked `slurm`. Without root or the SLURM packages these tests are skipped, unless
RAG_LIGHTNING_REQUIRE_SLURM=1 (set by .ci/run, which installs the packages): then they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT, TINY, checkpoint_step, missing_slurm, skip_unless_required

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm_cluster():
    skip_unless_required(missing_slurm(), "RAG_LIGHTNING_REQUIRE_SLURM")
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "slurm" / "local_cluster.sh")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _submit(run_dir: Path, env: dict, *overrides: str) -> str:
    """sbatch train.sbatch from the environment running the tests: its python first on PATH, as after activating it."""
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={run_dir}.out",
            "--cpus-per-task=2",
            str(REPO_ROOT / "slurm" / "train.sbatch"),
            "experiment=tiny",
            *overrides,
        ],
        cwd=REPO_ROOT,
        env={**env, "RUN_DIR": str(run_dir), "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((word.split("=", 1)[1] for word in out.split() if word.startswith(f"{field}=")), "")


def _wait_until(condition, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.is_file() else "(no job output)"
            raise AssertionError(f"timed out waiting for {what}; job output:\n{tail}")
        time.sleep(1)


@pytest.mark.parametrize(
    "ray_env, expected",
    [
        # `ray start` exits at once, here on a worker port Ray refuses: its own error, then the job's reason
        (
            {"RAY_START_ARGS": "--min-worker-port=1"},
            [
                "ValueError: min_worker_port must be 0 or an integer between 1024 and 65535.",
                "train.sbatch: Ray did not come up (the head at ",
                "exited with status 1 (its output is above)",
            ],
        ),
        # a head still not answering when the wait is over (a wait of 0 s: never)
        (
            {"RAY_START_TIMEOUT": "0"},
            ["train.sbatch: Ray did not come up (the head at ", "within RAY_START_TIMEOUT=0 s"],
        ),
    ],
    ids=["ray-start-exits", "not-up-in-time"],
)
def test_a_ray_head_that_does_not_come_up_fails_the_job_with_the_reason_in_its_output(
    slurm_cluster, tmp_path, subprocess_env, ray_env, expected
):
    run_dir = tmp_path / "run"
    job = _submit(run_dir, {**subprocess_env, **ray_env})
    log = Path(f"{run_dir}.out")
    _wait_until(
        lambda: _job_field(job, "JobState") not in ("PENDING", "RUNNING", "COMPLETING"), 300, "the job to end", log
    )
    output = log.read_text()
    assert _job_field(job, "JobState") == "FAILED" and _job_field(job, "ExitCode") == "1:0", output[-3000:]
    for text in expected:
        assert text in output, output[-3000:]
    assert not run_dir.exists(), "the job stopped before any training step"


def test_usr1_saves_requeues_and_the_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path, subprocess_env):
    """USR1 (what --signal=USR1@... sends before the time limit) to the job's steps: the trainer saves an HPC
    checkpoint and requeues the job; the requeued job resumes from its newest checkpoint in the same run dir and
    finishes. USR1 is sent once the first periodic checkpoint (step 20) is written, 80 steps before the end."""
    run_dir, steps = tmp_path / "run", 100
    job = _submit(
        run_dir,
        subprocess_env,
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=50",
        "checkpoint_every_n_steps=20",
        "trainer.log_every_n_steps=5",
    )
    log = Path(f"{run_dir}.out")
    _wait_until(lambda: any((run_dir / "checkpoints").glob("step*.ckpt")), 300, "a periodic checkpoint", log)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    _wait_until(lambda: any(run_dir.glob("hpc_ckpt_*.ckpt")), 120, "the HPC checkpoint", log)
    _wait_until(
        lambda: _job_field(job, "Restarts") == "1" and _job_field(job, "JobState") == "PENDING", 120, "the requeue", log
    )
    # a requeued job waits about 2 minutes before it may start again; let it start now
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    _wait_until(lambda: _job_field(job, "JobState") == "COMPLETED", 400, "the requeued job to finish", log)

    hpc = next(run_dir.glob("hpc_ckpt_*.ckpt"))
    saved_step = checkpoint_step(hpc)
    assert 0 < saved_step < steps
    results = json.loads((run_dir / "results.json").read_text())
    # the newest checkpoint: the HPC one, or one the job wrote in the moments it kept training while being requeued
    # (a periodic one, or last.ckpt after a validation)
    resumed = results["train/resumed_from"]
    assert Path(resumed).parent in (run_dir, run_dir / "checkpoints"), resumed
    assert checkpoint_step(resumed) >= saved_step, resumed
    assert results["train/steps"] == steps
    assert "initial/em" not in results, "a resumed job does not evaluate an untrained model again"
    output = log.read_text()
    assert f"job {job} (restart 0)" in output and f"job {job} (restart 1)" in output
    assert "Restoring states from the checkpoint path at " + resumed in output


def test_hydra_submitit_sweep_runs_one_slurm_job_per_run(slurm_cluster, tmp_path, subprocess_env):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_lightning.train",
            "-m",
            "hydra/launcher=slurm",
            "experiment=tiny",
            "seed=0,1",
            f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.mem_gb=2",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=20",
        ],
        cwd=REPO_ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("0", "1"):
        results = json.loads((sweep_dir / run / "results.json").read_text())
        assert results["train/steps"] == TINY.trainer.max_steps
    job_logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2, "one SLURM job per run"
