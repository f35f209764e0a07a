"""The experiment logger chosen by `logger.kind`: CSV files, Weights & Biases, or none."""
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
        logger = WandbLogger(project=cfg.project, save_dir=str(run_dir), offline=offline)
        logger.log_hyperparams(config)
        return logger
    raise UserError(f"logger.kind: {cfg.kind!r} is not one of csv, wandb, none")
