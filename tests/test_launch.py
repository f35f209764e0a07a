"""Ray modes: the standalone shard-actor launcher on a running cluster, and jobs with their own local Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import ray

from retrieval_workers.kb_store import load_embeddings, read_manifest
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service

from helpers import REPO_ROOT, TEST_NAMESPACE, last_json_object, unique_spec


def _launch(address: str, spec, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "retrieval_workers.launch",
            "--address",
            address,
            "--kb-dir",
            spec.kb_dir,
            "--shards",
            str(spec.num_shards),
            "--replicas",
            str(spec.num_replicas),
            "--namespace",
            spec.namespace,
            "--prefix",
            spec.name_prefix,
            *extra,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _actor_ids(spec) -> list:
    return [
        ray.get_actor(spec.actor_name(s, r), namespace=spec.namespace)._actor_id
        for s in range(spec.num_shards)
        for r in range(spec.num_replicas)
    ]


def test_launcher_is_idempotent_places_a_group_and_tears_down(ray_cluster, two_shard_kb, subprocess_env):
    spec = unique_spec(two_shard_kb, shards=2, replicas=2)
    first = _launch(ray_cluster, spec, env=subprocess_env)
    assert first.returncode == 0, first.stderr[-2000:]
    ids = _actor_ids(spec)
    again = _launch(ray_cluster, spec, env=subprocess_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _actor_ids(spec) == ids, "a second launch must reuse the running actors"

    for shard in range(2):  # a group of its own for each shard's replicas
        group = ray.util.get_placement_group(spec.placement_group_name(shard))
        assert group.bundle_count == 2
        assert ray.util.placement_group_table(group)["strategy"] == "SPREAD"

    embeddings = load_embeddings(spec.kb_dir, read_manifest(spec.kb_dir))
    queries = embeddings[[3, 17]]
    result = RetrievalClient(spec, replica_offset=1).search(queries, k=1)
    np.testing.assert_array_equal(result.ids[:, 0], np.argmax(queries @ embeddings.T, axis=1))

    down = _launch(ray_cluster, spec, "--teardown", env=subprocess_env)
    assert down.returncode == 0, down.stderr[-2000:]
    for s in range(2):
        with pytest.raises(ValueError):
            ray.get_actor(spec.actor_name(s, 0), namespace=spec.namespace)
        with pytest.raises(ValueError):
            ray.util.get_placement_group(spec.placement_group_name(s))


def test_launcher_refuses_a_missing_knowledge_base(ray_cluster, tmp_path, subprocess_env):
    spec = unique_spec(tmp_path / "no_kb", shards=2, replicas=1)
    proc = _launch(ray_cluster, spec, env=subprocess_env)
    assert proc.returncode == 2
    assert str(tmp_path / "no_kb") in proc.stderr and "Traceback" not in proc.stderr


JOB = """
import json, os
import ray
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import launch_service, RetrievalClient
from retrieval_workers.types import ServiceSpec
spec = ServiceSpec(**json.loads(os.environ["SPEC"]))
address = connect(namespace=spec.namespace, num_cpus=1)
launch_service(spec)
RetrievalClient(spec)
print(json.dumps({"address": address, "session_dir": ray._private.worker.global_worker.node.get_session_dir_path()}))
"""


@pytest.mark.slow
def test_a_second_job_on_the_node_gets_its_own_ray(ray_cluster, two_shard_kb, subprocess_env):
    """A job beside a running one starts its own Ray (own ports and temp dir); equal actor names do not clash."""
    spec = unique_spec(two_shard_kb, shards=2, replicas=1)
    launch_service(spec)
    try:
        env = {**subprocess_env, "SPEC": json.dumps(spec.__dict__)}
        proc = subprocess.run(
            [sys.executable, "-c", JOB], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        other = last_json_object(proc.stdout)
        assert other["address"] != ray_cluster
        assert other["session_dir"].startswith("/tmp/ray_")
        assert not other["session_dir"].startswith(ray._private.worker.global_worker.node.get_session_dir_path())
        assert ray.get_actor(spec.actor_name(0, 0), namespace=TEST_NAMESPACE)  # ours still here
    finally:
        shutdown_service(spec)
