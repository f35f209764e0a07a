"""Starting or attaching to Ray for one job.

The process that starts Ray records the address in RAY_ADDRESS_ENV so every other process
of the job (DDP ranks re-executed by Lightning, subprocesses) attaches to the same cluster.
Ray is imported where it is used, so that config checks can use check_reachable (and catch
RayUnreachable) in commands that never start Ray without the cost of importing it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from retrieval_workers.types import RetrievalWorkersError, ServiceSpec

RAY_ADDRESS_ENV = "RAG_LIGHTNING_RAY_ADDRESS"
LOOPBACK = ("127.0.0.1", "localhost")
RAY_CLIENT_PORT = 10001  # the port of a ray://host address without one
REACH_TIMEOUT_S = 5.0
log = logging.getLogger(__name__)


class RayUnreachable(RetrievalWorkersError, ConnectionError):
    """Nothing answers at a Ray address this process was told to attach to; the message names the address.

    `setting` names where the address came from when that was not the caller's own argument (the
    environment variable RAY_ADDRESS_ENV); None when it was the argument, which callers name after their
    own setting (rag_lightning: service.ray_address).
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def check_reachable(address: str, setting: str | None = None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Raise RayUnreachable unless a Ray cluster answers at the address within timeout_s.

    ray.init(address=...) on an address where nothing listens, or where something that is not Ray accepts the
    connection and stays silent, retries for minutes without a word (and, blocked in Ray's C++ client, lets no
    signal handler run); this answers within seconds. Ray's GCS and its client server both speak gRPC, so the
    check is that the port answers HTTP/2's connection preface. `auto` is resolved as Ray resolves it (the
    RAY_ADDRESS variable, else the cluster `ray start` last started on this machine); `local` (start a new
    Ray) is left to Ray.
    """
    if address == "local":
        return
    if address == "auto":
        found = _auto_address(setting)
        try:
            check_reachable(found, setting, timeout_s)
        except RayUnreachable as e:
            raise RayUnreachable(f"auto found {found}, but {e}", setting) from None
        return
    scheme, _, rest = address.rpartition("://")
    host, colon, port = rest.rpartition(":")
    if not colon and scheme == "ray":
        host, port = rest, str(RAY_CLIENT_PORT)
    host = host.strip("[]")  # an IPv6 address: [::1]:6379
    if scheme not in ("", "ray") or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayUnreachable(
            f"{address!r} is not a Ray address: give the cluster's GCS address HOST:PORT "
            "(or ray://HOST:PORT for a Ray client server), or null to start a local Ray",
            setting,
        )
    try:
        answers_grpc = _answers_http2((host, int(port)), timeout_s)
    except OSError as e:
        reason = (
            f"no answer within {timeout_s:g} s"
            if isinstance(e, TimeoutError)
            else e.strerror or str(e) or type(e).__name__
        )
        start = "" if scheme else f" (`ray start --head --port {port}`)"
        raise RayUnreachable(
            f"no Ray cluster answers at {address} ({reason}); start one there{start}, give the "
            "address of a running one, or null to start a local Ray",
            setting,
        ) from None
    if not answers_grpc:
        raise RayUnreachable(
            f"{address} accepts connections but is not a Ray cluster (no gRPC answer within "
            f"{timeout_s:g} s); give the address `ray start --head` printed, or null to start a "
            "local Ray",
            setting,
        )


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # a frame header: length 0, type 4 (SETTINGS)


def _answers_http2(address: tuple[str, int], timeout_s: float) -> bool:
    """Whether the server at address answers HTTP/2's client preface with a SETTINGS frame within timeout_s, as
    every gRPC server does at once. OSError when nothing accepts the connection."""
    with socket.create_connection(address, timeout=timeout_s) as connection:
        try:
            connection.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            header = b""
            while len(header) < len(HTTP2_EMPTY_SETTINGS):
                chunk = connection.recv(len(HTTP2_EMPTY_SETTINGS) - len(header))
                if not chunk:
                    return False
                header += chunk
        except OSError:  # silent until the timeout, or reset
            return False
    return header[3] == HTTP2_EMPTY_SETTINGS[3]


def _auto_address(setting: str | None) -> str:
    """The address `auto` stands for, found as ray.init(address="auto") finds it; RayUnreachable if none is."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as e:
        found = str(e).split(". Please")[0]  # Ray's advice that follows is about its own command line
        raise RayUnreachable(
            f"auto: {found}; give the cluster's address HOST:PORT, or null to start a local Ray", setting
        ) from None


def local_ray_answers(timeout_s: float = 1.0) -> bool:
    """Whether the Ray this process is attached to still answers: a signal to a whole process group ends a
    local Ray's servers too, and calls into a Ray whose GCS is gone block for a minute before failing."""
    import ray

    try:
        check_reachable(ray.get_runtime_context().gcs_address, timeout_s=timeout_s)
    except RayUnreachable:
        return False
    return True


def connect(
    address: str | None = None,
    namespace: str = ServiceSpec.namespace,
    host: str = "127.0.0.1",
    dashboard: bool = False,
    num_cpus: int | None = None,
    temp_dir: str | None = None,
) -> str:
    """Attach to `address` (or the job's address from the environment), else start a local Ray.

    An address is first checked to answer (RayUnreachable if nothing does, within seconds); an address
    given as the argument is checked even when this process is attached already, so it is never
    silently ignored. A local Ray binds to `host` (loopback by default: its GCS, raylet, agents and
    workers then listen on 127.0.0.1 only) with the dashboard off, keeps its session files in `temp_dir`
    (default: /tmp/ray_<SLURM job id, else pid>, short for Ray's socket paths) and takes free
    ports, so two jobs on one node never share a cluster. Its workers' output stays in the
    session's logs folder instead of this process's stderr. A SIGTERM handler the process installed
    itself is kept (see _keep_sigterm_handler). Returns the cluster address, which is also exported
    for child processes.
    """
    import ray

    if address:
        check_reachable(address)
    if not ray.is_initialized():
        if not address and os.environ.get(RAY_ADDRESS_ENV):
            address = os.environ[RAY_ADDRESS_ENV]
            check_reachable(address, setting=RAY_ADDRESS_ENV)
        if address:
            with _single_node_ray(address.rpartition(":")[0] in LOOPBACK), _keep_sigterm_handler():
                ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
        else:
            log.info("starting a local Ray on %s (dashboard %s)", host, "on" if dashboard else "off")
            loopback = host in LOOPBACK
            with _single_node_ray(loopback), _keep_sigterm_handler():
                ray.init(
                    namespace=namespace,
                    num_cpus=num_cpus or os.cpu_count(),
                    include_dashboard=dashboard,
                    _node_ip_address="127.0.0.1" if loopback else host,
                    _temp_dir=temp_dir or default_temp_dir(),
                    logging_level=logging.WARNING,
                    configure_logging=False,
                    log_to_driver=False,
                )
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
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = saved and not enabled
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep a SIGTERM handler the process installed itself across ray.init.

    ray.init replaces SIGTERM's handler: with sys.exit(15) in a driver, and with one that kills the
    processes of a Ray it started and exits 1. rag_lightning's commands install a handler that turns
    the signal into an exception, so their cleanup runs on the way out (removing unfinished files and
    shutting down the Ray they started, which kills its processes), and report the stop in one line;
    Ray's handlers would end the process with neither. So while ray.init runs, Ray's setter is a no-op,
    and the handler is put back afterwards in any case. The default handler (no handler installed) is
    left to Ray as before. Only the main thread can set handlers.
    """
    from ray._private import utils as ray_utils

    saved = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(saved):
        yield
        return
    setter = getattr(ray_utils, "set_sigterm_handler", None)
    if setter is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if setter is not None:
            ray_utils.set_sigterm_handler = setter
        signal.signal(signal.SIGTERM, saved)


def default_temp_dir() -> str:
    return f"/tmp/ray_{os.environ.get('SLURM_JOB_ID', os.getpid())}"
