"""Retrieval service: latency and queries/s of S shards x R replicas vs an in-process FAISS index.

One knowledge base of random passage embeddings (--vectors x --dim float32, default 100,000 x 128;
no text is encoded) is written with the project's own kb_store / shard_build functions, one KB
directory per shard count. The same vectors go into one in-process FAISS index of the same type
(--factory, inner product), searched on one OpenMP thread, as each shard actor is (omp_threads=1).
Every search is a batch of --batch random queries (default 8) for the top --k (default 5):

  inprocess  --calls timed searches of the in-process index after --warmup untimed ones, in this
             process, before Ray starts;
  ours       the service launched for each (S, R), then W client processes (spawned once, each
             attached to the job's Ray and kept for every configuration) each make a RetrievalClient
             (replica_offset = its index), run --warmup searches, wait until all W are warm, then run
             --calls timed searches at once. p50/p99 are over every timed call of every client;
             queries/s = all timed queries / wall time of the concurrent phase (from the parent's
             "go" to the last client's answer).

Configurations: the latency comparison at one client, --latency-shards x 1 replica (default 2 x 1),
and the throughput grid --shards x --replicas x --clients (default {1,2} x {1,2} x {4}). With a Flat
index the service's top-k ids of one batch must equal the in-process index's (asserted, per service).

The last stdout line is one JSON object: the figures of each, "ratio" = p50 latency of the latency
configuration / p50 in-process (target <= 1.5), "throughput_gain_R2" = queries/s of 1 shard x 2 replicas
over 1 x 1 at the most clients (target > 1: throughput rising with R), the same per shard count in
"throughput_gain_R2_by_shards", and "meets_targets". Targets are reported, not asserted.

    python bench/retrieval_service.py                                  # the measurement: 100,000 x 128
    python bench/retrieval_service.py --vectors 5000 --calls 50        # a quick check that it runs
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import ray
from common import measure_and_print

from retrieval_workers.atomic_files import staged_directory
from retrieval_workers.kb_store import (
    Manifest,
    commit_version,
    sha256_file,
    shard_ranges,
    write_passage_table,
    write_version_info,
)
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service
from retrieval_workers.shard_build import write_shard
from retrieval_workers.types import ServiceSpec

log = logging.getLogger("retrieval_service_bench")

SEED = 0
TOKENS_PER_PASSAGE, VOCAB = 16, 1000  # the fake generator token ids of each passage
TARGET_RATIO = 1.5
REPLY_TIMEOUT_S = 600.0


def int_list(text: str) -> list[int]:
    """A comma-separated flag value, e.g. "1,2"."""
    return [int(part) for part in text.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=100_000, help="passages in the knowledge base")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--factory", default="Flat", help="FAISS index factory string (inner product)")
    p.add_argument("--search-params", default="", help='faiss.ParameterSpace string, e.g. "efSearch=64"')
    p.add_argument("--batch", type=int, default=8, help="queries per search")
    p.add_argument("--k", type=int, default=5, help="passages per query")
    p.add_argument("--calls", type=int, default=200, help="timed searches per client (and in-process)")
    p.add_argument("--warmup", type=int, default=20, help="untimed searches before them")
    p.add_argument("--latency-shards", type=int, default=2, help="shards of the one-client latency comparison")
    p.add_argument("--shards", type=int_list, default=[1, 2], help="shard counts of the throughput grid, e.g. 1,2")
    p.add_argument("--replicas", type=int_list, default=[1, 2], help="replica counts of the throughput grid")
    p.add_argument("--clients", type=int_list, default=[4], help="client process counts of the throughput grid")
    p.add_argument("--work-dir", type=Path, help="where the knowledge bases go, kept (default: a temp dir)")
    return p.parse_args()


# --- knowledge base -----------------------------------------------------------------------------------------


def write_vector_kb(kb_dir: Path, vectors: np.ndarray, shards: int, factory: str) -> Manifest:
    """Write a knowledge base whose passage embeddings are `vectors`, as rag_lightning.build_kb lays one out.

    Passage table (titles, texts, fake generator and encoder token ids), version 0 with one
    index and embeddings file per contiguous shard and version.json, then the manifest with
    checksums. No generator tokenizer is written: nothing in the service reads it.
    """
    kb_dir.mkdir(parents=True, exist_ok=True)
    num, dim = vectors.shape
    fingerprint = hashlib.sha256(vectors.tobytes() + f"{factory}/{shards}".encode()).hexdigest()
    tokens = np.random.default_rng(SEED).integers(0, VOCAB, (num, TOKENS_PER_PASSAGE), dtype=np.int32).tolist()
    passages_file = f"passages-{fingerprint[:12]}.arrow"
    write_passage_table(
        kb_dir / passages_file,
        {
            "id": list(range(num)),
            "title": [f"passage {i}" for i in range(num)],
            "text": [f"random vector {i}" for i in range(num)],
            "generator_ids": tokens,
            "encoder_ids": tokens,
        },
    )
    manifest = Manifest(
        num_passages=num,
        dim=dim,
        shards=shard_ranges(num, shards),
        active_version=0,
        index_factory=factory,
        passages_file=passages_file,
        encoder={"name": "random vectors (bench/retrieval_service.py)"},
        fingerprint=fingerprint,
    )
    with staged_directory(kb_dir / manifest.version_dir(0)) as staging:
        for shard, (start, end) in enumerate(manifest.shards):
            write_shard(staging, shard, vectors[start:end], factory)
        write_version_info(staging, 0, global_step=0)
    manifest.files[passages_file] = sha256_file(kb_dir / passages_file)
    commit_version(kb_dir, manifest, 0, keep=1)
    return manifest


def inprocess_index(vectors: np.ndarray, factory: str, search_params: str) -> faiss.Index:
    """The in-process index of the same type over the same vectors."""
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if search_params:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    return index


def query_batches(seed: int, count: int, batch: int, dim: int) -> np.ndarray:
    """`count` batches of random float32 queries, [count, batch, dim]."""
    return np.random.default_rng(seed).standard_normal((count, batch, dim), dtype=np.float32)


# --- timing -------------------------------------------------------------------------------------------------


def timed_calls(search, batches: np.ndarray) -> list[float]:
    """Run search(batch) for every batch in turn; returns the seconds of each call."""
    latencies = []
    for batch in batches:
        started = time.perf_counter()
        search(batch)
        latencies.append(time.perf_counter() - started)
    return latencies


def figures(latencies: list[float], queries: int, wall_s: float) -> dict:
    """p50/p99 latency in ms of the calls and queries/s over wall_s."""
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "qps": round(queries / wall_s, 1)}


def measure_inprocess(index: faiss.Index, args: argparse.Namespace) -> dict:
    """Latency and queries/s of the in-process index on one OpenMP thread."""
    faiss.omp_set_num_threads(1)
    batches = query_batches(SEED, args.warmup + args.calls, args.batch, args.dim)
    search = partial(index.search, k=args.k)
    timed_calls(search, batches[: args.warmup])
    latencies = timed_calls(search, batches[args.warmup :])
    return figures(latencies, args.calls * args.batch, sum(latencies))


# --- client processes ---------------------------------------------------------------------------------------


@dataclass
class ClientJob:
    """What each client process runs against one service."""

    spec: ServiceSpec
    dim: int
    batch: int
    k: int
    calls: int
    warmup: int


def client_process(address: str, worker: int, jobs: mp.Queue, replies: mp.Queue) -> None:
    """One client: attaches to Ray once, then runs every job it is sent until it gets None.

    For each job it warms up, replies its index, waits for the go (any message), runs the
    timed searches and replies their latencies. An exception is replied instead, and ends it.
    """
    try:
        connect(address)
        for job in iter(jobs.get, None):
            search = partial(RetrievalClient(job.spec, replica_offset=worker).search, k=job.k)
            batches = query_batches(SEED + 1 + worker, job.warmup + job.calls, job.batch, job.dim)
            timed_calls(search, batches[: job.warmup])
            replies.put(worker)
            jobs.get()
            replies.put(timed_calls(search, batches[job.warmup :]))
    except Exception as e:  # handed to the parent, which raises it
        replies.put(RuntimeError(f"client {worker}: {e!r}"))


class ClientPool:
    """Client processes (spawned, each its own Ray driver), kept for every configuration."""

    def __init__(self, address: str, size: int):
        context = mp.get_context("spawn")
        self.replies = context.Queue()
        self.jobs = [context.Queue() for _ in range(size)]
        self.processes = [
            context.Process(target=client_process, args=(address, worker, queue, self.replies), daemon=True)
            for worker, queue in enumerate(self.jobs)
        ]
        for process in self.processes:
            process.start()

    def run(self, job: ClientJob, clients: int) -> tuple[list[float], float]:
        """The first `clients` processes run `job` at once; returns all latencies and the concurrent wall time."""
        for queue in self.jobs[:clients]:
            queue.put(job)
        for _ in range(clients):
            self._reply()
        started = time.perf_counter()
        for queue in self.jobs[:clients]:
            queue.put("go")
        latencies = [s for _ in range(clients) for s in self._reply()]
        return latencies, time.perf_counter() - started

    def _reply(self):
        """The next client reply; a client's exception is raised here."""
        reply = self.replies.get(timeout=REPLY_TIMEOUT_S)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        """Tell every client to stop and wait for it (their Ray connections close with them)."""
        for queue in self.jobs:
            queue.put(None)
        for process in self.processes:
            process.join(timeout=30)


# --- configurations -----------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> dict[tuple[int, int], list[int]]:
    """(shards, replicas) -> client counts to run against that service: the latency one, then the grid."""
    runs = {(args.latency_shards, 1): [1]}
    for shards, replicas, clients in itertools.product(args.shards, args.replicas, args.clients):
        runs.setdefault((shards, replicas), [])
        if clients not in runs[(shards, replicas)]:
            runs[(shards, replicas)].append(clients)
    return runs


def check_top_k(spec: ServiceSpec, index: faiss.Index, args: argparse.Namespace) -> None:
    """The service's top-k ids of one batch equal the in-process Flat index's."""
    batch = query_batches(SEED + 100, 1, args.batch, args.dim)[0]
    ours = RetrievalClient(spec).search(batch, args.k).ids
    _, expected = index.search(batch, args.k)
    assert np.array_equal(ours, expected), f"{spec.num_shards} x {spec.num_replicas}: top-{args.k} ids differ"


def measure_service(kb_dirs: dict[int, Path], index: faiss.Index, args: argparse.Namespace) -> list[dict]:
    """Start Ray and the client processes; launch each service, run its client counts, shut it down."""
    runs = configurations(args)
    address = connect(num_cpus=mp.cpu_count())
    pool = ClientPool(address, max(c for counts in runs.values() for c in counts))
    results = []
    try:
        for (shards, replicas), client_counts in runs.items():
            spec = ServiceSpec(
                kb_dir=str(kb_dirs[shards]),
                num_shards=shards,
                num_replicas=replicas,
                name_prefix=f"bench-{shards}x{replicas}",
                omp_threads=1,
                search_params=args.search_params,
            )
            try:
                launch_service(spec)
                if args.factory == "Flat":
                    check_top_k(spec, index, args)
                for clients in client_counts:
                    job = ClientJob(spec, args.dim, args.batch, args.k, args.calls, args.warmup)
                    latencies, wall_s = pool.run(job, clients)
                    results.append(
                        {
                            "shards": shards,
                            "replicas": replicas,
                            "clients": clients,
                            **figures(latencies, len(latencies) * args.batch, wall_s),
                        }
                    )
                    log.info("ours: %s", results[-1])
            finally:
                shutdown_service(spec)
    finally:
        pool.close()
        ray.shutdown()
    return results


def qps_of(ours: list[dict], shards: int, replicas: int, clients: int) -> float | None:
    """Queries/s of one measured configuration, None if it was not run."""
    return next(
        (r["qps"] for r in ours if (r["shards"], r["replicas"], r["clients"]) == (shards, replicas, clients)), None
    )


def summarize(inprocess: dict, ours: list[dict], args: argparse.Namespace) -> dict:
    """The JSON summary: every figure, the latency ratio, the replica gains and the targets."""
    latency = next(r for r in ours if (r["shards"], r["replicas"], r["clients"]) == (args.latency_shards, 1, 1))
    most = max(args.clients)
    gains = {}
    for shards in args.shards:
        one, two = qps_of(ours, shards, 1, most), qps_of(ours, shards, 2, most)
        if one and two:
            gains[str(shards)] = round(two / one, 3)
    summary = {
        "vectors": args.vectors,
        "dim": args.dim,
        "factory": args.factory,
        "batch": args.batch,
        "k": args.k,
        "calls": args.calls,
        "inprocess": inprocess,
        "ours": ours,
        "ratio": round(latency["p50_ms"] / inprocess["p50_ms"], 3),
        "throughput_gain_R2": gains.get("1"),
        "throughput_gain_R2_by_shards": gains,
        "target_ratio": TARGET_RATIO,
    }
    summary["meets_targets"] = (
        summary["ratio"] <= TARGET_RATIO
        and summary["throughput_gain_R2"] is not None
        and summary["throughput_gain_R2"] > 1.0
    )
    return summary


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Make the vectors, the in-process index and the knowledge bases in `work`; measure both; summarize."""
    vectors = np.random.default_rng(SEED).standard_normal((args.vectors, args.dim), dtype=np.float32)
    index = inprocess_index(vectors, args.factory, args.search_params)
    kb_dirs = {}
    for shards in sorted({args.latency_shards, *args.shards}):
        kb_dirs[shards] = (work / f"kb-{shards}-shards").resolve()
        log.info("writing %s: %d x %d, %s, %d shards", kb_dirs[shards], args.vectors, args.dim, args.factory, shards)
        write_vector_kb(kb_dirs[shards], vectors, shards, args.factory)
    inprocess = measure_inprocess(index, args)
    log.info("in-process: %s", inprocess)
    return summarize(inprocess, measure_service(kb_dirs, index, args), args)


def main() -> None:
    measure_and_print(measure, parse_args())


if __name__ == "__main__":
    main()
