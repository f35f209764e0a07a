"""The experiment logger chosen by `logger.kind`: CSV files, Weights & Biases, or none.

A resumed run appends to its logs/metrics.csv (Lightning's CSV logger deletes the file of the run it resumes).
W&B runs offline when logger.offline is set, WANDB_MODE=offline, or no WANDB_API_KEY is set.
The runs of one SLURM job (its first run and every requeued one) share a group named
after the job id, so the dashboard shows them together; outside SLURM the group is the
run directory's name.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from rag_lightning.config import LoggerConfig
from rag_lightning.errors import UserError


def build_logger(cfg: LoggerConfig, run_dir: Path, config: dict) -> Logger | bool:
    if cfg.kind == "none":
        return False
    if cfg.kind == "csv":
        return AppendingCSVLogger(run_dir, name="logs", version="")
    if cfg.kind == "wandb":
        offline = cfg.offline or os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
        job = os.environ.get("SLURM_JOB_ID")
        name = f"{job}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else run_dir.name
        logger = WandbLogger(
            project=cfg.project, save_dir=str(run_dir), offline=offline, group=job or run_dir.name, name=name
        )
        logger.log_hyperparams(config)
        return logger
    raise UserError(f"logger.kind: {cfg.kind!r} is not one of csv, wandb, none")


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, writing through an AppendingWriter."""

    _experiment: ExperimentWriter | None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class AppendingWriter(ExperimentWriter):
    """Keeps the rows of metrics.csv that an earlier run in the same folder wrote, and their columns, where
    Lightning's writer deletes the file (its `_check_log_dir_exists`): a resumed run's rows follow them."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])
