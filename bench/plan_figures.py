"""The measured figures the capacity planner (rag_lightning/capacity/) ships, and a check of its memory model.

1. Search: seconds per query of an in-process FAISS index (batches of --batch queries for the top 5, one
   OpenMP thread) over --vectors random float32 vectors of --dim, for each --factories entry.
2. Build: seconds to train and fill each of those indexes on one thread, per vector.
3. Shard actors: an IndexShard actor (Ray, one OpenMP thread) on a tiny knowledge base (--tiny vectors, Flat)
   gives the base overhead: its resident set (RSS) minus what the planner counts as its data. Then one actor per
   factory over a shard of --vectors: its RSS beside the planner's prediction for the same shard (base, index,
   token ids and the memory-mapped embeddings).
4. Encoding: passages/s of the bundled MiniLM's forward pass (no gradients) over --encode-passages passages of
   128 tokens, batches of 32, on 2 torch threads (`minilm_encode_passages_per_s`): the CPU encoding rate the
   planner scales refresh times from.

    python bench/plan_figures.py                                          # 200,000 x 64
    python bench/plan_figures.py --vectors 20000 --tiny 500 --encode-passages 64   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import ray
import torch
from common import measure_and_print
from retrieval_service import TOKENS_PER_PASSAGE, query_batches, write_vector_kb
from synthetic import VOCABULARY_WORDS, made_up_words, sentences

from rag_lightning.capacity.index_model import index_model
from rag_lightning.config import EncoderConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import launch_service, shutdown_service
from retrieval_workers.shard_build import build_index
from retrieval_workers.types import ServiceSpec

log = logging.getLogger("plan_figures")
MIB = 2**20
ENCODE_TOKENS, ENCODE_BATCH, ENCODE_THREADS = 128, 32, 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=200_000, help="vectors of the search, build and actor figures")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--factories", default="Flat;PQ16;HNSW32;IVF1024,PQ16", help="';'-separated faiss factory strings")
    p.add_argument("--batch", type=int, default=8, help="queries per search")
    p.add_argument("--calls", type=int, default=50, help="timed searches per factory")
    p.add_argument("--tiny", type=int, default=2000, help="vectors of the tiny knowledge base (base overhead)")
    p.add_argument("--encode-passages", type=int, default=512, help="passages the MiniLM encoding figure times")
    p.add_argument("--work-dir", type=Path, help="where the knowledge bases go, kept (default: a temp dir)")
    return p.parse_args()


def search_and_build(vectors: np.ndarray, factory: str, batch: int, calls: int) -> dict:
    started = time.perf_counter()
    index = build_index(vectors, factory)
    build_s = time.perf_counter() - started
    queries = query_batches(1, calls + 5, batch, vectors.shape[1])
    for q in queries[:5]:
        index.search(q, 5)
    started = time.perf_counter()
    for q in queries[5:]:
        index.search(q, 5)
    search_s = time.perf_counter() - started
    return {"search_s_per_query": search_s / (calls * batch), "build_s_per_vector": build_s / len(vectors)}


def actor_rss(kb_dir: Path, vectors: np.ndarray, factory: str) -> int:
    """Resident bytes of one IndexShard actor serving `vectors` as one shard, after a few searches."""
    write_vector_kb(kb_dir, vectors, 1, factory)
    spec = ServiceSpec(kb_dir=str(kb_dir), num_shards=1, num_replicas=1, name_prefix=f"plan{kb_dir.name}")
    launch_service(spec)
    actor = ray.get_actor(spec.actor_name(0, 0), namespace=spec.namespace)
    for q in query_batches(2, 20, 8, vectors.shape[1]):
        ray.get(actor.search.remote(q, 5))
    pid = ray.get(actor.__ray_call__.remote(lambda instance: __import__("os").getpid()))
    rss = psutil.Process(pid).memory_info().rss
    shutdown_service(spec)
    return rss


@torch.no_grad()
def minilm_encode_rate(passages: int) -> float:
    """Passages/s of the bundled MiniLM encoding `passages` passages of made-up words, each cut at ENCODE_TOKENS
    tokens (their words are about 4 tokens each), in batches of ENCODE_BATCH on ENCODE_THREADS torch threads,
    after one untimed batch."""
    torch.set_num_threads(ENCODE_THREADS)
    cfg = EncoderConfig(pretrained="minilm", max_length=ENCODE_TOKENS)
    tokenizer = load_encoder_tokenizer(cfg)
    encoder = build_encoder(cfg, tokenizer).eval()
    rng = np.random.default_rng(0)
    texts = sentences(made_up_words(VOCABULARY_WORDS, rng), passages, ENCODE_TOKENS, rng)
    ids = tokenizer(texts, truncation=True, max_length=ENCODE_TOKENS, padding=True, return_tensors="pt")["input_ids"]
    encoder(ids[:ENCODE_BATCH])
    started = time.perf_counter()
    for batch in ids.split(ENCODE_BATCH):
        encoder(batch)
    return passages / (time.perf_counter() - started)


def measure(args: argparse.Namespace, work: Path) -> dict:
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, args.dim), dtype=np.float32)
    factories = args.factories.split(";")
    figures: dict = {"vectors": args.vectors, "dim": args.dim, "batch": args.batch}
    for factory in factories:
        log.info("in-process %s", factory)
        figures[factory] = search_and_build(vectors, factory, args.batch, args.calls)
    connect(None, num_cpus=2)
    tiny = vectors[: args.tiny, :32]
    tiny_rss = actor_rss(work / "tiny", tiny, "Flat")
    tiny_data = index_model("Flat", 32).shard_bytes(args.tiny) + args.tiny * 4 * (TOKENS_PER_PASSAGE + 1)
    figures["actor_base_mib"] = round((tiny_rss - tiny_data) / MIB, 1)
    for i, factory in enumerate(factories):
        log.info("actor %s", factory)
        rss = actor_rss(work / f"shard{i}", vectors, factory)
        data = (
            index_model(factory, args.dim).shard_bytes(args.vectors)
            + args.vectors * 4 * (TOKENS_PER_PASSAGE + 1)
            + vectors.nbytes
        )  # the embeddings, mapped: the searches' fault-around maps nearly all
        figures[factory].update(
            actor_rss_mib=round(rss / MIB, 1), predicted_mib=round(figures["actor_base_mib"] + data / MIB, 1)
        )
    ray.shutdown()
    log.info("MiniLM encoding")
    figures["minilm_encode_passages_per_s"] = round(minilm_encode_rate(args.encode_passages), 1)
    return figures


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    measure_and_print(measure, parse_args())
