"""IndexVersionCheckpointing: each checkpoint records the index version its training searched, and a resumed
(or tested) checkpoint is served that version again.

The version is the one that answered the last training step. After a checkpoint is
loaded, rank 0 makes that version active again if it is still on disk. If it was pruned
meanwhile and the job refreshes the index (an IndexRefresh callback), it is re-made from
the checkpoint's own context encoder; else the active version stays, with a warning.
"""

from __future__ import annotations

import logging

import lightning as L

from rag_lightning.callbacks.index_refresh import IndexRefresh
from rag_lightning.model.checkpoint_file import INDEX_VERSION_KEY
from retrieval_workers import KnowledgeBaseError, ServiceSpec, activate_kept_version, read_manifest, switch_version

log = logging.getLogger(__name__)


class IndexVersionCheckpointing(L.Callback):
    def __init__(self, service: ServiceSpec, refresh: IndexRefresh | None = None):
        self.service = service
        self.refresh = refresh
        self.version = read_manifest(service.kb_dir).active_version  # the version the last training step used
        self.to_restore: tuple[int, int] | None = None  # (index version, global step) of a loaded checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.version = outputs["index_version"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[INDEX_VERSION_KEY] = self.version

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if INDEX_VERSION_KEY in checkpoint:
            self.version = checkpoint[INDEX_VERSION_KEY]
            self.to_restore = (checkpoint[INDEX_VERSION_KEY], checkpoint["global_step"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer, pl_module)

    def _restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore, self.to_restore = self.to_restore, None
        if restore is None or restore[0] == read_manifest(self.service.kb_dir).active_version:
            return
        version, checkpoint_step = restore
        if trainer.is_global_zero:
            try:
                activate_kept_version(self.service.kb_dir, version)
                switch_version(self.service, version)
                log.info("index version %d, which the checkpoint trained against, is active again", version)
            except KnowledgeBaseError as e:
                if pl_module.context_encoder is not None and self.refresh is not None:
                    log.warning("%s; re-encoding the knowledge base with the checkpoint's context encoder", e)
                    report = self.refresh.refresh_now(pl_module, checkpoint_step)
                    if report is not None:
                        self.version = report.version
                else:
                    log.warning("%s; going on with the active version", e)
        trainer.strategy.barrier()
