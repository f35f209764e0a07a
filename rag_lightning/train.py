"""Train a RAG model: `python -m rag_lightning.train [overrides]`.

With no arguments it runs the embedded demo: made-up facts, a knowledge base built from
them, a local Ray hosting two index shards, evaluation before and after training on
the CPU. The run directory receives the composed config, checkpoints, logs and
results.json.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import ray
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from rag_lightning.callbacks.checkpoints import AtomicCheckpointIO, checkpoint_callbacks, resume_checkpoint
from rag_lightning.callbacks.context_encoder_saver import SaveContextEncoder
from rag_lightning.callbacks.evaluation_metrics import EvaluationMetrics
from rag_lightning.callbacks.finite_loss import StopOnNonFiniteLoss
from rag_lightning.callbacks.index_refresh import IndexRefresh
from rag_lightning.callbacks.index_version import IndexVersionCheckpointing
from rag_lightning.callbacks.retrieval_monitor import RetrievalMonitor
from rag_lightning.callbacks.sample_table import SampleTable
from rag_lightning.callbacks.stop_signals import StopTogether
from rag_lightning.command import command
from rag_lightning.config import TrainConfig
from rag_lightning.data.datamodule import QADataModule
from rag_lightning.errors import UserError
from rag_lightning.model.checkpoint_file import check_checkpoint_fits
from rag_lightning.model.folder_settings import question_vectors
from rag_lightning.model.rag_folder import export_mismatch
from rag_lightning.model.rag_module import RagModule
from rag_lightning.training.loggers import build_logger
from rag_lightning.training.rendezvous import serve_rendezvous_on_job_address
from rag_lightning.training.setup import (
    check_trainer_arguments,
    is_first_process,
    kb_writer_lock,
    prepare,
    service_spec,
)
from retrieval_workers import (
    RAY_ADDRESS_ENV,
    Manifest,
    ServiceSpec,
    atomic_write_bytes,
    local_ray_answers,
    read_manifest,
    shutdown_refresher,
    shutdown_service,
)

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict:
    """The whole job: data, knowledge base, retrieval service, evaluate, fit, test. Returns the results.

    `stage=prepare` stops once the data, the knowledge base and the shard actors are ready;
    `stage=train` skips that and attaches to them. slurm/train.sbatch runs the first once, then
    the second in every process `srun` starts.
    """
    started = time.time()
    check_trainer_arguments(cfg.trainer)
    run_dir = Path(cfg.paths.run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    if is_first_process():
        warn_unless_exportable(cfg)
    resume_from = resume_checkpoint(run_dir, cfg.ckpt_path)
    spec = service_spec(cfg)
    owns_ray = not (cfg.service.ray_address or os.environ.get(RAY_ADDRESS_ENV))
    with kb_writer_lock(cfg):  # held until the refresher is shut down
        try:
            manifest = prepare(cfg, spec)
            if cfg.stage == "prepare":
                log.info("data, knowledge base and %d x %d shard actors ready", spec.num_shards, spec.num_replicas)
                return {}
            return fit_and_test(cfg, run_dir, manifest, spec, resume_from, started)
        finally:
            if owns_ray and ray.is_initialized():  # (a user error may come before Ray is started)
                if local_ray_answers():  # a signal to the whole process group may have ended it, actors and all
                    shutdown_refresher(spec)
                    shutdown_service(spec)
                ray.shutdown()


def warn_unless_exportable(cfg: TrainConfig) -> None:
    """One warning line when export would refuse this run's checkpoints (the check export makes)."""
    score_scale = cfg.retriever.score_scale
    assert score_scale is not None  # filled in by preflight
    mismatch = export_mismatch(*question_vectors(cfg.model), score_scale)
    if mismatch is not None:
        log.warning("rag_lightning.export will refuse this run's checkpoints: it trains with %s", mismatch)


def fit_and_test(
    cfg: TrainConfig, run_dir: Path, manifest: Manifest, spec: ServiceSpec, resume_from: str | None, started: float
) -> dict:
    """Evaluate the initial model (unless resuming), train, test the best checkpoint; rank 0 writes results.json."""
    module = RagModule(
        model=asdict(cfg.model),
        retriever=asdict(cfg.retriever),
        optim=asdict(cfg.optim),
        service=asdict(spec),
        data_dir=str(Path(cfg.data.dir).resolve()),
        evaluate_answers=cfg.evaluate_answers,
    )
    if module.question_encoder.dim != manifest.dim:
        key = "model.init_from" if cfg.model.init_from is not None else "model.question_encoder"
        raise UserError(
            f"{key}: the question encoder's dimension {module.question_encoder.dim} differs from the "
            f"knowledge base's {manifest.dim} (kb.context_encoder); use encoders of one size"
        )
    if resume_from is not None:
        check_checkpoint_fits(resume_from, module, asdict(cfg.model))
    datamodule = QADataModule(
        cfg.data,
        cfg.model,
        module.question_tokenizer,
        module.generator_tokenizer,
        module.answer_format,
        module.retrieval_ahead,
    )

    refresh = (
        IndexRefresh(spec, cfg.index_refresh.every_n_steps, blocking=cfg.index_refresh.blocking)
        if cfg.index_refresh.every_n_steps is not None
        else None
    )
    metrics = EvaluationMetrics(module.eval_k, cfg.evaluate_answers)
    callbacks: list[L.Callback] = [
        *checkpoint_callbacks(run_dir, cfg.checkpoint_every_n_steps, metrics.best_by),
        StopOnNonFiniteLoss(),
        StopTogether(),
        metrics,
        RetrievalMonitor(spec.kb_dir, cfg.service.entropy_window),
        IndexVersionCheckpointing(spec, refresh),
    ]
    if refresh is not None:
        callbacks.append(refresh)
    if module.context_encoder is not None:
        callbacks.append(SaveContextEncoder(run_dir / "checkpoints" / "context_encoder"))
    logger = build_logger(cfg.logger, run_dir, asdict(cfg))
    if isinstance(logger, WandbLogger) and cfg.evaluate_answers:
        callbacks.append(SampleTable(metrics))
    trainer = L.Trainer(
        **cfg.trainer.lightning_arguments(),
        default_root_dir=run_dir,
        logger=logger,
        callbacks=callbacks,
        use_distributed_sampler=False,  # QADataModule shards every split itself
        plugins=[
            AtomicCheckpointIO(),
            # submitit (hydra/launcher=slurm) handles the pre-emption signal and the resubmission itself
            *([SLURMEnvironment(auto_requeue=False)] if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else []),
        ],
    )

    serve_rendezvous_on_job_address(trainer)

    results: dict = {}
    if cfg.evaluate_before_training and resume_from is None:
        initial = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        results.update({key.replace("test/", "initial/"): value for key, value in initial.items()})
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    fit_started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    fit_s = time.time() - fit_started
    best = trainer.checkpoint_callback.best_model_path
    results.update(
        trainer.test(
            module, datamodule=datamodule, ckpt_path="best" if best else None, verbose=False, weights_only=True
        )[0]
    )
    results.update(
        {
            "train/steps": trainer.global_step,
            "train/fit_s": round(fit_s, 1),
            "train/resumed_from": resume_from,
            "best_checkpoint": best,
            "kb/num_passages": manifest.num_passages,
            "kb/index_version": read_manifest(spec.kb_dir).active_version,
            "retriever/fusion": cfg.retriever.fusion,
            "wall_time_s": round(time.time() - started, 1),
        }
    )
    if refresh is not None:
        results.update(
            {
                "refresh/completed": refresh.completed,
                "refresh/skipped": refresh.skipped,
                "refresh/failed": refresh.failed,
            }
        )
    if trainer.is_global_zero:
        atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
        log.info("results: %s", json.dumps(results))
    return results


main = command("train")(train)  # python -m rag_lightning.train, or rag-train


if __name__ == "__main__":
    main()
