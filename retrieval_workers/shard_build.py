"""Embed one shard's passages and write its files into a version folder.

The knowledge-base build (in the trainer's process) and the refresh encoder actors (in Ray)
both make a version this way, from the context-encoder token ids stored in the passage
table: the raw source is never read again.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from retrieval_workers.encoding import TextEncoder, encode_token_ids
from retrieval_workers.kb_store import (
    PassageTable,
    shard_embeddings_name,
    shard_index_name,
)


def build_shard(encoder: TextEncoder, passages: PassageTable, shard: int, start: int, end: int, factory: str,
                version_dir: Path, batch_size: int) -> None:
    """Encode passages [start, end) and write shard `shard`'s index and embeddings into version_dir."""
    values, offsets = passages.token_ids("encoder_ids", start, end)
    embeddings = encode_token_ids(encoder, values, offsets, batch_size, desc=f"encoding shard {shard}")
    write_shard(version_dir, shard, embeddings, factory)


def write_shard(version_dir: Path, shard: int, embeddings: np.ndarray, factory: str) -> None:
    """Build a FAISS inner-product index of the given type over the embeddings and save both."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    faiss.write_index(build_index(vectors, factory), str(version_dir / shard_index_name(shard)))
    np.save(version_dir / shard_embeddings_name(shard), vectors)


def build_index(embeddings: np.ndarray, factory: str) -> faiss.Index:
    """A FAISS inner-product index of the factory's type over float32 embeddings [n, D] (trained if it needs it)."""
    index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(embeddings)
    index.add(embeddings)
    return index
