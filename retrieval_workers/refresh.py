"""Background re-encoding of the knowledge base: encoder actors and the refresh coordinator.

The trainer publishes an `EncoderSnapshot` (the context encoder's weights at a global step)
in the Ray object store and calls `RefreshCoordinator.refresh` without waiting for it. The
coordinator hands the shards to its `EncoderWorker` actors, which embed the passages from
their stored token ids and write each shard's index into a staging folder for version N+1.
When every shard is written, the folder is renamed into place, the manifest is committed
and the service switches to N+1 (`switch_version`). Any failure before the commit (an
encoder actor killed, a full disk) leaves version N active and serving; the report says
what went wrong and the trainer tries again at its next due step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import faiss
import ray
import torch

from retrieval_workers.atomic_files import staged_directory
from retrieval_workers.encoding import EncoderSnapshot, TextEncoder, length_sorted_batches
from retrieval_workers.kb_store import (
    Manifest,
    PassageTable,
    commit_version,
    read_manifest,
    verify_file,
    write_version_info,
)
from retrieval_workers.service import switch_version
from retrieval_workers.shard_build import build_shard
from retrieval_workers.types import RefreshReport, RefreshSpec, ServiceSpec

STRAGGLER_TIMEOUT_S = 600.0
WORKER_RESTART_TIMEOUT_S = 120.0


class EncoderWorker:
    """Encodes whole shards with published weights; one per CPU set or GPU that Ray gives it."""

    def __init__(self, kb_dir: str, threads: int, cpu_affinity: tuple[int, ...] = ()):
        if cpu_affinity:
            os.sched_setaffinity(0, cpu_affinity)
        torch.set_num_threads(max(threads, 1))
        faiss.omp_set_num_threads(max(threads, 1))  # its own OpenMP pool would otherwise spin on every core
        self.kb_dir = kb_dir
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray sets the visible GPUs
        self._passages: PassageTable | None = None
        self._encoder: tuple[int, TextEncoder] | None = None

    def ready(self) -> bool:
        return True

    def encode_shard(self, snapshot: EncoderSnapshot, shard: int, version_dir: str, batch_size: int) -> float:
        """Write shard `shard` of a new version into version_dir; returns the seconds it took."""
        started = time.perf_counter()
        manifest = read_manifest(self.kb_dir)
        passages = self._passage_table(manifest)
        if self._encoder is None or self._encoder[0] != snapshot.global_step:
            self._encoder = (snapshot.global_step, snapshot.build().to(self.device))
        start, end = manifest.shards[shard]
        build_shard(
            self._encoder[1], passages, shard, start, end, manifest.index_factory, Path(version_dir), batch_size
        )
        return time.perf_counter() - started

    @torch.no_grad()
    def forward_pass_rate(self, snapshot: EncoderSnapshot, batch_size: int) -> float:
        """Passages/s of the bare forward passes over every passage, batches padded beforehand: the limit
        of encode_shard on this actor's resources (for benchmarks and capacity planning)."""
        manifest = read_manifest(self.kb_dir)
        values, offsets = self._passage_table(manifest).token_ids("encoder_ids")
        encoder = snapshot.build().to(self.device)
        batches = [
            ids.to(self.device) for _, ids in length_sorted_batches(values, offsets, batch_size, encoder.pad_token_id)
        ]
        started = time.perf_counter()
        for ids in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                encoder(ids)
        return manifest.num_passages / (time.perf_counter() - started)

    def _passage_table(self, manifest: Manifest) -> PassageTable:
        path = Path(self.kb_dir) / manifest.passages_file
        if self._passages is None or self._passages.path != path:
            self._passages = PassageTable(verify_file(self.kb_dir, manifest, manifest.passages_file))
        return self._passages


RemoteEncoderWorker = ray.remote(EncoderWorker)


class RefreshCoordinator:
    """Runs one refresh at a time for a service: encode every shard, commit version N+1, switch to it."""

    def __init__(self, service: ServiceSpec, refresh: RefreshSpec):
        self.service = service
        self.refresh_spec = refresh
        self.workers = [
            RemoteEncoderWorker.options(
                name=encoder_name(service, i),
                namespace=service.namespace,
                get_if_exists=True,
                num_cpus=refresh.worker_cpus,
                num_gpus=refresh.worker_gpus,
                max_restarts=-1,
            ).remote(service.kb_dir, int(refresh.worker_cpus), refresh.cpu_affinity)
            for i in range(refresh.num_workers)
        ]

    def ready(self) -> int:
        """Answers once every encoder actor is up; returns how many there are."""
        self._wait_until_workers_ready()
        return len(self.workers)

    def refresh(self, snapshot: list[ray.ObjectRef], global_step: int) -> RefreshReport:
        """Make and switch to a new version from the weights in snapshot[0] (a ref, passed on unresolved)."""
        started = time.perf_counter()
        manifest = read_manifest(self.service.kb_dir)
        version = manifest.next_version()
        try:
            encode_s = self._encode_version(snapshot[0], manifest, version, global_step)
            commit_version(self.service.kb_dir, manifest, version, self.refresh_spec.keep_versions)
            switch_version(self.service, version)
        except Exception as e:  # the report carries it; the active version keeps serving
            return RefreshReport(
                version, global_step, time.perf_counter() - started, 0, 0.0, error=f"{type(e).__name__}: {e}"
            )
        return RefreshReport(version, global_step, time.perf_counter() - started, manifest.num_passages, encode_s)

    def _encode_version(self, snapshot: ray.ObjectRef, manifest: Manifest, version: int, global_step: int) -> float:
        """Write folder v<version> with every shard, each shard on the next free encoder actor."""
        self._wait_until_workers_ready()
        todo = list(range(len(manifest.shards)))
        free = list(self.workers)
        running: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}
        encode_s = 0.0
        with staged_directory(Path(self.service.kb_dir) / manifest.version_dir(version)) as staging:
            try:
                while todo or running:
                    while todo and free:
                        worker = free.pop()
                        running[
                            worker.encode_shard.remote(
                                snapshot, todo.pop(0), str(staging), self.refresh_spec.batch_size
                            )
                        ] = worker
                    [finished], _ = ray.wait(list(running), num_returns=1)
                    free.append(running.pop(finished))
                    encode_s += ray.get(finished)
            except BaseException:
                # let the other shards' tasks end before the staging folder can be reused, so none of
                # them writes a stale shard into the next attempt
                ray.wait(list(running), num_returns=len(running), timeout=STRAGGLER_TIMEOUT_S)
                raise
            write_version_info(staging, version, global_step)
        return encode_s

    def _wait_until_workers_ready(self) -> None:
        """Wait for encoder actors that Ray is restarting (after a crash) to come back."""
        deadline = time.monotonic() + WORKER_RESTART_TIMEOUT_S
        for worker in self.workers:
            while True:
                try:
                    ray.get(worker.ready.remote())
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)


RemoteRefreshCoordinator = ray.remote(RefreshCoordinator)


def coordinator_name(service: ServiceSpec) -> str:
    return f"{service.name_prefix}-refresh"


def encoder_name(service: ServiceSpec, worker: int) -> str:
    return f"{service.name_prefix}-encoder{worker}"


def launch_refresher(service: ServiceSpec, refresh: RefreshSpec, timeout_s: float = 300.0) -> ray.actor.ActorHandle:
    """Create the job's refresh coordinator and its encoder actors (or find the running ones); wait until all are up,
    so the first refresh does not pay for their start."""
    coordinator = RemoteRefreshCoordinator.options(
        name=coordinator_name(service),
        namespace=service.namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_restarts=-1,
    ).remote(service, refresh)
    ray.get(coordinator.ready.remote(), timeout=timeout_s)
    return coordinator


def shutdown_refresher(service: ServiceSpec) -> None:
    """Kill the job's refresh coordinator; its encoder actors go with it."""
    try:
        ray.kill(ray.get_actor(coordinator_name(service), namespace=service.namespace))
    except ValueError:
        pass
