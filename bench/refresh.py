"""Background index refresh: encoding speed, time training waits for it, training speed while it runs.

One synthetic knowledge base (made as in train_throughput.py: bench/synthetic.py's data, a
random encoder of dim 128, 2 layers) is served by 2 shards. The trainer process is pinned to
core 0 with one torch thread and the refresh encoder actor to core 1 with one, as a cluster
gives the encoder its own resources. Three runs make a round: a training of --steps steps with
index_refresh.every_n_steps = --every (end to end, train_context_encoder) refreshing in the
background, the same with index_refresh.blocking (stop, re-encode, rebuild, go on, as Atlas
does), and the raw forward pass of the same encoder over the same passages and batches inside
the encoder actor. They run in --rounds interleaved rounds (bench/common.py interleaved, the
order reversed every other round); each figure is taken within a round:

  encode_ratio   passages/s of a whole refresh (weights from the object store, encoding,
                 index build, files, commit, switch) over the raw pass, both with nothing else
                 running (the mean of the blocking run's refreshes): target >= 0.85.
                 encode_ratio_while_training is the same for the background refreshes, with
                 training on the other core;
  blocked_frac   the time the background run's steps spent on refresh work (publishing weights,
                 polling, re-asking shards during a switch) over the refreshes' total wall
                 time: target <= 0.01;
  during_ratio   steps/s while a refresh runs over steps/s while none does, same run: target >= 0.9;
  blocking_*     the blocking run's wall time beside the background run's.

The last stdout line is one JSON object with the median over the rounds of each figure, their
spread (min, max, every round's value) under "spread", and meets_targets decided from the
medians. Targets are reported, not asserted.

    python bench/refresh.py                            # the measurement (about 20 minutes)
    python bench/refresh.py --quick                    # a quick check that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import ray
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Target, bare_trainer, interleaved, measure_and_print, parse_with_quick, per_round, summarise  # noqa: E402
from train_throughput import (  # noqa: E402
    DIM,
    HEADS,
    INDEX_FACTORY,
    LAYERS,
    MAX_CONTEXT_TOKENS,
    MAX_QUESTION_TOKENS,
    N_DOCS,
    SEED,
    build_kb,
    encoder_config,
    new_datamodule,
    write_data,
)

from rag_lightning.callbacks.index_refresh import IndexRefresh  # noqa: E402
from rag_lightning.config import GeneratorConfig, ModelConfig, OptimConfig, RetrieverConfig  # noqa: E402
from rag_lightning.model.rag_module import RagModule  # noqa: E402
from retrieval_workers.ray_runtime import connect  # noqa: E402
from retrieval_workers.refresh import encoder_name, launch_refresher, shutdown_refresher  # noqa: E402
from retrieval_workers.service import launch_service, shutdown_service  # noqa: E402
from retrieval_workers.types import RefreshSpec, ServiceSpec  # noqa: E402

TRAINER_CORE, ENCODER_CORE = 0, 1
ENCODE_BATCH = 64
WARMUP_STEPS = 5
TARGETS = {"encode_ratio": Target(0.85), "blocked_frac": Target(0.01, at_least=False), "during_ratio": Target(0.9)}
QUICK = {"passages": 2000, "steps": 40, "every": 15, "rounds": 2}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=20000, help="knowledge base size")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--every", type=int, default=100, help="index_refresh.every_n_steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds: every run is repeated this many times")
    p.add_argument("--index", default=INDEX_FACTORY, help="FAISS index factory string of the shards")
    p.add_argument("--work-dir", type=Path, help="where data and KB go, kept (default: a temp dir)")
    return parse_with_quick(p, QUICK)


class StepClock(Callback):
    """Each step's wall time, and whether a refresh was in flight when it began. Put it before IndexRefresh."""

    def __init__(self, refresh: IndexRefresh):
        self.refresh = refresh
        self.last = None
        self.steps: list[tuple[float, bool]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None and batch_idx >= WARMUP_STEPS:
            self.steps.append((now - self.last, self.refresh.in_flight is not None))
        self.last = now


def new_module(tok_dir: Path, spec: ServiceSpec) -> RagModule:
    """RAG-Sequence at the throughput benchmark's sizes, trained end to end (both encoders)."""
    L.seed_everything(SEED, verbose=False)
    model = ModelConfig(
        kind="rag_sequence",
        n_docs=N_DOCS,
        question_encoder=encoder_config(tok_dir),
        generator=GeneratorConfig(d_model=DIM, layers=LAYERS, heads=HEADS, ffn_dim=4 * DIM),
        max_question_tokens=MAX_QUESTION_TOKENS,
        max_context_tokens=MAX_CONTEXT_TOKENS,
    )
    return RagModule(
        model=asdict(model),
        retriever=asdict(RetrieverConfig(train_context_encoder=True)),
        optim=asdict(OptimConfig(lr=1e-4, question_encoder_lr=1e-4, context_encoder_lr=1e-4, warmup_steps=0)),
        service=asdict(spec),
    )


def raw_encode_rate(module: RagModule, spec: ServiceSpec) -> float:
    """Passages/s of the bare forward pass of the context encoder over every passage, measured inside the
    encoder actor (its core, its process): the limit a refresh can approach."""
    worker = ray.get_actor(encoder_name(spec, 0), namespace=spec.namespace)
    return ray.get(worker.forward_pass_rate.remote(module.context_encoder.snapshot(0), ENCODE_BATCH))


def train(tok_dir: Path, data_dir: Path, spec: ServiceSpec, steps: int, every: int, blocking: bool) -> dict:
    """One training run with refreshes; returns its figures."""
    module = new_module(tok_dir, spec)
    refresh = IndexRefresh(spec, every, blocking=blocking)
    clock = StepClock(refresh)
    trainer = bare_trainer(steps, [clock, refresh])
    started = time.perf_counter()
    trainer.fit(module, datamodule=new_datamodule(module, data_dir))
    wall_s = time.perf_counter() - started
    reports = [r for r in refresh.reports if r.error is None]
    if not reports:
        raise RuntimeError(f"no refresh finished in {steps} steps refreshing every {every}: give more --steps")
    during = [s for s, in_flight in clock.steps if in_flight]
    idle = [s for s, in_flight in clock.steps if not in_flight]
    return {
        "wall_s": wall_s,
        "refreshes": len(reports),
        "skipped": refresh.skipped,
        "failed": refresh.failed,
        "refresh_s": sum(r.wall_s for r in reports),
        "blocked_s": refresh.blocked_s + module.retrieval_client.switch_retry_s,
        "switch_retries": module.retrieval_client.switch_retries,
        "steps_during": len(during),
        "steps_per_s_during": len(during) / sum(during) if during else float("nan"),
        "steps_per_s_idle": len(idle) / sum(idle) if idle else float("nan"),
        "encode_passages_per_s": float(np.mean([r.passages_per_s for r in reports])),
    }


def round_figures(background: list[dict], blocking: list[dict], raw: list[float]) -> dict[str, list[float]]:
    """Every figure, a value a round, from each round's runs."""

    def each(runs: list[dict], key: str) -> list[float]:
        return [run[key] for run in runs]

    return {
        "raw_encode_passages_per_s": raw,
        "refresh_passages_per_s": each(blocking, "encode_passages_per_s"),
        "encode_ratio": per_round(each(blocking, "encode_passages_per_s"), raw),
        "refresh_passages_per_s_while_training": each(background, "encode_passages_per_s"),
        "encode_ratio_while_training": per_round(each(background, "encode_passages_per_s"), raw),
        "refreshes": each(background, "refreshes"),
        "refresh_s": each(background, "refresh_s"),
        "blocked_s": each(background, "blocked_s"),
        "switch_retries": each(background, "switch_retries"),
        "blocked_frac": per_round(each(background, "blocked_s"), each(background, "refresh_s")),
        "steps_per_s_during": each(background, "steps_per_s_during"),
        "steps_per_s_idle": each(background, "steps_per_s_idle"),
        "during_ratio": per_round(each(background, "steps_per_s_during"), each(background, "steps_per_s_idle")),
        "steps_during_refresh": each(background, "steps_during"),
        "background_wall_s": each(background, "wall_s"),
        "blocking_wall_s": each(blocking, "wall_s"),
        "blocking_refreshes": each(blocking, "refreshes"),
        "blocking_over_background": per_round(each(blocking, "wall_s"), each(background, "wall_s")),
    }


def measure(args: argparse.Namespace, work: Path) -> dict:
    data_dir, kb_dir = work / "data", (work / "kb").resolve()
    kb_file, tok_dir = write_data(work, args.passages, args.steps)
    build_kb(kb_file, tok_dir, kb_dir, encoder_config(tok_dir), factory=args.index)
    spec = ServiceSpec(kb_dir=str(kb_dir), num_shards=2, num_replicas=1)
    connect(namespace=spec.namespace, num_cpus=2)  # before pinning: Ray's workers keep both cores
    os.sched_setaffinity(0, {TRAINER_CORE})
    torch.set_num_threads(1)
    runs = {
        "background": partial(train, tok_dir, data_dir, spec, args.steps, args.every, blocking=False),
        "blocking": partial(train, tok_dir, data_dir, spec, args.steps, args.every, blocking=True),
        "raw": partial(raw_encode_rate, new_module(tok_dir, spec), spec),
    }
    try:
        launch_service(spec)
        launch_refresher(spec, RefreshSpec(worker_cpus=1, batch_size=ENCODE_BATCH, cpu_affinity=(ENCODER_CORE,)))
        results = interleaved(runs, args.rounds)
    finally:
        shutdown_refresher(spec)
        shutdown_service(spec)
        ray.shutdown()
    return {
        "passages": args.passages,
        "steps": args.steps,
        "every_n_steps": args.every,
        "index": args.index,
        "rounds": args.rounds,
        **summarise(round_figures(**results), TARGETS),
    }


def main() -> None:
    args = parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("bench/refresh.py needs two cores (one for training, one for the encoder actor)")
    measure_and_print(measure, args)


if __name__ == "__main__":
    main()
