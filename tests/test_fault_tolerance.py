"""Shard replica actors that die: the client fails over within the search, and Ray restarts them from disk."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

from conftest import tiny_kb_config, unique_spec, write_documents
from rag_lightning.build_kb import build_knowledge_base
from rag_lightning.config import IndexConfig
from retrieval_workers.kb_store import load_embeddings, read_manifest
from retrieval_workers.service import RetrievalClient, ShardUnavailable, launch_service, shutdown_service


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    source = tmp_path_factory.mktemp("source") / "kb.jsonl"
    write_documents(source, 10)
    kb_dir = tmp_path_factory.mktemp("kb")
    build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(factory="Flat", shards=2))
    return kb_dir


@pytest.fixture
def queries(kb_dir):
    return load_embeddings(kb_dir, read_manifest(kb_dir))[[1, 12, 25]]


def _pid(actor) -> int:
    """The actor's process id, once it answers (calls that meet a restart fail, so they are repeated)."""
    for _ in range(300):
        try:
            return ray.get(actor.__ray_call__.remote(lambda shard: os.getpid()), timeout=120)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
    raise AssertionError("the actor did not come back")


def test_a_dead_replica_fails_over_to_another_within_the_search(ray_cluster, kb_dir, queries):
    """A replica whose actor is gone (a lost node, or a call in flight when it died) fails the call at once:
    the client asks the shard's other replica in the same search. (A call made while Ray restarts an actor
    waits for the restart instead: see the next test.)"""
    spec = unique_spec(kb_dir, shards=2, replicas=2)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        ray.kill(client.replicas[0][0], no_restart=True)

        after = client.search(queries, 4)
        assert client.failovers == 1, "shard 0's answer came from its other replica"
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
        client.search(queries, 4)
        assert client.failovers == 2
    finally:
        shutdown_service(spec)


def test_a_killed_actor_restarts_from_disk_and_the_search_waits_for_it(ray_cluster, kb_dir, queries):
    spec = unique_spec(kb_dir, shards=2, replicas=1)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        victim = client.replicas[1][0]
        pid = _pid(victim)
        ray.kill(victim, no_restart=False)
        # answered by the restarted actor: through the client's retry, or by Ray holding the call until then
        np.testing.assert_array_equal(client.search(queries, 4).ids, before.ids)
        assert _pid(victim) != pid
    finally:
        shutdown_service(spec)


def test_a_shard_without_any_live_replica_fails_with_a_clear_error(ray_cluster, kb_dir, queries):
    spec = unique_spec(kb_dir, shards=2, replicas=1, failover_timeout_s=3.0)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        ray.kill(client.replicas[1][0], no_restart=True)
        with pytest.raises(ShardUnavailable, match=rf"index shard 1: no replica \({spec.actor_name(1, 0)}\) "
                                                   r"answered within 3s.*retrieval.failover_timeout_s"):
            client.search(queries, 4)
    finally:
        shutdown_service(spec)
