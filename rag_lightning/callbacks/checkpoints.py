"""Where a job's checkpoints go and which one a restarted job resumes from.

A run directory holds `checkpoints/best-stepN.ckpt` (best validation EM, or MRR where answers are not scored),
`checkpoints/last.ckpt` (the newest state: after every validation and when training ends),
`checkpoints/stepN.ckpt` (every checkpoint_every_n_steps steps, the newest kept)
and, after a SLURM pre-emption signal, Lightning's `hpc_ckpt_K.ckpt`. A job started again
on the same run directory (a requeued SLURM job: its run directory is keyed on the job id)
resumes from the newest of them. AtomicCheckpointIO writes each under a temporary name beside
its final one and renames it, so none is ever half written, not even on a full disk. The names hold no "=" (Lightning's
default), which Hydra's command line would refuse in `ckpt_path=...` unless quoted.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from rag_lightning.errors import UserError
from retrieval_workers import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writing, renamed into place from beside the final name (retrieval_workers.atomic_files).
    Lightning's own goes through fsspec's transaction, which writes a temporary file in /tmp and copies it over:
    on a full disk that left a truncated last.ckpt under its final name, which resuming then refused."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getbuffer())


def checkpoint_callbacks(run_dir: Path, every_n_steps: int | None, best_by: str) -> list[Checkpoint]:
    """The best checkpoint by the validation metric best_by (first, the trainer's `checkpoint_callback`), the last
    one, and the periodic one."""
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best-step{step}",
            monitor=best_by,
            mode="max",
            auto_insert_metric_name=False,
        ),
        LastCheckpoint(run_dir / "checkpoints" / "last.ckpt"),
    ]
    if every_n_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="step{step}",
                save_top_k=1,
                every_n_train_steps=every_n_steps,
                auto_insert_metric_name=False,
            )
        )
    return callbacks


class LastCheckpoint(Checkpoint):
    """Keeps `path` the newest state of training: written after every validation and when training ends.
    (Lightning's own `save_last` writes it only when another checkpoint is saved at that step, so with a best-only
    callback it stays at the best validation, not the last state.) A `Checkpoint`, so Lightning runs it after the
    other callbacks, whose states it saves."""

    def __init__(self, path: Path):
        self.path = path
        self._saved_at_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at_step = trainer.global_step


def resume_checkpoint(run_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to resume from: `ckpt_path` if given, else the newest one in the run directory, if any."""
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path: no checkpoint file at {ckpt_path}")
        return ckpt_path
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
