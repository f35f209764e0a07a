"""Two hosts made on this machine (tests/two_hosts.py): reachable from each other, each under its own name, and a
Ray cluster across them.

Marked `multinode`. Without root or iproute2 these tests are skipped, unless RAG_LIGHTNING_REQUIRE_MULTINODE=1 (set
by .ci/run): then they fail.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from retrieval_workers.types import ServiceSpec

from helpers import cli_env
from two_hosts import INTERFACE, two_hosts

pytestmark = pytest.mark.multinode


@pytest.fixture(autouse=True)
def root_with_namespaces():
    missing = [b for b in ("ip", "unshare") if shutil.which(b) is None]
    reason = f"no network namespaces here: missing {missing}" if missing else \
        "multi-node tests need root" if os.getuid() else None
    if reason:
        if os.environ.get("RAG_LIGHTNING_REQUIRE_MULTINODE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)

SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 45678)); s.listen(1)
print("listening", flush=True)
conn, peer = s.accept(); print(socket.gethostname(), peer[0], conn.recv(16).decode(), flush=True)
"""
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 45678), timeout=10); s.sendall(socket.gethostname().encode())
"""


def test_two_hosts_reach_each_other_under_their_own_names_and_are_removed_afterwards():
    with two_hosts() as (a, b):
        server = b.start(sys.executable, "-c", SERVER, b.address, stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        assert a.run(sys.executable, "-c", CLIENT, b.address).returncode == 0
        out, _ = server.communicate(timeout=10)
        assert out.split() == [b.name, a.address, a.name]
        # a host has a loopback of its own: a server on this machine's 127.0.0.1 is out of its reach
        with socket.socket() as outside:
            outside.bind(("127.0.0.1", 45678))
            outside.listen(1)
            assert a.run(sys.executable, "-c", CLIENT, "127.0.0.1").returncode != 0
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert a.name not in namespaces and b.name not in namespaces


@pytest.fixture(scope="module")
def ray_on_two_hosts(tmp_path_factory):
    """`ray start --head` on host a and `ray start --address` on host b, as slurm/train.sbatch starts them (token
    authentication, Ray's default); yields (a, b, the head's address, the environment for commands on the hosts)."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**cli_env(), "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": INTERFACE}
    with two_hosts("rlray") as (a, b), tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp_dir:
        # (the session's socket paths must stay within 107 bytes)
        head = a.run(ray, "start", "--head", f"--node-ip-address={a.address}", "--port=6379", "--num-cpus=2",
                     "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                     env=env, timeout=120)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = b.run(ray, "start", f"--address={a.address}:6379", f"--node-ip-address={b.address}",
                       "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env, timeout=120)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield a, b, f"{a.address}:6379", env


RAY_DRIVER = """
import ray, socket, sys
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(address=sys.argv[1])
print(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]))
group = ray.util.placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=60)
where = ray.remote(num_cpus=1)(lambda: socket.gethostname())
print(sorted(ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote()
                      for bundle in range(2)])))
ray.util.remove_placement_group(group)
"""


def test_a_ray_head_and_a_ray_worker_on_two_hosts(ray_on_two_hosts):
    """Both nodes join, and a placement group spread over them runs its tasks under each host's name."""
    a, b, address, env = ray_on_two_hosts
    driver = a.run(sys.executable, "-c", RAY_DRIVER, address, env=env, timeout=120)
    assert driver.returncode == 0, driver.stderr[-2000:]
    assert driver.stdout.splitlines()[-2:] == [str(sorted([a.address, b.address])), str(sorted([a.name, b.name]))]


WHERE_ACTORS_RUN = """
import json, socket, sys
import ray
ray.init(address=sys.argv[1], namespace=sys.argv[2])
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
where = {}
for name in sys.argv[3:]:
    actor = ray.get_actor(name)
    node_id, host = ray.get(actor.__ray_call__.remote(
        lambda shard: (ray.get_runtime_context().get_node_id(), socket.gethostname())), timeout=60)
    where[name] = [nodes[node_id], host]
print(json.dumps(where))
"""


def test_the_replicas_of_each_shard_run_on_different_nodes(ray_on_two_hosts, two_shard_kb):
    """`retrieval_workers.launch` with 2 shards x 2 replicas: Ray's node ids of the two replicas of each shard
    differ (and so do the hostnames their processes see), and each node holds one replica of every shard."""
    a, b, address, env = ray_on_two_hosts
    spec = ServiceSpec(kb_dir=str(two_shard_kb), num_shards=2, num_replicas=2, namespace="multinode")
    launch = a.run(sys.executable, "-m", "retrieval_workers.launch", f"--address={address}",
                   f"--kb-dir={two_shard_kb}", "--shards=2", "--replicas=2", "--namespace=multinode",
                   env=env, timeout=300)
    assert launch.returncode == 0, launch.stderr[-3000:]
    names = [spec.actor_name(shard, replica) for shard in range(2) for replica in range(2)]
    found = a.run(sys.executable, "-c", WHERE_ACTORS_RUN, address, "multinode", *names, env=env, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    where = json.loads(found.stdout.splitlines()[-1])
    for shard in range(2):
        replicas = [where[spec.actor_name(shard, replica)] for replica in range(2)]
        assert sorted(replicas) == sorted([[a.address, a.name], [b.address, b.name]]), (shard, where)
