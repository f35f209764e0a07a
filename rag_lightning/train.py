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

import hydra
import lightning as L
import ray
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from rag_lightning.callbacks.checkpoints import check_checkpoint_fits, checkpoint_callbacks, resume_checkpoint
from rag_lightning.callbacks.index_refresh import IndexRefresh
from rag_lightning.callbacks.retrieval_monitor import RetrievalMonitor
from rag_lightning.config import TrainConfig, register_configs
from rag_lightning.data.datamodule import QADataModule
from rag_lightning.data.prepare import prepare_data
from rag_lightning.data.qa_files import read_split
from rag_lightning.errors import UserError, exit_on_user_error
from rag_lightning.kb.build import build_knowledge_base
from rag_lightning.model.encoders import load_encoder_tokenizer
from rag_lightning.model.rag_module import RagModule
from rag_lightning.training.loggers import SampleTable, build_logger
from retrieval_workers.kb_store import Manifest, atomic_write_bytes, read_manifest
from retrieval_workers.ray_runtime import RAY_ADDRESS_ENV, connect
from retrieval_workers.refresh import launch_refresher, shutdown_refresher
from retrieval_workers.service import launch_service, shutdown_service
from retrieval_workers.types import RefreshSpec, ServiceSpec

log = logging.getLogger(__name__)
MODEL_KINDS = ("rag_sequence", "rag_token")
STAGES = ("all", "prepare", "train")


def check_config(cfg: TrainConfig) -> None:
    """Value checks that the schema's types cannot express; each names its key."""
    if cfg.model.kind not in MODEL_KINDS:
        raise UserError(f"model.kind: {cfg.model.kind!r} is not one of {', '.join(MODEL_KINDS)}")
    if cfg.model.n_docs < 1:
        raise UserError(f"model.n_docs must be >= 1 (got {cfg.model.n_docs})")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise UserError("data.batch_size and data.eval_batch_size must be >= 1")
    if cfg.optim.lr <= 0 or cfg.optim.warmup_steps < 0:
        raise UserError("optim.lr must be > 0 and optim.warmup_steps >= 0")
    if cfg.optim.schedule not in ("linear", "constant"):
        raise UserError(f"optim.schedule: {cfg.optim.schedule!r} is not one of linear, constant")
    if cfg.retrieval.failover_timeout_s <= 0:
        raise UserError(f"retrieval.failover_timeout_s must be > 0 (got {cfg.retrieval.failover_timeout_s})")
    if cfg.retrieval.entropy_window < 1:
        raise UserError(f"retrieval.entropy_window must be >= 1 (got {cfg.retrieval.entropy_window})")
    if cfg.stage not in STAGES:
        raise UserError(f"stage: {cfg.stage!r} is not one of {', '.join(STAGES)}")
    if cfg.stage != "all" and not cfg.retrieval.ray_address:
        raise UserError(f"stage={cfg.stage} needs retrieval.ray_address: the shard actors live on a Ray cluster "
                        "that outlives each stage's processes")
    if cfg.trainer.checkpoint_every_n_steps is not None and cfg.trainer.checkpoint_every_n_steps < 1:
        raise UserError("trainer.checkpoint_every_n_steps must be >= 1, or null for checkpoints at validation only")
    refresh = cfg.refresh
    if refresh.every_n_steps is not None:
        if refresh.every_n_steps < 1:
            raise UserError(f"refresh.every_n_steps must be >= 1, or null for no refresh (got {refresh.every_n_steps})")
        if not cfg.retriever.train_ctx_encoder:
            raise UserError("refresh.every_n_steps is set but retriever.train_ctx_encoder=false: the passage "
                            "embeddings would never change; train the context encoder or set "
                            "refresh.every_n_steps=null")
        if refresh.workers < 1 or refresh.keep_versions < 1 or refresh.batch_size < 1:
            raise UserError("refresh.workers, refresh.keep_versions and refresh.batch_size must be >= 1")


def process_rank() -> int:
    """This process's global rank as its launcher set it: torchrun's RANK, srun's SLURM_PROCID, or the
    LOCAL_RANK Lightning's DDP launcher gives the processes it starts; 0 for a plain `python` process."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def service_spec(cfg: TrainConfig) -> ServiceSpec:
    return ServiceSpec(kb_dir=str(Path(cfg.kb.dir).resolve()), num_shards=cfg.index.shards,
                       num_replicas=cfg.index.replicas, namespace=cfg.retrieval.namespace,
                       omp_threads=cfg.index.omp_threads, actor_cpus=cfg.retrieval.actor_cpus,
                       search_params=cfg.index.search_params,
                       failover_timeout_s=cfg.retrieval.failover_timeout_s)


def prepare(cfg: TrainConfig, spec: ServiceSpec) -> Manifest:
    """Data and knowledge base checked or built, and the job's Ray cluster attached or started.

    Only the first process of `stage=all` (and `stage=prepare`) prepares and launches the shard
    actors (idempotently); every other process reads what it made and attaches to the cluster.
    """
    first = cfg.stage != "train" and process_rank() == 0
    if first:
        prepare_data(cfg.data)
    for split in ("train", "val", "test"):
        read_split(cfg.data.dir, split)          # every QA file checked before the expensive work
    manifest = build_knowledge_base(cfg.kb, cfg.index) if first else read_manifest(cfg.kb.dir)
    if cfg.model.n_docs > manifest.num_passages:
        raise UserError(f"model.n_docs={cfg.model.n_docs} is larger than the knowledge base "
                        f"({manifest.num_passages} passages in {cfg.kb.dir})")
    connect(cfg.retrieval.ray_address, namespace=spec.namespace, host=cfg.retrieval.host,
            dashboard=cfg.retrieval.dashboard, num_cpus=cfg.retrieval.num_cpus,
            temp_dir=cfg.retrieval.temp_dir)
    if first:
        launch_service(spec)
        if cfg.refresh.every_n_steps is not None:
            launch_refresher(spec, RefreshSpec(num_workers=cfg.refresh.workers, worker_cpus=cfg.refresh.worker_cpus,
                                               worker_gpus=cfg.refresh.worker_gpus, batch_size=cfg.refresh.batch_size,
                                               keep_versions=cfg.refresh.keep_versions))
    return manifest


def train(cfg: TrainConfig) -> dict:
    """The whole job: data, knowledge base, retrieval service, evaluate, fit, test. Returns the results.

    `stage=prepare` stops once the data, the knowledge base and the shard actors are ready;
    `stage=train` skips that and attaches to them. slurm/train.sbatch runs the first once, then
    the second in every process `srun` starts.
    """
    started = time.time()
    run_dir = Path(cfg.paths.run_dir)
    check_config(cfg)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True)
    resume_from = resume_checkpoint(run_dir, cfg.ckpt_path)
    spec = service_spec(cfg)
    owns_ray = not (cfg.retrieval.ray_address or os.environ.get(RAY_ADDRESS_ENV))
    try:
        manifest = prepare(cfg, spec)
        if cfg.stage == "prepare":
            log.info("data, knowledge base and %d x %d shard actors ready", spec.num_shards, spec.num_replicas)
            return {}
        return fit_and_test(cfg, run_dir, manifest, spec, resume_from, started)
    finally:
        if owns_ray and ray.is_initialized():    # (a user error may come before Ray is started)
            shutdown_refresher(spec)
            shutdown_service(spec)
            ray.shutdown()


def fit_and_test(cfg: TrainConfig, run_dir: Path, manifest: Manifest, spec: ServiceSpec, resume_from: str | None,
                 started: float) -> dict:
    """Evaluate the initial model (unless resuming), train, test the best checkpoint; rank 0 writes results.json."""
    module = RagModule(model=asdict(cfg.model), retriever=asdict(cfg.retriever), optim=asdict(cfg.optim),
                       service=asdict(spec), ray_address=os.environ[RAY_ADDRESS_ENV],
                       data_dir=str(Path(cfg.data.dir).resolve()))
    if module.question_encoder.dim != manifest.dim:
        raise UserError(f"model.question_encoder: its dimension {module.question_encoder.dim} differs from the "
                        f"knowledge base's {manifest.dim} (kb.context_encoder); use encoders of one size")
    if resume_from is not None:
        check_checkpoint_fits(resume_from, module, asdict(cfg.model))
    datamodule = QADataModule(cfg.data.dir, load_encoder_tokenizer(cfg.model.question_encoder),
                              module.generator_tokenizer, batch_size=cfg.data.batch_size,
                              eval_batch_size=cfg.data.eval_batch_size,
                              max_question_tokens=cfg.model.max_question_tokens,
                              max_answer_tokens=cfg.model.max_answer_tokens,
                              max_eval_examples=cfg.data.max_eval_examples)
    callbacks: list[L.Callback] = [*checkpoint_callbacks(run_dir, cfg.trainer.checkpoint_every_n_steps),
                                   RetrievalMonitor(spec.kb_dir, cfg.retrieval.entropy_window)]
    refresh = IndexRefresh(spec, cfg.refresh.every_n_steps, blocking=cfg.refresh.blocking) \
        if cfg.refresh.every_n_steps is not None else None
    if refresh is not None:
        callbacks.append(refresh)
    logger = build_logger(cfg.logger, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    if isinstance(logger, WandbLogger):
        callbacks.append(SampleTable())
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, max_steps=cfg.trainer.max_steps,
        max_epochs=cfg.trainer.max_epochs, val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch,
        log_every_n_steps=cfg.trainer.log_every_n_steps, gradient_clip_val=cfg.trainer.gradient_clip_val,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        num_sanity_val_steps=cfg.trainer.num_sanity_val_steps, default_root_dir=run_dir,
        use_distributed_sampler=False,          # QADataModule shards every split itself
        # submitit (hydra/launcher=slurm) handles the pre-emption signal and the resubmission itself
        plugins=[SLURMEnvironment(auto_requeue=False)] if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" else None,
        logger=logger, callbacks=callbacks)

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
    results.update(trainer.test(module, datamodule=datamodule, ckpt_path="best" if best else None,
                                verbose=False, weights_only=True)[0])
    results.update({"train/steps": trainer.global_step, "train/fit_s": round(fit_s, 1),
                    "train/resumed_from": resume_from, "best_checkpoint": best,
                    "kb/num_passages": manifest.num_passages,
                    "kb/index_version": read_manifest(spec.kb_dir).active_version,
                    "wall_time_s": round(time.time() - started, 1)})
    if refresh is not None:
        results.update({"refresh/completed": refresh.completed, "refresh/skipped": refresh.skipped,
                        "refresh/failed": refresh.failed})
    if trainer.is_global_zero:
        atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
        log.info("results: %s", json.dumps(results))
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(OmegaConf.to_object(cfg))


register_configs()

if __name__ == "__main__":
    main()
