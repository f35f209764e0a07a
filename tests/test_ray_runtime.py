"""A local Ray started by connect() listens on loopback only, reports a loopback address, and answers the check
that an address is a Ray cluster."""

from __future__ import annotations

import ipaddress
import json
import select
import shutil
import subprocess
import sys
import tempfile

import psutil
import ray  # noqa: F401  (puts Ray's bundled psutil, ray/thirdparty_files, on the path)

from retrieval_workers.ray_runtime import check_reachable

from helpers import REPO_ROOT

# Started in a subprocess: the test session already runs a Ray of its own. It runs one task, so a worker
# process is up too, reports its addresses, and holds Ray up until told to shut it down.
LOCAL_RAY = """
import json, os, sys
import ray
from retrieval_workers.ray_runtime import connect


@ray.remote
def pid():
    return os.getpid()


address = connect(num_cpus=1, temp_dir=sys.argv[1])
worker = ray.get(pid.remote())
print(json.dumps({"address": address, "nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "worker": worker}),
      flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 is loopback too


def _ray_processes(driver: psutil.Process, temp_dir: str) -> list[psutil.Process]:
    """The driver, every process under it, and any process whose command line names its Ray temp dir."""
    found = {p.pid: p for p in [driver, *driver.children(recursive=True)]}
    for process in psutil.process_iter():
        try:
            if any(temp_dir in arg for arg in process.cmdline()):
                found[process.pid] = process
        except psutil.Error:
            pass
    return list(found.values())


def _listening(processes: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every listening TCP socket and every bound UDP socket of the processes."""
    sockets = []
    for process in processes:
        try:
            for c in process.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and c.laddr):
                    sockets.append((process.pid, process.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return sockets


def test_a_local_ray_listens_on_loopback_only(subprocess_env):
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short: Ray's socket paths must fit
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCAL_RAY, temp_dir],
        cwd=REPO_ROOT,
        env=subprocess_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes = []
    try:
        answered, _, _ = select.select([proc.stdout], [], [], 300)
        line = proc.stdout.readline() if answered else ""
        assert line, "the local Ray did not start"
        started = json.loads(line)
        processes = _ray_processes(psutil.Process(proc.pid), temp_dir)
        host, _, port = started["address"].rpartition(":")
        assert host == "127.0.0.1" and started["nodes"] == ["127.0.0.1"], started
        check_reachable(started["address"])  # its GCS answers as check_reachable expects of a Ray cluster
        sockets = _listening(processes)
        # the GCS on the reported port, the raylet, and the worker that ran the task are among them
        assert ("gcs_server", int(port)) in {(name, p) for _, name, _, p in sockets}, sockets
        assert "raylet" in {name for _, name, _, _ in sockets} and started["worker"] in {pid for pid, *_ in sockets}
        exposed = [s for s in sockets if not _is_loopback(s[2])]
        assert not exposed, f"Ray sockets on a non-loopback address: {exposed}"
    finally:
        try:
            proc.communicate("\n", timeout=120)  # the subprocess shuts its Ray down
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        _, alive = psutil.wait_procs(processes, timeout=30)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not alive, f"left running after ray.shutdown(): {alive}"
