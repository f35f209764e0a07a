"""Starting or attaching to Ray for one job.

The process that starts Ray records the address in RAY_ADDRESS_ENV so every other process
of the job (DDP ranks re-executed by Lightning, subprocesses) attaches to the same cluster.
"""
from __future__ import annotations

import logging
import os

import ray

RAY_ADDRESS_ENV = "RAG_LIGHTNING_RAY_ADDRESS"
log = logging.getLogger(__name__)


def connect(address: str | None = None, namespace: str = "rag_lightning", host: str = "127.0.0.1",
            dashboard: bool = False, num_cpus: int | None = None, temp_dir: str | None = None) -> str:
    """Attach to `address` (or the job's address from the environment), else start a local Ray.

    A local Ray binds to `host` (loopback by default) with the dashboard off, keeps its session
    files in `temp_dir` (default: /tmp/ray_<SLURM job id, else pid>, short for Ray's socket paths)
    and takes free ports, so two jobs on one node never share a cluster. Returns the cluster
    address, which is also exported for child processes.
    """
    address = address or os.environ.get(RAY_ADDRESS_ENV)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                     log_to_driver=False)
        else:
            log.info("starting a local Ray on %s (dashboard %s)", host, "on" if dashboard else "off")
            ray.init(namespace=namespace, num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                     _node_ip_address=host, _temp_dir=temp_dir or default_temp_dir(), logging_level=logging.WARNING,
                     configure_logging=False)
    address = ray.get_runtime_context().gcs_address
    os.environ[RAY_ADDRESS_ENV] = address
    return address


def default_temp_dir() -> str:
    return f"/tmp/ray_{os.environ.get('SLURM_JOB_ID', os.getpid())}"
