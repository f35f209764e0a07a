"""IndexShard: one contiguous range of passages with its FAISS index (and BM25 index, when the knowledge base has
one), served as a Ray actor.

The class is plain Python (tests and benchmarks can use it in-process); `service.py`
wraps it with `ray.remote`: searches one at a time, and version loads and switches on
threads of their own, so a new version loads while searches go on. A restarted actor
re-runs __init__, which reloads the active version from disk.

A shard holds one version, or two during a switch: `load_version` reads the new one
beside the active one, `activate` makes it the one served and drops the others. A
search may ask for a version; it is answered from that version while the shard still
holds it, so all shards of one query answer from the same version.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval_workers.kb_store import MANIFEST, KnowledgeBaseError, PassageTable, read_manifest, verify_file
from retrieval_workers.types import PAD_TOKEN, SearchResult


@dataclass
class ShardVersion:
    """The data of one shard in one index version."""

    index: faiss.Index
    embeddings: np.ndarray  # [shard size, D], memory-mapped


def _check_shape(path: Path, what: str, found: tuple, expected: tuple[int, int]) -> None:
    """Refuse a shard file whose (rows, dimension) is not what manifest.json says."""
    if tuple(found) != expected:
        raise KnowledgeBaseError(
            f"{path}: {what} of {found[0]} vectors of dimension {found[-1]}, but "
            f"{MANIFEST} says {expected[0]} passages of dimension {expected[1]} for this "
            "shard; rebuild the knowledge base"
        )


class IndexShard:
    """Top-k inner-product search over passage ids [start, end) of a knowledge base."""

    def __init__(self, kb_dir: str, shard: int, omp_threads: int = 1, search_params: str = ""):
        faiss.omp_set_num_threads(omp_threads)
        self.kb_dir = Path(kb_dir)
        self.shard = shard
        self.search_params = search_params
        manifest = read_manifest(kb_dir)
        self.start, self.end = manifest.shards[shard]
        passages = PassageTable(verify_file(kb_dir, manifest, manifest.passages_file))
        self.token_values, self.token_offsets = passages.token_ids("generator_ids", self.start, self.end)
        self.sparse = None
        if manifest.sparse is not None:  # imported here: bm25s brings scipy, which a dense shard does without
            from retrieval_workers.sparse_index import SparseShard

            self.sparse = SparseShard(kb_dir, manifest, shard)
        self._lock = threading.Lock()
        self._versions: dict[int, ShardVersion] = {}
        self.active = self.load_version(manifest.active_version)

    def ready(self) -> int:
        """Answers once the shard is loaded; returns the version it serves."""
        return self.active

    def load_version(self, version: int) -> int:
        """Read a committed version from disk beside the active one; returns it.

        Checksums are verified, and an index or embeddings file whose dimension or row count differs from
        what the manifest says for this shard is refused (KnowledgeBaseError naming the file).
        """
        manifest = read_manifest(self.kb_dir)
        start, end = manifest.shards[self.shard]
        expected = (end - start, manifest.dim)
        index_file = verify_file(self.kb_dir, manifest, manifest.shard_index_file(self.shard, version))
        index = faiss.read_index(str(index_file))
        _check_shape(index_file, "an index", (index.ntotal, index.d), expected)
        if self.search_params:
            # faiss' stub types the value an int; the call takes a whole "name=value,..." string
            faiss.ParameterSpace().set_index_parameters(index, self.search_params)  # type: ignore[arg-type]
        embeddings_file = verify_file(self.kb_dir, manifest, manifest.embeddings_file(self.shard, version))
        embeddings = np.load(embeddings_file, mmap_mode="r")
        _check_shape(embeddings_file, "embeddings", embeddings.shape, expected)
        with self._lock:
            self._versions[version] = ShardVersion(index, embeddings)
        return version

    def activate(self, version: int) -> int:
        """Serve `version` (already loaded) by default from now on and drop every other version."""
        with self._lock:
            if version not in self._versions:
                raise ValueError(f"shard {self.shard}: version {version} is not loaded")
            self.active = version
            self._versions = {version: self._versions[version]}
        return version

    def search(
        self, queries: np.ndarray, k: int, version: int | None = None, texts: list[str] | None = None
    ) -> SearchResult:
        """Top-k of this shard for float32 queries [B, D]; ids are global, missing hits have id -1.

        With the questions' texts (a knowledge base with a sparse index): the dense top-2k and the BM25 top-k
        of the shard, side by side, each candidate with both its scores (q . d, exactly, for a BM25 candidate);
        the service's merge makes the global union of them (service.merge_union).

        Answers from `version` if this shard holds it, else from the active version; the
        result says which, and which version is active.
        """
        with self._lock:
            answered = version if version in self._versions else self.active
            data, active = self._versions[answered], self.active
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if texts is None:
            scores, local = data.index.search(queries, k)
            return self._result(data, local, scores, answered, active)
        if self.sparse is None:
            raise KnowledgeBaseError(f"{self.kb_dir}: a search with texts, but the knowledge base has no sparse index")
        dense_scores, dense_local = data.index.search(queries, 2 * k)
        matches = self.sparse.matches(texts)
        local = np.concatenate([dense_local, self.sparse.top_k(matches, k)], axis=1)
        result = self._result(data, local, dense_scores, answered, active)
        exact = np.einsum("bd,bkd->bk", queries, result.embeddings[:, 2 * k :])
        result.scores[:, 2 * k :] = np.where(local[:, 2 * k :] >= 0, exact, -np.inf)
        result.bm25 = self.sparse.scores_of(matches, local)
        return result

    def _result(
        self, data: ShardVersion, local: np.ndarray, dense_scores: np.ndarray, answered: int, active: int
    ) -> SearchResult:
        """The passages at shard positions local [B, k] (-1: none) with their vectors and generator ids;
        dense_scores [B, <= k] are the first columns' scores, the others' are -inf."""
        found = local >= 0
        safe = np.where(found, local, 0)
        embeddings = np.where(found[..., None], data.embeddings[safe.ravel()].reshape(*safe.shape, -1), 0.0)
        starts, ends = self.token_offsets[safe], self.token_offsets[safe + 1]
        lengths = np.where(found, ends - starts, 0).astype(np.int32)
        token_ids = np.full((*safe.shape, max(int(lengths.max(initial=0)), 1)), PAD_TOKEN, dtype=np.int32)
        for (b, j), n in np.ndenumerate(lengths):
            token_ids[b, j, :n] = self.token_values[starts[b, j] : starts[b, j] + n]
        scores = np.full(local.shape, -np.inf, dtype=np.float32)
        scores[:, : dense_scores.shape[1]] = np.where(found[:, : dense_scores.shape[1]], dense_scores, -np.inf)
        return SearchResult(
            ids=np.where(found, local + self.start, -1).astype(np.int64),
            scores=scores,
            embeddings=embeddings.astype(np.float32),
            token_ids=token_ids,
            lengths=lengths,
            version=answered,
            active_version=active,
        )
