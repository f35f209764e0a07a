"""The experiment logger chosen by `logger.kind` (CSV files, Weights & Biases, or none), and W&B's sample table.

W&B runs offline when logger.offline is set, WANDB_MODE=offline, or no WANDB_API_KEY is set.
The runs of one SLURM job (its first run and every requeued one) share a group named
after the job id, so the dashboard shows them together; outside SLURM the group is the
run directory's name.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from rag_lightning.config import LoggerConfig
from rag_lightning.errors import UserError

SAMPLE_COLUMNS = ("question", "prediction", "answers", "retrieved", "top_score")
SAMPLE_ROWS = 16


def build_logger(cfg: LoggerConfig, run_dir: Path, config: dict) -> Logger | bool:
    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return CSVLogger(run_dir, name="logs", version="")
    if cfg.kind == "wandb":
        offline = cfg.offline or os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
        job = os.environ.get("SLURM_JOB_ID")
        name = f"{job}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else run_dir.name
        logger = WandbLogger(project=cfg.project, save_dir=str(run_dir), offline=offline, group=job or run_dir.name,
                             name=name)
        logger.log_hyperparams(config)
        return logger
    raise UserError(f"logger.kind: {cfg.kind!r} is not one of csv, wandb, none")


class SampleTable(L.Callback):
    """After each validation and test: a W&B table of the first evaluated questions, each with its
    prediction, gold answers, retrieved passage titles and top retrieval score (rank 0's examples)."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        if not trainer.is_global_zero or not pl_module.eval_records:
            return
        rows = [[r["question"], r["prediction"], " | ".join(r["answers"]),
                 " | ".join(passage["title"] for passage in r["retrieved"]), r["retrieved"][0]["score"]]
                for r in pl_module.eval_records[:SAMPLE_ROWS]]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{prefix}/samples", columns=list(SAMPLE_COLUMNS), data=rows,
                                 step=trainer.global_step)
