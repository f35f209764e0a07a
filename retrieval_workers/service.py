"""The sharded, replicated retrieval service: S shards x R replicas of named IndexShard actors.

`launch_service` creates the actors once per job (idempotently); `RetrievalClient` attaches
to them by name from any process of the job and makes ONE batched call per shard per
search, merging the shard top-k lists into the exact global top-k. `switch_version`
moves every replica to a committed index version without mixing versions in any result.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import cast

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from retrieval_workers.index_shard import IndexShard
from retrieval_workers.kb_store import KnowledgeBaseError, read_manifest
from retrieval_workers.types import PAD_TOKEN, RetrievalWorkersError, SearchResult, ServiceSpec

# Ray warns for every restartable detached actor in a placement group, since removing the group kills it
# for good; the service removes its group only when it shuts down, so the warning says nothing here.
logging.getLogger("ray.actor").addFilter(lambda record: "restartable detached actor" not in record.getMessage())
# A shard actor answers one search at a time, on its own omp_threads: a replica's CPU use stays what Ray
# reserved for it, and replicas, not threads, add search capacity. Version switches run in a separate
# "control" group of threads, so searches go on while a new version loads.
CONTROL = "control"
RemoteIndexShard = ray.remote(concurrency_groups={CONTROL: 2})(IndexShard)


def launch_service(spec: ServiceSpec, timeout_s: float = 300.0) -> None:
    """Create every shard replica actor (existing ones are reused) and wait until all are loaded.

    The R replicas of a shard sit in a placement group of their own, of R bundles with the SPREAD strategy, so
    on a cluster of several nodes they land on different nodes where there are enough (and a node lost takes
    at most one replica of a shard with it). SPREAD, not STRICT_SPREAD: on fewer nodes than replicas, and after
    a node is lost, the replicas share nodes instead of waiting for one that may never come.
    """
    manifest = read_manifest(spec.kb_dir)
    if len(manifest.shards) != spec.num_shards:
        raise KnowledgeBaseError(
            f"index.shards={spec.num_shards} but the knowledge base in {spec.kb_dir} "
            f"has {len(manifest.shards)} shards; rebuild it or change index.shards"
        )
    groups = [_placement_group(spec, shard, timeout_s) for shard in range(spec.num_shards)]
    actors = [
        RemoteIndexShard.options(
            name=spec.actor_name(shard, replica),
            namespace=spec.namespace,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=spec.actor_cpus,
            max_restarts=-1,
            max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(groups[shard], placement_group_bundle_index=replica),
        ).remote(spec.kb_dir, shard, spec.omp_threads, spec.search_params)
        for shard in range(spec.num_shards)
        for replica in range(spec.num_replicas)
    ]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
    except ray.exceptions.ActorDiedError as e:
        # An exception in __init__ kills the actor for good (Ray never restarts a failed creation, whatever
        # max_restarts says) and reaches us only as text ending in "<module>.<class>: <message>"; a corrupted
        # or mismatched knowledge base is raised again as the KnowledgeBaseError it was, without Ray's traceback.
        _, marker, message = str(e).rpartition(f"{KnowledgeBaseError.__module__}.{KnowledgeBaseError.__name__}: ")
        if e.actor_init_failed and marker:
            raise KnowledgeBaseError(message.strip()) from None
        raise


def _placement_group(spec: ServiceSpec, shard: int, timeout_s: float) -> PlacementGroup:
    """The placement group of a shard's replicas, created on first use."""
    name = spec.placement_group_name(shard)
    try:
        group = ray.util.get_placement_group(name)
    except ValueError:
        bundle = {"CPU": max(spec.actor_cpus, 0.001)}  # Ray refuses empty bundles
        group = ray.util.placement_group(
            [bundle] * spec.num_replicas, strategy="SPREAD", name=name, lifetime="detached"
        )
    if not group.wait(timeout_s):
        raise ShardUnavailable(
            f"placement group {name!r} for the {spec.num_replicas} replicas of shard {shard} was not "
            f"placed within {timeout_s:.0f}s"
        )
    return group


def switch_version(spec: ServiceSpec, version: int, timeout_s: float = 600.0) -> None:
    """Move every replica to `version`, which the manifest must already list.

    Two phases: every replica loads the version beside the one it serves, then every
    replica activates it. A client whose query meets shards on both sides of the switch
    re-asks for the newer version, which every replica holds by then.
    """
    actors = [
        ray.get_actor(spec.actor_name(shard, replica), namespace=spec.namespace)
        for shard in range(spec.num_shards)
        for replica in range(spec.num_replicas)
    ]
    ray.get([a.load_version.options(concurrency_group=CONTROL).remote(version) for a in actors], timeout=timeout_s)
    ray.get([a.activate.options(concurrency_group=CONTROL).remote(version) for a in actors], timeout=timeout_s)


def shutdown_service(spec: ServiceSpec) -> None:
    """Kill every shard replica actor of the spec that is alive, and remove their placement groups."""
    for shard in range(spec.num_shards):
        for replica in range(spec.num_replicas):
            try:
                ray.kill(ray.get_actor(spec.actor_name(shard, replica), namespace=spec.namespace))
            except ValueError:
                pass
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(spec.placement_group_name(shard)))
        except ValueError:
            pass


class RetrievalClient:
    """Searches all shards of a running service; one instance per training process.

    Each shard is asked at its preferred replica (chosen by `replica_offset`, e.g. the rank).
    When that replica's actor dies, the same query goes to the shard's other replicas in turn,
    within the same search, while Ray restarts the dead one from disk. With one replica the
    search waits for that restart. A shard that no replica answers within the spec's
    `failover_timeout_s` raises ShardUnavailable, naming the shard and its replicas. Threads may share a client
    (a training loader's background retrieval and the validation loop's): it runs one search at a time.
    """

    def __init__(self, spec: ServiceSpec, replica_offset: int = 0, attach_timeout_s: float = 60.0):
        self.spec = spec
        order = [
            [(replica_offset + shard + i) % spec.num_replicas for i in range(spec.num_replicas)]
            for shard in range(spec.num_shards)
        ]  # per shard: the preferred replica first
        self.replicas = [
            [_get_actor_with_retry(spec.actor_name(shard, r), spec.namespace, attach_timeout_s) for r in replicas]
            for shard, replicas in enumerate(order)
        ]
        self.version: int | None = None  # the index version asked for; follows the service's switches
        self.switch_retries = 0
        self.switch_retry_s = 0.0
        self.failovers = 0  # searches answered by another replica after an actor died
        self.last_search_ms = 0.0  # wall time of the last search
        self._searching = threading.Lock()

    @property
    def shards(self) -> list:
        """The preferred replica of each shard."""
        return [replicas[0] for replicas in self.replicas]

    def search(self, queries: np.ndarray, k: int, texts: list[str] | None = None) -> SearchResult:
        """Exact global top-k over all shards for float32 queries [B, D], all from one index version.

        With the questions' texts (a knowledge base built with a sparse index), the union of the global dense
        top-k and BM25 top-k instead, each candidate with both scores (merge_union)."""
        with self._searching:
            return self._search(queries, k, texts)

    def _search(self, queries: np.ndarray, k: int, texts: list[str] | None) -> SearchResult:
        started = time.perf_counter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts = self._search_shards(queries, k, self.version, texts)
        if len({p.version for p in parts}) > 1:  # a switch landed between the shards' answers
            started = time.perf_counter()
            parts = self._search_shards(queries, k, max(p.version for p in parts), texts)
            self.switch_retries += 1
            self.switch_retry_s += time.perf_counter() - started
        result = merge_top_k(parts, k) if texts is None else merge_union(parts, k)
        self.version = result.active_version
        self.last_search_ms = 1000 * (time.perf_counter() - started)
        return result

    def _search_shards(
        self, queries: np.ndarray, k: int, version: int | None, texts: list[str] | None
    ) -> list[SearchResult]:
        pending = [replicas[0].search.remote(queries, k, version, texts) for replicas in self.replicas]
        return [self._answer(shard, ref, queries, k, version, texts) for shard, ref in enumerate(pending)]

    def _answer(
        self,
        shard: int,
        ref: ray.ObjectRef,
        queries: np.ndarray,
        k: int,
        version: int | None,
        texts: list[str] | None,
    ) -> SearchResult:
        """The shard's answer from its preferred replica, else from the next replica that answers."""
        try:
            return ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        deadline = time.monotonic() + self.spec.failover_timeout_s
        replicas = self.replicas[shard]
        for attempt in itertools.count(1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                result = ray.get(
                    replicas[attempt % len(replicas)].search.remote(queries, k, version, texts), timeout=remaining
                )
                self.failovers += 1
                return result
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                time.sleep(min(0.2, max(remaining, 0.0)))
            except ray.exceptions.GetTimeoutError:
                break
        names = ", ".join(self.spec.actor_name(shard, r) for r in range(self.spec.num_replicas))
        raise ShardUnavailable(
            f"index shard {shard}: no replica ({names}) answered within "
            f"{self.spec.failover_timeout_s:.0f}s after its actor died; raise "
            f"service.failover_timeout_s or index.replicas, or check the Ray logs"
        )


class ShardUnavailable(RetrievalWorkersError, RuntimeError):
    """An index shard that cannot serve: no replica answered within the failover timeout, its replicas could not
    be placed on the cluster, or its actors are not there to attach to."""


def merge_top_k(parts: list[SearchResult], k: int) -> SearchResult:
    """Merge per-shard top-k results into the global top-k by descending score."""
    if len(parts) == 1:
        return parts[0]
    scores = np.concatenate([p.scores for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return _gather(parts, order)


def merge_union(parts: list[SearchResult], k: int) -> SearchResult:
    """The global union of the shards' dense and BM25 candidates (IndexShard.search with texts), by union_columns'
    rule over the shards' results laid side by side."""
    ids = np.concatenate([p.ids for p in parts], axis=1)
    dense = np.concatenate([p.scores for p in parts], axis=1)
    bm25 = np.concatenate([cast(np.ndarray, p.bm25) for p in parts], axis=1)
    chosen = union_columns(ids, dense, bm25, k)
    width = min(map(len, chosen))
    return _gather(parts, np.array([columns[:width] for columns in chosen], dtype=np.int64).reshape(len(ids), width))


def union_columns(ids: np.ndarray, dense: np.ndarray, bm25: np.ndarray, k: int) -> list[list[int]]:
    """Which columns of candidates ids [B, W] (passage ids, -1 for none) with their dense and BM25 scores make
    each question's union at width k: its dense top-k, then those of its BM25 top-k not among them, then its next
    dense candidates, to 2k passages (fewer where there are fewer), so that every question has as many. A passage
    listed twice counts once; ties are broken by passage id. The merge of the shards' candidates, and, over a
    deeper union, the candidates a search of depth k would have returned."""
    chosen = []
    for row_ids, row_dense, row_bm25 in zip(ids, dense, bm25):
        unique, first = np.unique(row_ids, return_index=True)  # a passage in both of its shard's lists: the first
        first = first[unique >= 0]
        by_dense = first[np.lexsort((row_ids[first], -row_dense[first]))]
        matching = first[row_bm25[first] > 0]
        by_bm25 = matching[np.lexsort((row_ids[matching], -row_bm25[matching]))][:k]
        columns = list(by_dense[:k])
        taken = set(row_ids[columns].tolist())
        for column in itertools.chain(by_bm25, by_dense[k:]):
            if len(columns) == 2 * k:
                break
            if row_ids[column] not in taken:
                columns.append(column)
                taken.add(row_ids[column])
        chosen.append(columns)
    return chosen


def _gather(parts: list[SearchResult], order: np.ndarray) -> SearchResult:
    """The candidates at columns order [B, k] of the shards' results laid side by side."""
    versions = {p.version for p in parts}
    if len(versions) != 1:
        raise RuntimeError(f"shards answered from different index versions {sorted(versions)}")
    rows = np.arange(order.shape[0])[:, None]
    width = max(p.token_ids.shape[2] for p in parts)
    token_ids = np.concatenate(
        [
            np.pad(p.token_ids, ((0, 0), (0, 0), (0, width - p.token_ids.shape[2])), constant_values=PAD_TOKEN)
            for p in parts
        ],
        axis=1,
    )[rows, order]
    lengths = np.concatenate([p.lengths for p in parts], axis=1)[rows, order]
    return SearchResult(
        ids=np.concatenate([p.ids for p in parts], axis=1)[rows, order],
        scores=np.concatenate([p.scores for p in parts], axis=1)[rows, order],
        embeddings=np.concatenate([p.embeddings for p in parts], axis=1)[rows, order],
        token_ids=token_ids[..., : max(int(lengths.max(initial=0)), 1)],
        lengths=lengths,
        version=versions.pop(),
        active_version=max(p.active_version for p in parts),
        bm25=None if parts[0].bm25 is None else np.concatenate([p.bm25 for p in parts], axis=1)[rows, order],
    )


def _get_actor_with_retry(name: str, namespace: str, timeout_s: float):
    """Look a named actor up, retrying while the launching process may still be creating it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.monotonic() > deadline:
                raise ShardUnavailable(
                    f"retrieval actor {name!r} not found in Ray namespace {namespace!r} "
                    f"after {timeout_s:.0f}s; was the service launched?"
                ) from None
            time.sleep(0.5)
