"""The checkpoint files of a run (rag_lightning/callbacks/checkpoints.py) on a tiny Lightning module whose validation
EM only falls, so the best checkpoint stays at the first validation while training goes on past the last one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rag_lightning.callbacks.checkpoints import checkpoint_callbacks, resume_checkpoint
from rag_lightning.callbacks.finite_loss import StopOnNonFiniteLoss
from rag_lightning.errors import UserError

from helpers import checkpoint_step


class FallingEM(L.LightningModule):
    """One weight; validation logs val/em = 1 / step, worse at every validation."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return ((self.weight - batch) ** 2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/em", 1.0 / self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(20, 1))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(1, 1))


def _fit(run_dir: Path, max_steps: int, ckpt_path: str | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
        callbacks=checkpoint_callbacks(run_dir, every_n_steps=3, best_by="val/em"),
    )
    trainer.fit(FallingEM(), ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_last_checkpoint_is_the_end_of_training_not_the_best_validation(tmp_path):
    """Validations at steps 2, 4, 6, the best at 2, training to step 7: best-step2.ckpt holds step 2, last.ckpt
    step 7 (Lightning's save_last alone would leave it at 2), step6.ckpt the newest periodic one; a restart resumes
    from last.ckpt and keeps the best checkpoint it had."""
    checkpoints = tmp_path / "checkpoints"
    trainer = _fit(tmp_path, max_steps=7)
    assert trainer.checkpoint_callback.best_model_path == str(checkpoints / "best-step2.ckpt")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step2.ckpt", "last.ckpt", "step6.ckpt"]
    assert [checkpoint_step(checkpoints / name) for name in ("best-step2.ckpt", "last.ckpt", "step6.ckpt")] == [2, 7, 6]

    resume_from = resume_checkpoint(tmp_path, None)
    assert resume_from == str(checkpoints / "last.ckpt")
    resumed = _fit(tmp_path, max_steps=9, ckpt_path=resume_from)
    assert resumed.global_step == 9 and checkpoint_step(checkpoints / "last.ckpt") == 9
    assert resumed.checkpoint_callback.best_model_path == str(checkpoints / "best-step2.ckpt")


class NanAtStep4(FallingEM):
    """FallingEM whose training loss is NaN at step 4, as after a learning rate far too high."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 4 else loss


def test_a_non_finite_loss_stops_training_before_it_reaches_the_weights_or_a_checkpoint(tmp_path):
    module = NanAtStep4()
    trainer = L.Trainer(
        max_steps=7,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[*checkpoint_callbacks(tmp_path, every_n_steps=3, best_by="val/em"), StopOnNonFiniteLoss()],
    )
    with pytest.raises(UserError, match="the training loss is nan at step 4: stopped"):
        trainer.fit(module, weights_only=True)
    assert torch.isfinite(module.weight).all()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step2.ckpt", "last.ckpt", "step3.ckpt"]
    for name in ("best-step2.ckpt", "last.ckpt", "step3.ckpt"):
        state = torch.load(checkpoints / name, map_location="cpu", weights_only=True)
        assert state["global_step"] <= 4 and torch.isfinite(state["state_dict"]["weight"]).all()
