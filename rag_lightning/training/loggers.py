"""The experiment logger chosen by `logger.kind`: CSV files, Weights & Biases, or none.

W&B runs offline when logger.offline is set, WANDB_MODE=offline, or no WANDB_API_KEY is set.
The runs of one SLURM job (its first run and every requeued one) share a group named
after the job id, so the dashboard shows them together; outside SLURM the group is the
run directory's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from rag_lightning.config import LoggerConfig
from rag_lightning.errors import UserError


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
