"""SampleTable: a Weights & Biases table of evaluated questions after each validation and test."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from rag_lightning.callbacks.evaluation_metrics import EvaluationMetrics

SAMPLE_COLUMNS = ("question", "prediction", "answers", "retrieved", "top_score")
SAMPLE_ROWS = 16


class SampleTable(L.Callback):
    """After each validation and test: a W&B table of the first evaluated questions, each with its
    prediction, gold answers, retrieved passage titles and top retrieval score (rank 0's examples).
    It reads the records of the EvaluationMetrics callback, which must come before it in the callback list."""

    def __init__(self, metrics: EvaluationMetrics):
        self.metrics = metrics

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        records = self.metrics.scores.records
        if not trainer.is_global_zero or not records:
            return
        rows = [
            [
                r["question"],
                r["prediction"],
                " | ".join(r["answers"]),
                " | ".join(passage["title"] for passage in r["retrieved"]),
                r["retrieved"][0]["score"],
            ]
            for r in records[:SAMPLE_ROWS]
        ]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key=f"{prefix}/samples", columns=list(SAMPLE_COLUMNS), data=rows, step=trainer.global_step
                )
