"""Stop training at the first loss that is not a finite number, before its gradients change the weights.

A NaN or infinite loss (a learning rate far too high, a broken batch) turns every weight into NaN at the
optimizer step that follows, and every checkpoint after it holds a model that answers nothing. The check runs
before the backward pass on every rank, and the ranks decide together (one rank's NaN stops all of them at the
same step, so none is left waiting in a collective); the checkpoints already written stay as they are.
"""

from __future__ import annotations

import lightning as L
import torch

from rag_lightning.errors import UserError


class StopOnNonFiniteLoss(L.Callback):
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            value = f"{loss.item():g}" if not finite else "not finite on another rank"
            raise UserError(
                f"the training loss is {value} at step {trainer.global_step}: stopped before it changed "
                "the weights (the checkpoints written so far are kept); lower optim.lr, or look at the "
                "batches of this step"
            )
