"""SaveContextEncoder: the trained context encoder as a folder of its own kind, with its tokenizer, beside the
checkpoints, so that `kb.context_encoder.pretrained=<that folder>` builds it again.

Written by rank 0 into `<checkpoint dir>/context_encoder/` whenever a checkpoint is saved
(once per step), through a staging folder renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from rag_lightning.encoders.folders import resolve_encoder, save_encoder_folder
from retrieval_workers import staged_directory


class SaveContextEncoder(L.Callback):
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.saved_step = -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if not trainer.is_global_zero or pl_module.context_encoder is None or trainer.global_step == self.saved_step:
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        max_length = resolve_encoder(pl_module.context_encoder_cfg, "kb.context_encoder").max_length
        with staged_directory(self.folder) as staging:
            save_encoder_folder(pl_module.context_encoder, pl_module.context_tokenizer, staging, max_length)
        self.saved_step = trainer.global_step
