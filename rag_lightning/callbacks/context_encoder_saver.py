"""SaveContextEncoder: the trained context encoder in Hugging Face format, with its tokenizer, beside the checkpoints.

Written by rank 0 into `<checkpoint dir>/context_encoder/` whenever a checkpoint is saved
(once per step), through a staging folder renamed into place.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from transformers import PreTrainedTokenizerBase

from retrieval_workers.atomic_files import staged_directory


class SaveContextEncoder(L.Callback):
    def __init__(self, folder: str | Path, tokenizer: PreTrainedTokenizerBase):
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.saved_step = -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not trainer.is_global_zero or pl_module.context_encoder is None or trainer.global_step == self.saved_step:
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(self.folder) as staging:
            pl_module.context_encoder.model.save_pretrained(str(staging))
            self.tokenizer.save_pretrained(str(staging))
        self.saved_step = trainer.global_step
