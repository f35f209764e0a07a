"""Starting or attaching to Ray for one job.

The process that starts Ray records the address in RAY_ADDRESS_ENV so every other process
of the job (DDP ranks re-executed by Lightning, subprocesses) attaches to the same cluster.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray._private import ray_constants

RAY_ADDRESS_ENV = "RAG_LIGHTNING_RAY_ADDRESS"
LOOPBACK = ("127.0.0.1", "localhost")
log = logging.getLogger(__name__)


def connect(address: str | None = None, namespace: str = "rag_lightning", host: str = "127.0.0.1",
            dashboard: bool = False, num_cpus: int | None = None, temp_dir: str | None = None) -> str:
    """Attach to `address` (or the job's address from the environment), else start a local Ray.

    A local Ray binds to `host` (loopback by default: its GCS, raylet, agents and workers then
    listen on 127.0.0.1 only) with the dashboard off, keeps its session files in `temp_dir`
    (default: /tmp/ray_<SLURM job id, else pid>, short for Ray's socket paths) and takes free
    ports, so two jobs on one node never share a cluster. Its workers' output stays in the
    session's logs folder instead of this process's stderr. Returns the cluster address, which
    is also exported for child processes.
    """
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if not ray.is_initialized():
        if address:
            with _single_node_ray(address.rpartition(":")[0] in LOOPBACK):
                ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                         log_to_driver=False)
        else:
            log.info("starting a local Ray on %s (dashboard %s)", host, "on" if dashboard else "off")
            loopback = host in LOOPBACK
            with _single_node_ray(loopback):
                ray.init(namespace=namespace, num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                         _node_ip_address="127.0.0.1" if loopback else host,
                         _temp_dir=temp_dir or default_temp_dir(), logging_level=logging.WARNING,
                         configure_logging=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    os.environ[RAY_ADDRESS_ENV] = address
    return address


@contextmanager
def _single_node_ray(enabled: bool) -> Iterator[None]:
    """While starting (or attaching to) a Ray on loopback, keep 127.0.0.1 as this node's address.

    Ray replaces a node address of 127.0.0.1 by the machine's routable IP, except where it
    supports no multi-node clusters (macOS, Windows, or RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    read once when ray is imported): there the node is 127.0.0.1 and Ray's servers listen on
    loopback only. A process attaching to such a Ray must take its node to be 127.0.0.1 too, or
    it waits for a node of its routable IP that never comes. The flag is switched only for the
    ray.init call, so the process may still attach to a multi-node cluster by its real IP.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = saved and not enabled
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def default_temp_dir() -> str:
    return f"/tmp/ray_{os.environ.get('SLURM_JOB_ID', os.getpid())}"
