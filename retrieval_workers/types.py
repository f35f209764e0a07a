"""The typed boundary between the training side and the retrieval service."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RetrievalWorkersError(Exception):
    """The base of every error the retrieval side raises for what it was given or found: a knowledge base that is
    missing, busy or corrupted, a Ray address where nothing answers, a shard no replica of which answers. Each
    message names the file, address or shard; the training side reports it in one line."""


@dataclass
class ServiceSpec:
    """Where the shard actors live and how many there are; enough for any process to attach."""

    kb_dir: str
    num_shards: int
    num_replicas: int
    namespace: str = "rag_lightning"
    name_prefix: str = "kb"
    omp_threads: int = 1  # FAISS threads per actor
    actor_cpus: float = 0.0  # CPUs Ray reserves per actor
    search_params: str = ""  # faiss.ParameterSpace string, e.g. "efSearch=64" or "nprobe=16"
    failover_timeout_s: float = 120.0  # how long a search waits for some replica of a shard to answer

    def actor_name(self, shard: int, replica: int) -> str:
        return f"{self.name_prefix}-shard{shard}-replica{replica}"

    def placement_group_name(self, shard: int) -> str:
        return f"{self.name_prefix}-shard{shard}-replicas-{self.num_replicas}"


@dataclass
class SearchResult:
    """Top-k passages for a batch of B queries.

    token_ids holds each passage's generator token ids, right-padded with -1 to the longest
    of the batch; lengths gives each passage's true length. A search with the questions' texts
    (RetrievalClient.search) returns the union of the dense and the BM25 candidates, with both scores.
    """

    ids: np.ndarray  # int64 [B, k], global passage ids
    scores: np.ndarray  # float32 [B, k], inner products q . d, best first (of a union: the dense ones first)
    embeddings: np.ndarray  # float32 [B, k, D], the stored passage embeddings
    token_ids: np.ndarray  # int32 [B, k, L]
    lengths: np.ndarray  # int32 [B, k]
    version: int  # the index version that answered
    active_version: int  # the version the shards serve by default now (newer during a switch)
    bm25: np.ndarray | None = None  # float32 [B, k], each candidate's BM25 score; None: a dense search


PAD_TOKEN = -1


@dataclass
class RefreshSpec:
    """The encoder actors that re-encode the knowledge base, and how many versions stay on disk."""

    num_workers: int = 1  # encoder actors; shards are handed out to them in turn
    worker_cpus: float = 1.0  # CPUs Ray reserves per encoder actor (also its torch threads)
    worker_gpus: float = 0.0  # GPUs per encoder actor (bf16 encoding on a GPU)
    batch_size: int = 64
    keep_versions: int = 2
    cpu_affinity: tuple[int, ...] = ()  # pin the encoder actors to these cores (benchmarks)


@dataclass
class RefreshReport:
    """The outcome of one refresh; error is None when the new version was committed and switched to."""

    version: int
    global_step: int
    wall_s: float
    passages: int
    encode_s: float
    error: str | None = None

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.wall_s if self.wall_s > 0 else 0.0
