"""IndexShard: one contiguous range of passages with its FAISS index, served as a Ray actor.

The class is plain Python (tests and benchmarks can use it in-process); `service.py`
wraps it with `ray.remote`. A restarted actor re-runs __init__, which reloads the
active version from disk.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from retrieval_workers.kb_store import PassageTable, read_manifest, verify_file
from retrieval_workers.types import PAD_TOKEN, SearchResult


class IndexShard:
    """Top-k inner-product search over passage ids [start, end) of a knowledge base."""

    def __init__(self, kb_dir: str, shard: int, omp_threads: int = 1, search_params: str = ""):
        faiss.omp_set_num_threads(omp_threads)
        self.kb_dir = Path(kb_dir)
        self.shard = shard
        manifest = read_manifest(kb_dir)
        self.start, self.end = manifest.shards[shard]
        self.version = manifest.active_version
        index_path = verify_file(kb_dir, manifest, manifest.shard_index_file(shard))
        self.index = faiss.read_index(str(index_path))
        if search_params:
            faiss.ParameterSpace().set_index_parameters(self.index, search_params)
        embeddings = np.load(verify_file(kb_dir, manifest, manifest.embeddings_file()), mmap_mode="r")
        self.embeddings = embeddings[self.start:self.end]
        passages = PassageTable(verify_file(kb_dir, manifest, manifest.passages_file))
        self.token_values, self.token_offsets = passages.token_ids("generator_ids", self.start, self.end)

    def ready(self) -> int:
        """Answers once the shard is loaded; returns the version it serves."""
        return self.version

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k of this shard for float32 queries [B, D]; ids are global, missing hits have id -1."""
        scores, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        found = local >= 0
        safe = np.where(found, local, 0)
        embeddings = np.where(found[..., None], self.embeddings[safe.ravel()].reshape(*safe.shape, -1), 0.0)
        starts, ends = self.token_offsets[safe], self.token_offsets[safe + 1]
        lengths = np.where(found, ends - starts, 0).astype(np.int32)
        token_ids = np.full((*safe.shape, max(int(lengths.max(initial=0)), 1)), PAD_TOKEN, dtype=np.int32)
        for (b, j), n in np.ndenumerate(lengths):
            token_ids[b, j, :n] = self.token_values[starts[b, j]:starts[b, j] + n]
        return SearchResult(
            ids=np.where(found, local + self.start, -1).astype(np.int64),
            scores=np.where(found, scores, -np.inf).astype(np.float32),
            embeddings=embeddings.astype(np.float32),
            token_ids=token_ids,
            lengths=lengths,
            version=self.version,
        )
