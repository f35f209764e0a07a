"""Shard replica actors that die: the client fails over within the search and Ray restarts them from disk."""
from __future__ import annotations

import os

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
    return ray.get(actor.__ray_call__.remote(lambda shard: os.getpid()), timeout=120)


def test_a_killed_replica_fails_over_within_the_search_and_restarts_from_disk(ray_cluster, kb_dir, queries):
    spec = unique_spec(kb_dir, shards=2, replicas=2)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        victim = client.replicas[0][0]
        pid = _pid(victim)
        ray.kill(victim, no_restart=False)

        after = client.search(queries, 4)
        assert client.failovers == 1, "shard 0's answer came from its other replica"
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
        assert _pid(victim) != pid, "Ray restarted the dead replica in a new process"
        np.testing.assert_array_equal(ray.get(victim.search.remote(queries, 4, None)).ids,
                                      ray.get(client.replicas[0][1].search.remote(queries, 4, None)).ids)
    finally:
        shutdown_service(spec)


def test_with_one_replica_the_search_waits_for_the_restart(ray_cluster, kb_dir, queries):
    spec = unique_spec(kb_dir, shards=2, replicas=1)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        ray.kill(client.replicas[1][0], no_restart=False)
        np.testing.assert_array_equal(client.search(queries, 4).ids, before.ids)
        assert client.failovers == 1
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
