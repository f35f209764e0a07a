"""Scale: a knowledge base of a million passages built, served and refreshed on one machine.

A synthetic source file of --passages documents of 100 words each (words drawn from a fixed,
seeded vocabulary; JSONL, written as a stream) is built into a knowledge base by the project's
own build (`build_knowledge_base`): a random context encoder of dim 32 (1 layer, the bundled
MiniLM's tokenizer, 128 tokens), a word-level generator tokenizer trained on the passages,
4 shards of --ivf (default IVF256,PQ16x4). Then:

  build        the build's wall time and passages/s of each stage (BuildStages: split, tokenizer
               training, tokenize, BM25 index (index.sparse=bm25), encode, index train, index add, write);
  --hnsw       the same index train/add/write stages for a second factory (default HNSW32) over the
               embeddings the build stored, through the same shard_build.write_shard (the passages
               are not tokenized and encoded twice);
  disk         bytes per passage of the passage table, the index files, the embeddings, the BM25 files, the
               whole KB;
  search       the real Ray shard service (4 shards x 1 replica, local Ray) searched by one client with
               batches of 8 random queries for the top 5: p50/p99 latency, over a separate build of the
               first --small-passages documents of the same source (default 100,000) and over the
               whole KB; dense searches, and searches with the questions' texts (8 words of the vocabulary),
               which return the union of the dense and BM25 top 5 (what retriever.fusion=sparse and hybrid
               ask), then ranked by the hybrid fusion in the client (its ms reported apart); the shard actors'
               RSS (psutil on each actor's pid) and this client's RSS;
  refresh      one full refresh (retrieval_workers/refresh.py: 2 encoder actors re-encode every shard
               into version 1, commit, switch the service): wall time and passages/s; and the refresh of the
               small knowledge base against the same one without its BM25 index (a copy whose manifest drops
               it), --refresh-rounds rounds interleaved: the ratio of their median wall times;
  memory       the machine's used memory (psutil.virtual_memory), sampled in a thread from the first
               build to the end of the refresh: its peak (other processes on the machine included)
               and its value before the first build.

Training steps/s while a refresh runs is bench/refresh.py's figure (at 20,000 passages), not
measured again here. The last stdout line is one JSON object; `meets_targets` says whether
build_s < 1800 and peak_memory_gb < 16 (reported, not asserted).

    python bench/scale.py                          # the measurement: 1,000,000 passages
    python bench/scale.py --passages 20000         # a quick check that it runs
    python bench/scale.py --work-dir W --searches-only   # search an earlier run's knowledge bases again
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
from common import measure_and_print
from synthetic import made_up_words

from rag_lightning.config import EncoderConfig, GeneratorTokenizerConfig, IndexConfig, KBConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.kb.build import BuildStages, build_knowledge_base
from rag_lightning.model.fusion import rank_union
from retrieval_workers.kb_store import Manifest, read_manifest, write_manifest
from retrieval_workers.ray_runtime import connect
from retrieval_workers.refresh import launch_refresher, shutdown_refresher
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service
from retrieval_workers.shard_build import ShardTimes, write_shard
from retrieval_workers.types import RefreshReport, RefreshSpec, ServiceSpec

log = logging.getLogger("scale_bench")

SEED = 0
WORDS_PER_PASSAGE = 100
VOCABULARY_WORDS = 20_000
DOCUMENTS_PER_DRAW = 10_000  # documents whose words are drawn at once (the same draws for every file size)
SHARDS = 4
CONTEXT_ENCODER = EncoderConfig(pretrained=None, hidden_size=32, num_layers=1, num_heads=2, max_length=128)
GENERATOR_VOCABULARY = 25_000
ENCODE_BATCH = 128
REFRESH_WORKERS = 2  # encoder actors of the refresh, one CPU (torch thread) each
BATCH, K = 8, 5
MEMORY_SAMPLE_S = 0.2
MEASURABLE_S = 0.001  # a stage shorter than this has no passages/s
GIB = 2**30
TARGETS = {"build_s": 1800, "peak_memory_gb": 16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=1_000_000, help="knowledge base size")
    p.add_argument(
        "--small-passages",
        type=int,
        default=100_000,
        help="size of the smaller build searched for comparison (at most half of --passages)",
    )
    p.add_argument("--ivf", default="IVF256,PQ16x4", help="FAISS factory of the build (and the service)")
    p.add_argument("--hnsw", default="HNSW32", help="second FAISS factory, built over the stored embeddings")
    p.add_argument("--search-params", default="nprobe=16", help="faiss.ParameterSpace string of the service")
    p.add_argument("--calls", type=int, default=200, help="timed searches of each latency measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed searches before them")
    p.add_argument("--refresh-rounds", type=int, default=3, help="refreshes of the small KB with and without BM25")
    p.add_argument(
        "--searches-only",
        action="store_true",
        help="with the --work-dir of an earlier run: search its two knowledge bases again, nothing else",
    )
    p.add_argument("--work-dir", type=Path, help="where sources and knowledge bases go, kept (default: a temp dir)")
    return p.parse_args()


# --- source and build ---------------------------------------------------------------------------------------


def write_source(path: Path, documents: int) -> None:
    """A JSONL source of `documents` documents of WORDS_PER_PASSAGE words, streamed; a smaller file holds the
    first documents of a larger one."""
    rng = np.random.default_rng(SEED)
    words = made_up_words(VOCABULARY_WORDS, rng)
    with open(path, "w", encoding="utf-8") as f:
        for first in range(0, documents, DOCUMENTS_PER_DRAW):
            drawn = words[rng.integers(0, len(words), (DOCUMENTS_PER_DRAW, WORDS_PER_PASSAGE))]
            f.writelines(
                json.dumps({"title": f"document {first + i}", "text": " ".join(row)}) + "\n"
                for i, row in enumerate(drawn[: documents - first])
            )


def kb_config(source: Path, kb_dir: Path) -> KBConfig:
    return KBConfig(
        source=str(source),
        dir=str(kb_dir),
        words_per_passage=WORDS_PER_PASSAGE,
        context_encoder=CONTEXT_ENCODER,
        encode_batch_size=ENCODE_BATCH,
        generator_tokenizer=GeneratorTokenizerConfig(vocab_size=GENERATOR_VOCABULARY, extra_texts=[]),
    )


def build(source: Path, kb_dir: Path, factory: str) -> BuildStages:
    log.info("building %s from %s (%s, %d shards)", kb_dir, source, factory, SHARDS)
    stages = BuildStages()
    build_knowledge_base(kb_config(source, kb_dir), IndexConfig(factory=factory, shards=SHARDS, sparse="bm25"), stages)
    return stages


def per_second(passages: int, seconds: float) -> float | None:
    """Passages a second; None for a stage that took no measurable time (HNSW needs no training)."""
    return round(passages / seconds, 1) if seconds >= MEASURABLE_S else None


def index_figures(times: ShardTimes, index_bytes: int, passages: int) -> dict:
    """Passages/s of training, adding to and writing (index and embeddings files) the shards' indexes, and the
    indexes' bytes per passage."""
    return {
        "index_train_passages_per_s": per_second(passages, times.index_train_s),
        "index_add_passages_per_s": per_second(passages, times.index_add_s),
        "write_passages_per_s": per_second(passages, times.write_s),
        "index_bytes_per_passage": round(index_bytes / passages, 1),
    }


def second_factory(kb_dir: Path, manifest: Manifest, factory: str, out: Path) -> dict:
    """Index train/add/write figures of `factory` over the embeddings the build stored, via write_shard."""
    out.mkdir(parents=True, exist_ok=True)
    times, index_bytes = ShardTimes(), 0
    for shard in range(len(manifest.shards)):
        log.info("%s over the stored embeddings of shard %d", factory, shard)
        times.add(write_shard(out, shard, np.load(kb_dir / manifest.embeddings_file(shard)), factory))
        index_bytes += (out / Path(manifest.shard_index_file(shard)).name).stat().st_size
    return index_figures(times, index_bytes, manifest.num_passages)


def disk_figures(kb_dir: Path, manifest: Manifest) -> tuple[dict, int]:
    """Bytes per passage of each kind of file, and the bytes of the index files."""
    size = {relative: (kb_dir / relative).stat().st_size for relative in manifest.files}
    index_bytes = sum(n for relative, n in size.items() if relative.endswith(".faiss"))
    embeddings = sum(n for relative, n in size.items() if relative.endswith(".embeddings.npy"))
    assert manifest.sparse is not None
    sparse = sum(n for relative, n in size.items() if relative.startswith(manifest.sparse["dir"]))
    total = sum(p.stat().st_size for p in kb_dir.rglob("*") if p.is_file())
    per = {
        "passage_table": size[manifest.passages_file],
        "index": index_bytes,
        "embeddings": embeddings,
        "bm25": sparse,
        "total": total,
    }
    return {name: round(n / manifest.num_passages, 1) for name, n in per.items()}, index_bytes


# --- memory ---------------------------------------------------------------------------------------------------


class MemorySampler:
    """The machine's used memory, sampled every MEMORY_SAMPLE_S in a thread until stopped: its peak."""

    def __init__(self):
        self.baseline = self.peak = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


# --- service and refresh --------------------------------------------------------------------------------------


def search_latency(spec: ServiceSpec, dim: int, args: argparse.Namespace, with_texts: bool) -> dict:
    """p50/p99 ms of one client's searches: --calls batches of BATCH random queries for the top K; with_texts, each
    with a question of 8 words of the vocabulary (the union of dense and BM25 candidates), and the p50 ms of
    ranking that union by the hybrid fusion in the client."""
    client = RetrievalClient(spec)
    rng = np.random.default_rng(SEED)
    queries = rng.standard_normal((args.warmup + args.calls, BATCH, dim), dtype=np.float32)
    words = made_up_words(VOCABULARY_WORDS, np.random.default_rng(SEED))
    latencies, ranking = [], []
    for i, batch in enumerate(queries):
        texts = [" ".join(rng.choice(words, 8)) for _ in range(BATCH)] if with_texts else None
        started = time.perf_counter()
        result = client.search(batch, K, texts)
        searched = time.perf_counter()
        if texts is not None:
            rank_union(result, 20.0, "hybrid", 1.0, K)
        if i >= args.warmup:
            latencies.append(searched - started)
            ranking.append(time.perf_counter() - searched)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    figures = {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}
    if with_texts:
        figures["hybrid_ranking_p50_ms"] = round(float(np.percentile(ranking, 50)) * 1e3, 3)
    return figures


def searches(spec: ServiceSpec, dim: int, args: argparse.Namespace) -> dict:
    """Dense and union search latencies of a running service."""
    return {"dense": search_latency(spec, dim, args, False), "union": search_latency(spec, dim, args, True)}


def actor_pids(spec: ServiceSpec) -> list[int]:
    return [
        ray.get(
            ray.get_actor(spec.actor_name(shard, 0), namespace=spec.namespace).__ray_call__.remote(
                lambda actor: os.getpid()
            )
        )
        for shard in range(spec.num_shards)
    ]


def service_spec(kb_dir: Path, name: str, args: argparse.Namespace) -> ServiceSpec:
    return ServiceSpec(
        kb_dir=str(kb_dir.resolve()),
        num_shards=SHARDS,
        num_replicas=1,
        name_prefix=f"scale-{name}",
        search_params=args.search_params,
    )


def refresh_once(spec: ServiceSpec) -> RefreshReport:
    """One refresh of the whole knowledge base by the refresh coordinator and its encoder actors, with an encoder
    of the build's config (new random weights: a new version all the same)."""
    coordinator = launch_refresher(
        spec, RefreshSpec(num_workers=REFRESH_WORKERS, worker_cpus=1, batch_size=ENCODE_BATCH)
    )
    encoder = build_encoder(CONTEXT_ENCODER, load_encoder_tokenizer(CONTEXT_ENCODER))
    log.info("refreshing every shard of %s", spec.kb_dir)
    report = ray.get(coordinator.refresh.remote([ray.put(encoder.snapshot(1))], 1))
    shutdown_refresher(spec)
    if report.error is not None:
        raise RuntimeError(f"the refresh failed: {report.error}")
    return report


def full_refresh(spec: ServiceSpec) -> dict:
    report = refresh_once(spec)
    return {
        "refresh_wall_s": round(report.wall_s, 1),
        "refresh_passages_per_s": round(report.passages_per_s, 1),
        "refresh_encode_s": round(report.encode_s, 1),
        "refresh_version": report.version,
    }


def without_bm25(kb_dir: Path, copy: Path) -> Path:
    """A copy of the knowledge base whose manifest has no BM25 index (its files left out)."""
    shutil.copytree(kb_dir, copy)
    manifest = read_manifest(copy)
    assert manifest.sparse is not None
    shutil.rmtree(copy / manifest.sparse["dir"])
    manifest.files = {
        name: digest for name, digest in manifest.files.items() if not name.startswith(manifest.sparse["dir"])
    }
    manifest.sparse = None
    write_manifest(copy, manifest)
    return copy


def refresh_with_and_without_bm25(with_bm25: ServiceSpec, without: ServiceSpec, rounds: int) -> dict:
    """Refresh wall times of the same knowledge base served with and without its BM25 index, interleaved."""
    walls: dict[str, list[float]] = {"with_bm25": [], "without_bm25": []}
    for _ in range(rounds):
        for name, spec in (("with_bm25", with_bm25), ("without_bm25", without)):
            launch_service(spec)
            walls[name].append(refresh_once(spec).wall_s)
            shutdown_service(spec)
    medians = {name: float(np.median(values)) for name, values in walls.items()}
    return {
        "small_refresh_wall_s": {name: [round(v, 1) for v in values] for name, values in walls.items()},
        "small_refresh_ratio_with_over_without_bm25": round(medians["with_bm25"] / medians["without_bm25"], 3),
    }


# --- the measurement ------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, work: Path) -> dict:
    small_passages = min(args.small_passages, args.passages // 2)
    sources = {"small": (work / "small.jsonl", small_passages), "full": (work / "full.jsonl", args.passages)}
    for path, documents in sources.values():
        log.info("writing %s: %d documents", path, documents)
        write_source(path, documents)
    kb_dirs = {name: work / f"kb-{name}" for name in sources}
    memory = MemorySampler()
    try:
        small_stages = build(sources["small"][0], kb_dirs["small"], args.ivf)
        stages = build(sources["full"][0], kb_dirs["full"], args.ivf)
        manifest = read_manifest(kb_dirs["full"])
        disk, index_bytes = disk_figures(kb_dirs["full"], manifest)
        indexes = {
            args.ivf: index_figures(stages, index_bytes, manifest.num_passages),
            args.hnsw: second_factory(kb_dirs["full"], manifest, args.hnsw, work / "second-factory"),
        }
        small, full = service_spec(kb_dirs["small"], "small", args), service_spec(kb_dirs["full"], "full", args)
        connect(num_cpus=os.cpu_count() + 1)  # the shard actors' bundles hold a sliver of a CPU; the encoder
        #                                           actors take one CPU each
        try:
            log.info("searching %s", small.kb_dir)
            launch_service(small)
            search_small = {"passages": small_passages, **searches(small, manifest.dim, args)}
            shutdown_service(small)
            log.info("searching %s", full.kb_dir)
            launch_service(full)
            search_full = {"passages": args.passages, **searches(full, manifest.dim, args)}
            actor_rss = [rss_mb(pid) for pid in actor_pids(full)]
            client_rss = rss_mb(os.getpid())
            refresh = full_refresh(full)
            shutdown_service(full)
            dense_small = without_bm25(kb_dirs["small"], work / "kb-small-without-bm25")
            refresh.update(
                refresh_with_and_without_bm25(
                    small, service_spec(dense_small, "small-without-bm25", args), args.refresh_rounds
                )
            )
        finally:
            shutdown_refresher(full)
            shutdown_service(small)
            shutdown_service(full)
            ray.shutdown()
    finally:
        memory.stop()
    figures = {
        "passages": args.passages,
        "shards": SHARDS,
        "dim": manifest.dim,
        "factory": args.ivf,
        "build_s": round(stages.total_s, 1),
        "build_s_small": round(small_stages.total_s, 1),
        "stage_s": {name: round(s, 1) for name, s in stages.seconds().items()},
        "stage_passages_per_s": {name: per_second(stages.passages, s) for name, s in stages.seconds().items()},
        "bm25": {
            "build_s": round(stages.sparse_s, 1),
            "build_passages_per_s": per_second(stages.passages, stages.sparse_s),
            "bytes_per_passage": disk["bm25"],
            "vocabulary": manifest.sparse["vocabulary"] if manifest.sparse else None,
        },
        "index": indexes,
        "disk_bytes_per_passage": disk,
        "actor_rss_mb": actor_rss,
        "client_rss_mb": client_rss,
        "search_params": args.search_params,
        "search_small": search_small,
        "search_full": search_full,
        **refresh,
        "peak_memory_gb": round(memory.peak / GIB, 2),
        "baseline_memory_gb": round(memory.baseline / GIB, 2),
        "targets": TARGETS,
    }
    figures["meets_targets"] = (
        figures["build_s"] < TARGETS["build_s"] and figures["peak_memory_gb"] < TARGETS["peak_memory_gb"]
    )
    return figures


def searches_again(args: argparse.Namespace, work: Path) -> dict:
    """The search figures alone, over the knowledge bases an earlier run left in `work`."""
    connect(num_cpus=os.cpu_count() + 1)
    figures = {}
    try:
        for name in ("small", "full"):
            kb_dir = work / f"kb-{name}"
            spec = service_spec(kb_dir, name, args)
            launch_service(spec)
            manifest = read_manifest(kb_dir)
            figures[f"search_{name}"] = {"passages": manifest.num_passages, **searches(spec, manifest.dim, args)}
            shutdown_service(spec)
    finally:
        ray.shutdown()
    return figures


def main() -> None:
    args = parse_args()
    if args.searches_only and args.work_dir is None:
        raise SystemExit("--searches-only needs the --work-dir of an earlier run")
    measure_and_print(searches_again if args.searches_only else measure, args)


if __name__ == "__main__":
    main()
