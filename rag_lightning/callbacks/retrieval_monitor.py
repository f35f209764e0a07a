"""RetrievalMonitor: retrieval health during training, logged every step.

- retrieval/latency_ms: wall time of the step's search call to the shard actors;
- index/version: the index version that answered the step's queries;
- index/staleness: global steps since the encoder weights that made that version;
- retrieval/id_entropy: entropy of the retrieved passage ids over the last `window` steps,
  divided by its maximum (every id distinct) so it lies in [0, 1]. A fall towards 0 means
  every question gets the same few passages: retrieval collapse.
"""

from __future__ import annotations

from collections import deque

import lightning as L
import numpy as np

from retrieval_workers import KnowledgeBaseError, read_manifest, read_version_step


def normalized_entropy(ids: np.ndarray) -> float:
    """Shannon entropy of the id distribution over its maximum, log(len(ids)); 1.0 for fewer than 2 ids."""
    ids = ids[ids >= 0]
    if len(ids) < 2:
        return 1.0
    p = np.unique(ids, return_counts=True)[1] / len(ids)
    return float(-(p * np.log(p)).sum() / np.log(len(ids)))


class RetrievalMonitor(L.Callback):
    """Logs retrieval latency, the index version, its staleness and the retrieved-id entropy from training_step's
    outputs."""

    def __init__(self, kb_dir: str, window: int):
        self.kb_dir = kb_dir
        self.recent_ids: deque[np.ndarray] = deque(maxlen=window)
        self.version_steps: dict[int, int | None] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        self.recent_ids.append(outputs["retrieved_ids"].ravel())
        version = outputs["index_version"]
        metrics = {
            "retrieval/id_entropy": normalized_entropy(np.concatenate(self.recent_ids)),
            "retrieval/latency_ms": outputs["search_ms"],
            "index/version": float(version),
        }
        weights_step = self._weights_step(version)
        if weights_step is not None:
            metrics["index/staleness"] = float(trainer.global_step - weights_step)
        pl_module.log_dict(metrics, batch_size=1)

    def _weights_step(self, version: int) -> int | None:
        if version not in self.version_steps:
            try:
                self.version_steps[version] = read_version_step(self.kb_dir, read_manifest(self.kb_dir), version)
            except KnowledgeBaseError:  # pruned meanwhile: no staleness for it
                self.version_steps[version] = None
        return self.version_steps[version]
