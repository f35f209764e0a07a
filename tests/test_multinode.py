"""The multi-node path on two hosts made on this machine (tests/two_hosts.py): a Ray cluster across them, the shard
service's replicas spread over both, one DDP rank on each, SLURM with a slurmd on each, and a node lost mid-training.

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
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from retrieval_workers.types import ServiceSpec

from helpers import (
    DDP_COMPARISON,
    REPO_ROOT,
    TINY,
    assert_trained_alike,
    checkpoint_step,
    cli_env,
    last_json_object,
    missing_slurm,
    skip_unless_required,
)
from two_hosts import INTERFACE, Host, kill_host_processes, two_hosts

pytestmark = pytest.mark.multinode


@pytest.fixture(autouse=True)
def root_with_namespaces():
    missing = [binary for binary in ("ip", "nsenter", "unshare") if shutil.which(binary) is None]
    skip_unless_required(
        f"no network namespaces here: missing {missing}"
        if missing
        else "multi-node tests need root"
        if os.getuid()
        else None,
        "RAG_LIGHTNING_REQUIRE_MULTINODE",
    )


# Below the kernel's ephemeral range (32768-60999): a client is never given it as its own port, so a connect to it
# with nothing listening is refused, never (as once in some ten thousand tries on a port inside the range) a TCP
# connection of the client to itself.
PORT = 29871
SERVER = f"""
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], {PORT})); s.listen(1)
print("listening", flush=True)
conn, peer = s.accept(); print(socket.gethostname(), peer[0], conn.recv(16).decode(), flush=True)
"""
CLIENT = f"""
import socket, sys
s = socket.create_connection((sys.argv[1], {PORT}), timeout=10); s.sendall(socket.gethostname().encode())
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
            outside.bind(("127.0.0.1", PORT))
            outside.listen(1)
            outside.setblocking(False)
            assert a.run(sys.executable, "-c", CLIENT, "127.0.0.1").returncode != 0
            with pytest.raises(BlockingIOError):
                outside.accept()  # nothing reached it
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert a.name not in namespaces and b.name not in namespaces


@dataclass
class TwoNodeRay:
    """A Ray cluster on two hosts, its nodes started with `ray start` as slurm/train.sbatch starts them (token
    authentication, Ray's default): the head on host a, a worker on host b."""

    a: Host
    b: Host
    temp_dir: str  # the nodes' session files (their socket paths must stay within 107 bytes)
    env: dict  # for every command on the hosts

    @property
    def address(self) -> str:
        return f"{self.a.address}:6379"

    def start_node(self, host: Host) -> None:
        """The head on host a; a worker joining it on any other host (again, after the host was lost)."""
        role = (
            ["--head", "--port=6379", "--include-dashboard=false"] if host is self.a else [f"--address={self.address}"]
        )
        started = host.run(
            str(Path(sys.executable).with_name("ray")),
            "start",
            *role,
            f"--node-ip-address={host.address}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            env=self.env,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr[-2000:]


@pytest.fixture(scope="module")
def ray_on_two_hosts():
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp_dir, two_hosts("rlray") as (a, b):
        cluster = TwoNodeRay(a, b, temp_dir, {**cli_env(), "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": INTERFACE})
        cluster.start_node(a)
        cluster.start_node(b)
        yield cluster


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
    a, b, address, env = ray_on_two_hosts.a, ray_on_two_hosts.b, ray_on_two_hosts.address, ray_on_two_hosts.env
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
    try:
        node_id, host = ray.get(actor.__ray_call__.remote(
            lambda shard: (ray.get_runtime_context().get_node_id(), socket.gethostname())), timeout=30)
        where[name] = [nodes[node_id], host]
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        where[name] = None  # still restarting
print(json.dumps(where))
"""


def _where_actors_run(host: Host, address: str, namespace: str, names: list[str], env: dict) -> dict:
    """Each named actor's [node address, hostname], or None for one that does not answer yet."""
    found = host.run(sys.executable, "-c", WHERE_ACTORS_RUN, address, namespace, *names, env=env, timeout=180)
    assert found.returncode == 0, found.stderr[-3000:]
    return last_json_object(found.stdout)


def _when_all_answer(host: Host, address: str, namespace: str, names: list[str], env: dict, timeout_s: float = 300):
    """Where the named actors run, once every one answers (Ray restarts lost ones only after it declares their
    node dead, later under load)."""
    deadline = time.monotonic() + timeout_s
    while None in (where := _where_actors_run(host, address, namespace, names, env)).values():
        assert time.monotonic() < deadline, f"actors still not answering: {where}"
        time.sleep(2)
    return where


def test_the_replicas_of_each_shard_run_on_different_nodes(ray_on_two_hosts, two_shard_kb):
    """`retrieval_workers.launch` with 2 shards x 2 replicas: Ray's node ids of the two replicas of each shard
    differ (and so do the hostnames their processes see), and each node holds one replica of every shard."""
    a, b, address, env = ray_on_two_hosts.a, ray_on_two_hosts.b, ray_on_two_hosts.address, ray_on_two_hosts.env
    spec = ServiceSpec(kb_dir=str(two_shard_kb), num_shards=2, num_replicas=2, namespace="multinode")
    launch = a.run(
        sys.executable,
        "-m",
        "retrieval_workers.launch",
        f"--address={address}",
        f"--kb-dir={two_shard_kb}",
        "--shards=2",
        "--replicas=2",
        "--namespace=multinode",
        env=env,
        timeout=300,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    names = [spec.actor_name(shard, replica) for shard in range(2) for replica in range(2)]
    where = _when_all_answer(a, address, "multinode", names, env)
    for shard in range(2):
        replicas = [where[spec.actor_name(shard, replica)] for replica in range(2)]
        assert sorted(replicas) == sorted([[a.address, a.name], [b.address, b.name]]), (shard, where)


def _train(host, run_dir: Path, env: dict, *overrides: str, **kwargs) -> subprocess.Popen:
    return host.start(
        sys.executable,
        "-m",
        "rag_lightning.train",
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finished(process: subprocess.Popen, timeout_s: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_a_two_node_ddp_run_matches_the_one_node_run(ray_on_two_hosts, tmp_path, one_process_reference):
    """One training process on each host (trainer.num_nodes=2, gloo over the veth, the shard service's replicas
    on both nodes) with batch 4 each trains to the metrics of one process on one node with batch 8 (the session's
    one_process_reference, conftest.py), within the tolerance of tests/test_train_cli.py's two-process DDP test
    (whose docstring says why these are equal).

    As slurm/train.sbatch runs it: `stage=prepare` on the first node (data, knowledge base, shard actors), then
    `stage=train` on every node, each told its rank as a launcher would (RANK, NODE_RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR on host a).
    """
    a, b, address, env = ray_on_two_hosts.a, ray_on_two_hosts.b, ray_on_two_hosts.address, ray_on_two_hosts.env
    run_dir = tmp_path / "two_nodes"
    cluster = [
        *DDP_COMPARISON,
        "trainer.strategy=ddp",
        "data.batch_size=4",
        f"service.ray_address={address}",
        "service.namespace=two_nodes",
        "index.replicas=2",
    ]
    _finished(_train(a, run_dir, env, *cluster, "stage=prepare"))
    ranks = [
        _train(
            host,
            run_dir,
            {
                **env,
                "RANK": str(rank),
                "NODE_RANK": str(rank),
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "2",
                "MASTER_ADDR": a.address,
                "MASTER_PORT": "29511",
            },
            *cluster,
            "stage=train",
            "trainer.num_nodes=2",
        )
        for rank, host in enumerate((a, b))
    ]
    outputs = [_finished(rank) for rank in ranks]
    assert "GLOBAL_RANK: 1" in outputs[1] and "MEMBER: 2/2" in outputs[0] + outputs[1]

    assert_trained_alike(one_process_reference, json.loads((run_dir / "results.json").read_text()))


SEARCHER = """
import json, sys, time
from pathlib import Path
import numpy as np
from retrieval_workers.kb_store import load_embeddings, read_manifest
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import RetrievalClient
from retrieval_workers.types import ServiceSpec
address, kb_dir, namespace, stop = sys.argv[1:]
spec = ServiceSpec(kb_dir=kb_dir, num_shards=2, num_replicas=2, namespace=namespace, failover_timeout_s=60)
connect(address, namespace=namespace)
clients = [RetrievalClient(spec, replica_offset=offset) for offset in (0, 1)]   # together they prefer every replica
embeddings = load_embeddings(kb_dir, read_manifest(kb_dir))
queries = embeddings[:8]
expected = np.argsort(-(queries @ embeddings.T), axis=1, kind="stable")[:, :3]
print("searching", flush=True)
searches = 0
while not Path(stop).exists():
    for client in clients:
        np.testing.assert_array_equal(client.search(queries, k=3).ids, expected)
        searches += 1
    time.sleep(0.05)
print(json.dumps({"searches": searches, "failovers": sum(client.failovers for client in clients)}))
"""


def _wait_for_checkpoint(run_dir: Path, processes: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Until the first periodic checkpoint is written."""
    deadline = time.monotonic() + timeout_s
    while not list((run_dir / "checkpoints").glob("step*.ckpt")):
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_node_lost_mid_training_its_replicas_fail_over_and_training_goes_on(ray_on_two_hosts, tmp_path):
    """Every process of host b is killed (its Ray node and the shard replicas on it) while a trainer on host a
    trains and a searcher on host a searches with two clients that together prefer every replica. No search
    fails and every answer stays exact (the replicas on a answer for the lost ones, then Ray restarts the lost
    ones on a), and the trainer finishes all its steps."""
    a, b, address, env = ray_on_two_hosts.a, ray_on_two_hosts.b, ray_on_two_hosts.address, ray_on_two_hosts.env
    run_dir, steps = tmp_path / "run", 80  # host b is lost after the checkpoint of step 20
    overrides = [
        "experiment=tiny",
        f"service.ray_address={address}",
        "service.namespace=node_loss",
        "index.replicas=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=40",
        "checkpoint_every_n_steps=20",
    ]
    _finished(_train(a, run_dir, env, *overrides, "stage=prepare"))
    spec = ServiceSpec(kb_dir=str(run_dir / "kb"), num_shards=2, num_replicas=2, namespace="node_loss")
    names = [spec.actor_name(shard, replica) for shard in range(2) for replica in range(2)]
    before = _when_all_answer(a, address, "node_loss", names, env)
    assert sorted(host for _, host in before.values()) == [a.name, a.name, b.name, b.name]

    stop = tmp_path / "stop"
    searcher = a.start(
        sys.executable,
        "-c",
        SEARCHER,
        address,
        spec.kb_dir,
        "node_loss",
        str(stop),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert searcher.stdout.readline().strip() == "searching", searcher.stderr.read()[-3000:]
    trainer = _train(a, run_dir, env, *overrides, "stage=train")
    _wait_for_checkpoint(run_dir, [trainer, searcher])
    kill_host_processes(b)
    output = _finished(trainer)
    stop.touch()
    out, err = searcher.communicate(timeout=120)
    assert searcher.returncode == 0, err[-3000:]
    searched = last_json_object(out)
    assert searched["searches"] > 0 and searched["failovers"] >= 2, searched  # each lost replica was preferred
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == steps and "test/em" in results, output[-2000:]
    after = _when_all_answer(a, address, "node_loss", names, env)
    assert [host for _, host in after.values()] == [a.name] * 4, after  # restarted on the surviving node
    ray_on_two_hosts.start_node(b)


@pytest.mark.slow
def test_a_two_node_ddp_job_that_lost_a_node_resumes_from_its_last_checkpoint_when_resubmitted(
    ray_on_two_hosts, tmp_path
):
    """A DDP rank lost with its node takes the job down (the other rank's next collective fails, or the scheduler
    ends it); the job submitted again, on two nodes, resumes from its newest checkpoint and the global step goes
    on from there to the end."""
    a, b, address, env = ray_on_two_hosts.a, ray_on_two_hosts.b, ray_on_two_hosts.address, ray_on_two_hosts.env
    run_dir, steps = tmp_path / "run", 80  # host b is lost after the checkpoint of step 20
    overrides = [
        "experiment=tiny",
        f"service.ray_address={address}",
        "service.namespace=ddp_loss",
        "index.replicas=2",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=40",
        "checkpoint_every_n_steps=20",
        "trainer.strategy=ddp",
        "trainer.num_nodes=2",
        "data.batch_size=4",
    ]
    _finished(_train(a, run_dir, env, *overrides, "stage=prepare"))

    def submit() -> list[subprocess.Popen]:
        return [
            _train(
                host,
                run_dir,
                {
                    **env,
                    "RANK": str(rank),
                    "NODE_RANK": str(rank),
                    "LOCAL_RANK": "0",
                    "WORLD_SIZE": "2",
                    "MASTER_ADDR": a.address,
                    "MASTER_PORT": "29512",
                },
                *overrides,
                "stage=train",
            )
            for rank, host in enumerate((a, b))
        ]

    first = submit()
    _wait_for_checkpoint(run_dir, first)
    kill_host_processes(b)
    survivor, _ = first[0].communicate(timeout=120)  # ends on its own: no hang on the lost peer
    assert first[0].returncode != 0 and not (run_dir / "results.json").exists(), survivor[-2000:]
    saved = max(checkpoint_step(p) for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert saved < steps

    ray_on_two_hosts.start_node(b)
    outputs = [_finished(rank) for rank in submit()]
    results = json.loads((run_dir / "results.json").read_text())
    assert checkpoint_step(results["train/resumed_from"]) >= saved, outputs[0][-2000:]
    assert results["train/steps"] == steps and "test/em" in results


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_on_two_slurm_nodes_trains_across_both(tmp_path):
    """slurmctld and a slurmd on host a, a slurmd on host b (each in its namespace; slurm/local_cluster.sh writes
    the config: a spool dir per node, the nodes' addresses on the veth): `sbatch -N 2 slurm/train.sbatch
    experiment=tiny` starts a Ray head on a and a worker on b, one training process on each node, and writes
    results.json.

    The job is also the test of a fresh sbatch job (tests/test_slurm.py's jobs are requeued or fail): it runs the
    python of the environment it was submitted from, Lightning takes it for a SLURM job (auto-requeueing), it
    evaluates before training, trains the tiny run's steps from none, tests its best checkpoint and completes."""
    skip_unless_required(missing_slurm(), "RAG_LIGHTNING_REQUIRE_SLURM")
    # (slurmstepd's socket paths in the spool dirs must stay within 108 bytes)
    with tempfile.TemporaryDirectory(prefix="slurm", dir="/tmp") as state, two_hosts("rlslurm") as (a, b):
        env = {
            **cli_env(),
            "SLURM_CONF": f"{state}/slurm.conf",
            "GLOO_SOCKET_IFNAME": INTERFACE,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]),
        }
        subprocess.run(
            ["bash", str(REPO_ROOT / "slurm" / "local_cluster.sh"), "conf"],
            check=True,
            env={**env, "SLURM_LOCAL_STATE": state, "SLURM_LOCAL_NODES": f"{a.name}={a.address} {b.name}={b.address}"},
        )
        a.start("slurmctld", "-D", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for host in (a, b):
            host.start("slurmd", "-D", "-N", host.name, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while a.run("sinfo", "-h", "-o", "%T %D", env=env).stdout.split() != ["idle", "2"]:
            assert time.monotonic() < deadline, (
                a.run("sinfo", env=env).stdout,
                Path(state, "slurmctld.log").read_text()[-3000:],
            )
            time.sleep(1)

        run_dir = tmp_path / "run"
        submitted = a.run(
            "sbatch",
            "--parsable",
            "-N",
            "2",
            "--ntasks-per-node=1",
            "--cpus-per-task=2",
            f"--output={run_dir}.out",
            str(REPO_ROOT / "slurm" / "train.sbatch"),
            "experiment=tiny",
            cwd=REPO_ROOT,
            env={**env, "RUN_DIR": str(run_dir)},
        )
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 600
        while queued := a.run("squeue", "-h", "-j", job, "-o", "%T %r", env=env).stdout.strip():
            assert time.monotonic() < deadline and "held" not in queued, (
                queued,
                *[Path(state, f"slurmd-{host.name}.log").read_text()[-2000:] for host in (a, b)],
            )
            time.sleep(2)
        output = Path(f"{run_dir}.out").read_text()
        assert (run_dir / "results.json").is_file(), output[-3000:]
        ended = a.run("scontrol", "show", "job", job, env=env).stdout
        assert "JobState=COMPLETED" in ended.split(), (ended, output[-3000:])
        assert f"job {job} (restart 0): nodes {a.name} {b.name}, Ray head {a.address}:" in output
        assert "Ray is up on 2 node(s)" in output
        assert f"python {Path(sys.executable).parent / 'python'}" in output  # the submitting environment's python
        assert "SLURM auto-requeueing enabled" in output  # Lightning saw the srun tasks as SLURM ranks
        assert "MEMBER: 2/2" in output and "GLOBAL_RANK: 1" in output
        results = json.loads((run_dir / "results.json").read_text())
        assert results["train/steps"] == TINY.trainer.max_steps and results["train/resumed_from"] is None
        assert results["best_checkpoint"].startswith(str(run_dir / "checkpoints" / "best-step"))
        assert results["test/examples"] == results["initial/examples"] > 0 and "test/em" in results
