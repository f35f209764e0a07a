"""Shard replica actors that die: the client fails over within the search, and Ray restarts them from disk."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
import ray

from retrieval_workers.kb_store import load_embeddings, read_manifest
from retrieval_workers.service import RetrievalClient, ShardUnavailable, launch_service, shutdown_service

from helpers import actor_pid, unique_spec


@pytest.fixture
def queries(two_shard_kb):
    return load_embeddings(two_shard_kb, read_manifest(two_shard_kb))[[1, 12, 25]]


def _wait_until_dead(actor) -> None:
    """ray.kill returns at once, and calls sent right after it may still be answered: wait until they fail."""
    for _ in range(300):
        try:
            ray.get(actor.ready.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def test_a_dead_replica_fails_over_to_another_within_the_search(ray_cluster, two_shard_kb, queries):
    """A replica whose actor is gone (a lost node, or a call in flight when it died) fails the call at once:
    the client asks the shard's other replica in the same search. (A call made while Ray restarts an actor
    waits for the restart instead: see the next test.)"""
    spec = unique_spec(two_shard_kb, shards=2, replicas=2)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        ray.kill(client.replicas[0][0], no_restart=True)
        _wait_until_dead(client.replicas[0][0])

        after = client.search(queries, 4)
        assert client.failovers == 1, "shard 0's answer came from its other replica"
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
        client.search(queries, 4)
        assert client.failovers == 2
    finally:
        shutdown_service(spec)


def test_a_killed_actor_restarts_from_disk_and_the_search_waits_for_it(ray_cluster, two_shard_kb, queries):
    spec = unique_spec(two_shard_kb, shards=2, replicas=1)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(queries, 4)
        victim = client.replicas[1][0]
        pid = actor_pid(victim)
        ray.kill(victim, no_restart=False)
        # ray.kill returns at once, and a call sent before the process is gone may still be answered by it
        deadline = time.monotonic() + 60
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # answered by the restarted actor: through the client's retry, or by Ray holding the call until then
        np.testing.assert_array_equal(client.search(queries, 4).ids, before.ids)
        assert actor_pid(victim) != pid
    finally:
        shutdown_service(spec)


def test_a_shard_without_any_live_replica_fails_with_a_clear_error(ray_cluster, two_shard_kb, queries):
    spec = unique_spec(two_shard_kb, shards=2, replicas=1, failover_timeout_s=3.0)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        ray.kill(client.replicas[1][0], no_restart=True)
        _wait_until_dead(client.replicas[1][0])
        with pytest.raises(
            ShardUnavailable,
            match=rf"index shard 1: no replica \({spec.actor_name(1, 0)}\) "
            r"answered within 3s.*service.failover_timeout_s",
        ):
            client.search(queries, 4)
    finally:
        shutdown_service(spec)
