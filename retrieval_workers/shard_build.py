"""Embed one shard's passages and write its files into a version folder, timing each step.

The knowledge-base build (in the trainer's process) and the refresh encoder actors (in Ray)
both make a version this way, from the context-encoder token ids stored in the passage
table: the raw source is never read again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

import faiss
import numpy as np

from retrieval_workers.encoding import TextEncoder, encode_token_ids
from retrieval_workers.kb_store import (
    PassageTable,
    shard_embeddings_name,
    shard_index_name,
)


@dataclass
class ShardTimes:
    """Seconds each step of making shards took (summed over the shards added together)."""

    encode_s: float = 0.0
    index_train_s: float = 0.0
    index_add_s: float = 0.0
    write_s: float = 0.0  # the index and embeddings files

    def add(self, other: ShardTimes) -> None:
        for step in fields(ShardTimes):
            setattr(self, step.name, getattr(self, step.name) + getattr(other, step.name))


def build_shard(
    encoder: TextEncoder,
    passages: PassageTable,
    shard: int,
    start: int,
    end: int,
    factory: str,
    version_dir: Path,
    batch_size: int,
) -> ShardTimes:
    """Encode passages [start, end) and write shard `shard`'s index and embeddings into version_dir."""
    started = time.perf_counter()
    values, offsets = passages.token_ids("encoder_ids", start, end)
    embeddings = encode_token_ids(encoder, values, offsets, batch_size, desc=f"encoding shard {shard}")
    encode_s = time.perf_counter() - started
    times = write_shard(version_dir, shard, embeddings, factory)
    times.encode_s = encode_s
    return times


def write_shard(version_dir: Path, shard: int, embeddings: np.ndarray, factory: str) -> ShardTimes:
    """Build a FAISS inner-product index of the given type over the embeddings and save both."""
    times = ShardTimes()
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = build_index(vectors, factory, times)
    started = time.perf_counter()
    faiss.write_index(index, str(version_dir / shard_index_name(shard)))
    np.save(version_dir / shard_embeddings_name(shard), vectors)
    times.write_s = time.perf_counter() - started
    return times


def build_index(embeddings: np.ndarray, factory: str, times: ShardTimes | None = None) -> faiss.Index:
    """A FAISS inner-product index of the factory's type over float32 embeddings [n, D] (trained if it needs it);
    the seconds of training and adding go into `times` when given."""
    index = faiss.index_factory(embeddings.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    if not index.is_trained:
        index.train(embeddings)
    trained = time.perf_counter()
    index.add(embeddings)
    if times is not None:
        times.index_train_s += trained - started
        times.index_add_s += time.perf_counter() - trained
    return index
