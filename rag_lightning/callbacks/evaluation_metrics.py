"""EvaluationMetrics: a validation or test split's metrics, from the records its steps return.

Each process adds up the scores of its share of the split; at the end of the epoch the
sums of every process are added together before dividing, so the logged figures are the
whole split's (val/em, val/f1, val/loss unless the answers are not scored, val/examples, and val/recall@k, val/mrr@k and
val/gold_recall@k at every k of retriever.eval_k and n_docs).
"""

from __future__ import annotations

import lightning as L
import torch

from rag_lightning.evaluation.scores import SplitScores


class EvaluationMetrics(L.Callback):
    def __init__(self, ks: list[int], answers: bool):
        self.ks, self.answers = ks, answers
        self.scores = SplitScores(ks, answers)  # the split being evaluated, or the last one evaluated

    @property
    def best_by(self) -> str:
        """The validation metric that picks the best checkpoint: EM, or without answers MRR at the largest k."""
        return "val/em" if self.answers else f"val/mrr@{max(self.ks)}"

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.scores = SplitScores(self.ks, self.answers)

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.scores.add(outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        def add_up(counts: list[float]) -> list[float]:
            # float64 for exact counts; on the module's device, as nccl reduces GPU tensors only
            totals = torch.tensor(counts, dtype=torch.float64, device=pl_module.device)
            return trainer.strategy.reduce(totals, reduce_op="sum").tolist()

        # the values are equal on every rank already; sync_dist only keeps Lightning from warning otherwise
        pl_module.log_dict(self.scores.metrics(prefix, add_up), sync_dist=True)
