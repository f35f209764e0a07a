"""Where a job's checkpoints go and which one a restarted job resumes from.

A run directory holds `checkpoints/best-step=N.ckpt` (best validation EM), `last.ckpt`
(written with it), `checkpoints/step=N.ckpt` (every trainer.checkpoint_every_n_steps
steps, the newest kept) and, after a SLURM pre-emption signal, Lightning's
`hpc_ckpt_K.ckpt`. A job started again on the same run directory (a requeued SLURM job:
its run directory is keyed on the job id) resumes from the newest of them. Lightning writes
each through a temporary file that is moved into place, so none is ever half written.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from rag_lightning.errors import UserError


def checkpoint_callbacks(run_dir: Path, every_n_steps: int | None) -> list[ModelCheckpoint]:
    """The best-by-validation checkpoint (first, the trainer's `checkpoint_callback`), and the periodic one."""
    callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{step}", monitor="val/em",
                                 mode="max", save_last=True)]
    if every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="{step}", save_top_k=1,
                                         every_n_train_steps=every_n_steps))
    return callbacks


def resume_checkpoint(run_dir: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint to resume from: `ckpt_path` if given, else the newest one in the run directory, if any."""
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path: no checkpoint file at {ckpt_path}")
        return ckpt_path
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
