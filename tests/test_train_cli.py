"""The whole job from the command line on a tiny config: data, KB, Ray service, evaluate, fit, test."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rag_lightning.training.setup import is_first_process

from helpers import DDP_COMPARISON, REPO_ROOT, TINY, assert_trained_alike, checkpoint_step, run_cli


def _train_tiny(run_dir: Path, *overrides: str) -> dict:
    """`python -m rag_lightning.train experiment=tiny overrides...` into run_dir; its results.json."""
    proc = run_cli("rag_lightning.train", ["experiment=tiny", *overrides], REPO_ROOT, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    header, *rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    return [dict(zip(header.split(","), row.split(","))) for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [[], ["model=rag_token", "index=hnsw", "index.shards=3"]],
    ids=["sequence-flat", "token-hnsw"],
)
def test_tiny_training_run_writes_its_run_dir(tmp_path, request, overrides):
    """experiment=tiny as it is (rag_sequence on a Flat index of 2 shards: the session's tiny_run, conftest.py), and
    with RAG-Token on an HNSW index of 3 shards."""
    if overrides:
        run_dir = tmp_path / "run"
        results = _train_tiny(run_dir, *overrides)
    else:
        run_dir = request.getfixturevalue("tiny_run")
        results = json.loads((run_dir / "results.json").read_text())

    assert results["train/steps"] == TINY.trainer.max_steps
    assert results["kb/num_passages"] == TINY.data.demo_entities  # one passage per made-up person
    test_questions = len((run_dir / "data" / "test.jsonl").read_text().splitlines())
    assert results["initial/examples"] == results["test/examples"] == min(test_questions, TINY.data.max_eval_examples)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # the best checkpoint is the one of the best validation EM (the first of equals), at a validated step
    validations = [(int(row["step"]) + 1, float(row["val/em"])) for row in _metrics_rows(run_dir) if row["val/em"]]
    assert [step for step, _ in validations] == list(
        range(TINY.trainer.val_check_interval, TINY.trainer.max_steps + 1, TINY.trainer.val_check_interval)
    )
    best_step = max(validations, key=lambda v: v[1])[0]
    assert results["best_checkpoint"] == str(run_dir / "checkpoints" / f"best-step{best_step}.ckpt")
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {
        "epoch",
        "step",
        "train/loss",
        "val/em",
        "retrieval/id_entropy",
        "retrieval/latency_ms",
        "index/version",
    } <= set(header)
    manifest = json.loads((run_dir / "kb" / "manifest.json").read_text())
    assert len(manifest["shards"]) == (3 if "index.shards=3" in overrides else 2)


@pytest.mark.slow
def test_a_retriever_only_run_ranks_passages_and_stops_at_its_max_time(tmp_path):
    """evaluate_answers=false: validation and test score retrieval alone and the best checkpoint is the best
    validation MRR; trainer.max_time ends training long before max_steps."""
    run_dir, max_steps = tmp_path / "run", 100_000
    overrides = ["evaluate_answers=false", f"trainer.max_steps={max_steps}", "trainer.max_time=00:00:00:10"]
    results = _train_tiny(run_dir, *overrides)
    assert 0 < results["train/steps"] < max_steps
    assert {"test/recall@1", "test/mrr@100", "initial/recall@1"} <= set(results)
    assert not {"test/em", "test/f1", "test/loss", "initial/em"} & set(results)
    rows = _metrics_rows(run_dir)
    assert "val/em" not in rows[0]
    validations = [(int(row["step"]) + 1, float(row["val/mrr@100"])) for row in rows if row["val/mrr@100"]]
    assert validations, "no validation ran within max_time"
    best_step = max(validations, key=lambda v: v[1])[0]
    assert results["best_checkpoint"] == str(run_dir / "checkpoints" / f"best-step{best_step}.ckpt")


@pytest.mark.slow
def test_the_minilm_encoder_decoder_generator_trains_from_the_command_line(tmp_path):
    """model.generator.pretrained=minilm: the real pretrained MiniLM on both sides of the generator; the knowledge
    base tokenizes its passages with MiniLM's tokenizer without being told, and the job evaluates, trains and
    tests through it."""
    from rag_lightning.encoders.folders import bundled_minilm
    from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, tokenizer_fingerprint

    run_dir = tmp_path / "run"
    results = _train_tiny(
        run_dir,
        "model.generator.pretrained=minilm",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.max_eval_examples=4",
    )
    assert results["train/steps"] == 2 and results["test/examples"] == 4 and 0 <= results["test/em"] <= 1
    manifest = json.loads((run_dir / "kb" / "manifest.json").read_text())
    kb_tokenizer = load_generator_tokenizer(run_dir / "kb" / manifest["encoder"]["generator_tokenizer"])
    assert tokenizer_fingerprint(kb_tokenizer) == tokenizer_fingerprint(load_generator_tokenizer(bundled_minilm()))


@pytest.mark.slow
def test_tiny_end_to_end_run_refreshes_the_index_and_logs_retrieval_health(tmp_path):
    run_dir = tmp_path / "run"
    results = _train_tiny(
        run_dir,
        "retriever.train_context_encoder=true",
        "index_refresh=background",
        "index_refresh.every_n_steps=2",
        "index_refresh.blocking=true",
    )

    # refreshes after steps 2, 4 and 6 (blocking here, so none is skipped) made versions 1, 2 and 3
    kb_dir = run_dir / "kb"
    manifest = json.loads((kb_dir / "manifest.json").read_text())
    kept = sorted({name.split("/")[0] for name in manifest["files"] if name.startswith("v")})
    assert len(kept) == 2 and "v3" in kept
    assert json.loads((kb_dir / "v3" / "version.json").read_text())["global_step"] == TINY.trainer.max_steps
    # the test ran on the best checkpoint's index: the version its last training step searched (steps 1-2
    # searched v0, 3-4 v1, 5-6 v2), or, that one being pruned, v4 re-made from the checkpoint's own context encoder
    best_step = int(re.search(r"step(\d+)", results["best_checkpoint"]).group(1))
    searched = (best_step - 1) // 2
    pruned = searched not in (2, 3)
    active = 4 if pruned else searched
    assert manifest["active_version"] == results["kb/index_version"] == active
    weights_step = json.loads((kb_dir / f"v{active}" / "version.json").read_text())["global_step"]
    assert weights_step == (best_step if pruned else 2 * searched)
    assert (results["refresh/completed"], results["refresh/skipped"], results["refresh/failed"]) == (3 + pruned, 0, 0)
    assert (run_dir / "checkpoints" / "context_encoder" / "config.json").is_file()

    header, *rows = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    for key in (
        "index/version",
        "index/staleness",
        "retrieval/id_entropy",
        "refresh/version",
        "refresh/wall_s",
        "refresh/passages_per_s",
        "refresh/completed",
        "refresh/skipped",
        "refresh/failed",
    ):
        assert key in columns, key
    values = [dict(zip(columns, row.split(","))) for row in rows]
    entropies = [float(v["retrieval/id_entropy"]) for v in values if v["retrieval/id_entropy"]]
    assert entropies and all(0.0 <= e <= 1.0 for e in entropies)
    assert max(float(v["refresh/completed"]) for v in values if v["refresh/completed"]) == 3
    staleness = [float(v["index/staleness"]) for v in values if v["index/staleness"]]
    assert staleness and min(staleness) >= 0 and max(staleness) <= 2


@pytest.mark.slow
def test_two_process_ddp_run_matches_the_one_process_run(tmp_path, subprocess_env, one_process_reference):
    """2 CPU processes (gloo) with batch 4 each train on the same global batches as 1 process with batch 8 (the
    session's one_process_reference, conftest.py; tests/test_multinode.py compares two nodes with it too).

    Tolerance: the test loss (answer NLL over the whole split, after 10 steps at a high learning rate)
    within 1e-4 relative, so only float summation order may differ; EM, F1 and recall exactly equal.
    The 10 steps are one epoch of the 80 training questions. Each epoch's order is drawn from rank 0's
    global torch generator, which the encoders' dropout then moves differently on batches of 4 than of 8;
    and Lightning's DDP strategy re-seeds that generator when fit and test start, so the 1-process run
    uses the same strategy (on one device) to draw the same first order.
    The 9 test examples split 5 + 4 over the ranks: the metrics must be over all 9, not rank 0's 5.
    The DDP run logs to W&B (offline), from rank 0 only.
    """
    run_dir = tmp_path / "ddp"
    overrides = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=4", "logger=wandb"]
    proc = subprocess.run(
        [sys.executable, "-m", "rag_lightning.train", *DDP_COMPARISON, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stderr + proc.stdout
    # the tiny run will not export (mean-pooled, normalised): said once at start-up, by the first process alone
    assert (proc.stderr + proc.stdout).count("rag_lightning.export will refuse this run's checkpoints") == 1
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "only rank 0 logs to W&B"

    assert_trained_alike(one_process_reference, json.loads((run_dir / "results.json").read_text()))


@pytest.mark.slow
def test_a_trainer_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, subprocess_env):
    """Killed as soon as its first periodic checkpoint (step 20 of 60) is written."""
    run_dir, steps = tmp_path / "run", 60
    command = [
        sys.executable,
        "-m",
        "rag_lightning.train",
        "experiment=tiny",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=30",
        "checkpoint_every_n_steps=20",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=subprocess_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "checkpoints").glob("step*.ckpt")):
            assert first.poll() is None and time.monotonic() < deadline, "no periodic checkpoint appeared"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the local Ray the killed trainer had started
    saved = sorted(checkpoint_step(p) for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert not (run_dir / "results.json").exists() and saved and saved[-1] < steps
    first_rows = _metrics_rows(run_dir)
    assert any(row["test/em"] for row in first_rows)  # the evaluation before training

    second = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    # the newest checkpoint: a periodic one, or last.ckpt had the kill come after a validation
    assert checkpoint_step(results["train/resumed_from"]) >= saved[-1], "resumed from the newest checkpoint, not step 0"
    assert results["train/steps"] == steps
    assert "initial/em" not in results
    rows = _metrics_rows(run_dir)
    kept = [{key: row[key] for key in first_rows[0]} for row in rows[: len(first_rows)]]
    assert kept == first_rows and len(rows) > len(first_rows), "the resumed run appends to the first run's rows"
    assert any(row["test/em"] for row in rows[len(first_rows) :])


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-rank-0", "SIGINT-to-the-group"],
)
def test_a_stop_signal_ends_every_rank_of_a_ddp_run_together(tmp_path, subprocess_env, signum, to_group):
    """SIGTERM to rank 0, or Ctrl+C to the job's process group (what scancel and a terminal send), during a 2-process
    DDP run: every rank stops at the same step boundary and ends with one line and exit code 128 + the signal's
    number; the checkpoints written stay whole. (Lightning's own SIGTERM handler ran a broadcast wherever the
    signal landed, and both ranks hung in their collectives.) No evaluation before training: the signal comes
    during training."""
    run_dir, name = tmp_path / "run", signal.Signals(signum).name
    command = [
        sys.executable,
        "-m",
        "rag_lightning.train",
        "experiment=tiny",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.batch_size=4",
        "trainer.max_steps=5000",
        "trainer.val_check_interval=100",
        "checkpoint_every_n_steps=2",
        "evaluate_before_training=false",
        f"hydra.run.dir={run_dir}",
    ]
    with open(tmp_path / "stderr", "w+") as err:
        job = subprocess.Popen(
            command, cwd=REPO_ROOT, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 300
            while not list((run_dir / "checkpoints").glob("step*.ckpt")):
                assert job.poll() is None and time.monotonic() < deadline, "no periodic checkpoint appeared"
                time.sleep(0.2)
            # rank 0's rendezvous store, like everything else of the job, listens on loopback only
            listening = {
                ipaddress.ip_address(c.laddr.ip)
                for c in psutil.Process(job.pid).net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            }
            assert listening and all((getattr(ip, "ipv4_mapped", None) or ip).is_loopback for ip in listening), (
                listening
            )
            os.killpg(job.pid, signum) if to_group else job.send_signal(signum)
            job.wait(timeout=120)  # a guard against the hang, not a figure
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert job.returncode == 128 + signum, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    # one line a rank (rank 1's may be cut short by the group's SIGKILL above, once rank 0 has ended)
    assert errors and set(errors) == {f"error: stopped by {name}; unfinished files were removed"}, errors
    assert "Traceback" not in stderr and not (run_dir / "results.json").exists()
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
        assert checkpoint_step(checkpoint) >= 2, checkpoint


@pytest.mark.parametrize(
    ("launcher_env", "first"),
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "2", "NODE_RANK": "0"}, False),  # srun
        ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False),
        ({"NODE_RANK": "1"}, False),  # Lightning's
    ],
)
def test_only_the_jobs_first_process_prepares(monkeypatch, launcher_env, first):
    """The first process of the job prepares the data, knowledge base and shard actors, whatever launched it:
    on a second node started with Lightning's own launcher (NODE_RANK=1, no LOCAL_RANK yet) it is not."""
    for variable in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in launcher_env.items():
        monkeypatch.setenv(variable, value)
    assert is_first_process() is first
