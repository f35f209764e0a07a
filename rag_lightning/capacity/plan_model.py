"""The capacity plan of a training run at full size: memory per shard actor and per node, disk, refresh time,
search capacity against demand, and a warning wherever the plan does not fit.

n passages (plan.passages), S shards, R replicas, N nodes (trainer.num_nodes), G trainer ranks a node
(trainer.devices), d the embedding dimension; sizes in bytes, n_s = ceil(n / S) the largest shard.

  shard actor         base (measured: a Ray actor with faiss, numpy and pyarrow loaded, over a tiny knowledge base)
                      + its index (read fully; index_model.py) + its generator token ids (copied out of the passage
                      table: 4 bytes a token, 4 a passage of offset). A version switch holds a second index beside
                      the first: that is the actor's peak when the index is refreshed.
  embeddings          memory-mapped (n_s x d x 4): disk, and page cache as searches touch them. The pages mapped
                      count in the actor's RSS (with the kernel's fault-around, a few hundred searches map nearly
                      all: bench/plan_figures.py), but they are reclaimable, so a node's resident memory leaves
                      them out and its page cache holds them
  layout              actor i = s x R + r on node i mod N: the R replicas of a shard on R different nodes while
                      R <= N (as the service's placement groups, one a shard, place them), and the nodes' actor
                      counts within one of each other (how Ray spreads the shards is its own choice)
  node                resident: its actors (at their peak) + G trainer ranks + its encoder actors (encoder j on
                      node j mod N), each torch process plan.torch_process_gib; then its actors' embeddings as
                      page cache
  disk                an index version: S indexes + n x d x 4 of embeddings; the passage table: n x (24 + text
                      bytes + 4 x generator tokens + 4 x encoder tokens); in all: the table +
                      index_refresh.keep_versions versions (one more while a refresh writes its own) + the BM25
                      index (index.sparse=bm25), which no refresh rewrites
  BM25                with index.sparse=bm25, a shard actor also holds its BM25 file (bytes a passage measured
                      at 100 words, scaled by kb.words_per_passage), the vocabulary as a dict (plan.bm25_terms
                      terms) and a search's scores (B x n_s x 4)
  refresh             encoder actors take the shards in turn: ceil(S / workers) x (n_s / rate + build(n_s) / threads);
                      rate: plan.encode_rate, or the table's row of the device (measured.py) scaled by the encoder's
                      FLOPs a passage, and on a CPU by its threads (index_refresh.worker_cpus)
  search              a replica answers one call of B = data.batch_size queries at a time on service.omp_threads:
                      B / (Ray's call + B x search(n_s) / min(B, threads)) queries/s (timing.py); a shard gives R
                      times that; the trainers ask N x G x steps/s x B x accumulate_grad_batches, every query of
                      every shard
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rag_lightning.capacity import measured
from rag_lightning.capacity.index_model import FLOAT_BYTES, IndexModel, index_model
from rag_lightning.capacity.timing import build_seconds, search_params, search_seconds
from rag_lightning.config import EncoderConfig, PlanConfig
from rag_lightning.encoders.folders import resolve_encoder

GIB = 2**30
MIB = 2**20
TOKEN_BYTES = 4  # int32 token ids and list offsets in the passage table
TABLE_ROW_BYTES = 8 + 4 * 4  # a passage's id and the offsets of its four variable-length columns
BYTES_PER_WORD = 6  # English text with its spaces, about
NPY_HEADER_BYTES = 128


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    hidden: int
    dim: int  # the vector it makes
    max_length: int


def encoder_shape(cfg: EncoderConfig, key: str) -> EncoderShape:
    """Sizes of the encoder the config describes (its folder's config.json, or the random model's sizes)."""
    folder = resolve_encoder(cfg, key)
    if folder.model_dir is None:
        return EncoderShape(cfg.num_layers, cfg.hidden_size, cfg.hidden_size, folder.max_length)
    config = json.loads((folder.model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    return EncoderShape(
        cfg.num_layers or config["num_hidden_layers"], hidden, config.get("projection_dim") or hidden, folder.max_length
    )


@dataclass
class Plan:
    inputs: dict
    index: dict
    actor: dict
    nodes: list[dict]
    disk: dict
    refresh: dict
    search: dict
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: PlanConfig) -> Plan:
    p, index_cfg, refresh_cfg = cfg.plan, cfg.index, cfg.index_refresh
    assumptions: list[str] = []

    def given_or(value, fallback, what: str, source: str):
        if value is not None:
            return value
        assumptions.append(f"{what}: {fallback:g} ({source})")
        return fallback

    encoder = encoder_shape(cfg.kb.context_encoder, "kb.context_encoder")
    assert p.passages is not None  # PlanSettings.check requires it
    n, shards, replicas = int(p.passages), index_cfg.shards, index_cfg.replicas
    nodes, ranks = cfg.trainer.num_nodes, _ranks_per_node(cfg.trainer.devices)
    dim = given_or(p.dim, encoder.dim, "embedding dimension (plan.dim)", "the context encoder's output")
    gen_tokens = given_or(
        p.generator_tokens,
        cfg.kb.max_passage_tokens,
        "generator tokens a passage (plan.generator_tokens)",
        "kb.max_passage_tokens, an upper bound; give the mean measured",
    )
    enc_tokens = given_or(
        p.encoder_tokens,
        encoder.max_length,
        "encoder tokens a passage (plan.encoder_tokens)",
        "the context encoder's max_length: batches are padded to their longest",
    )
    text_bytes = given_or(
        p.text_bytes,
        BYTES_PER_WORD * cfg.kb.words_per_passage,
        "text bytes a passage (plan.text_bytes)",
        f"{BYTES_PER_WORD} bytes a word x kb.words_per_passage",
    )
    base = (
        given_or(
            p.actor_base_mib,
            measured.ACTOR_BASE_MIB,
            "shard actor base memory, MiB (plan.actor_base_mib)",
            measured.ACTOR_BASE_SOURCE,
        )
        * MIB
    )
    model = index_model(index_cfg.factory, dim)
    shard_n = math.ceil(n / shards)
    refreshing = refresh_cfg.every_n_steps is not None

    index_bytes = model.shard_bytes(shard_n)
    tokens_bytes = shard_n * (gen_tokens + 1) * TOKEN_BYTES
    bm25 = _bm25(cfg, n, shard_n, assumptions)
    steady = base + index_bytes + tokens_bytes + bm25["actor_bytes"]
    peak = steady + index_bytes if refreshing else steady
    embeddings_bytes = shard_n * dim * FLOAT_BYTES
    actor = {
        "passages": shard_n,
        "base_gib": base / GIB,
        "index_gib": index_bytes / GIB,
        "token_ids_gib": tokens_bytes / GIB,
        "bm25_gib": bm25["actor_bytes"] / GIB,
        "resident_gib": steady / GIB,
        "peak_gib": peak / GIB,
        "embeddings_gib": embeddings_bytes / GIB,
        "rss_gib": (steady + embeddings_bytes) / GIB,
    }
    assumptions += [
        f"torch process host memory: {p.torch_process_gib:g} GiB a trainer rank or encoder actor "
        "(plan.torch_process_gib); Ray's own processes and object store are not counted",
        "layout: shard actor i = shard x R + replica on node i mod N; the service puts each shard's "
        "replicas in a SPREAD placement group of their own, which gives them different nodes while "
        "R <= N (tests/test_multinode.py), and Ray spreads the shards over the nodes as it can",
        "embeddings: memory-mapped; the pages searches touch count in the actor's RSS as page cache",
    ]

    node_rows = _node_layout(shards, replicas, nodes, ranks, refresh_cfg.workers if refreshing else 0)
    for row in node_rows:
        row["actors_gib"] = len(row["actors"]) * peak / GIB
        row["torch_gib"] = (row["trainer_ranks"] + row["encoder_actors"]) * p.torch_process_gib
        row["resident_gib"] = row["actors_gib"] + row["torch_gib"]
        row["page_cache_gib"] = len(row["actors"]) * embeddings_bytes / GIB

    version_bytes = (
        shards * model.fixed_bytes + n * model.bytes_per_vector + shards * NPY_HEADER_BYTES + n * dim * FLOAT_BYTES
    )
    table_bytes = n * (TABLE_ROW_BYTES + text_bytes + TOKEN_BYTES * (gen_tokens + enc_tokens))
    versions = refresh_cfg.keep_versions if refreshing else 1
    once = table_bytes + bm25["disk_bytes"]  # written by the build, never by a refresh
    disk = {
        "version_gib": version_bytes / GIB,
        "passage_table_gib": table_bytes / GIB,
        "bm25_gib": bm25["disk_bytes"] / GIB,
        "versions_kept": versions,
        "total_gib": (once + versions * version_bytes) / GIB,
        "peak_gib": (once + (versions + refreshing) * version_bytes) / GIB,
        "bytes_per_passage": (once + version_bytes) / n,
    }

    refresh = _refresh(cfg, model, encoder, shard_n, enc_tokens, assumptions)
    search = _search(cfg, model, shard_n, ranks, assumptions)
    plan = Plan(
        inputs={
            "passages": n,
            "dim": dim,
            "factory": index_cfg.factory,
            "shards": shards,
            "replicas": replicas,
            "nodes": nodes,
            "trainer_ranks_per_node": ranks,
            "generator_tokens": gen_tokens,
            "encoder_tokens": enc_tokens,
            "text_bytes": text_bytes,
            "node_memory_gib": p.node_memory_gib,
            "steps_per_s": p.steps_per_s,
        },
        index={
            "parts": model.parts,
            "bytes_per_vector": model.bytes_per_vector,
            "fixed_bytes": model.fixed_bytes,
            "train_min": model.train_min,
        },
        actor=actor,
        nodes=node_rows,
        disk=disk,
        refresh=refresh,
        search=search,
        assumptions=assumptions,
    )
    plan.warnings = _warnings(cfg, plan, model, shard_n)
    return plan


def _bm25(cfg: PlanConfig, n: int, shard_n: int, assumptions: list[str]) -> dict:
    """Bytes of the BM25 index (index.sparse=bm25) in a shard actor and on disk; zeros without one."""
    if cfg.index.sparse is None:
        return {"actor_bytes": 0.0, "disk_bytes": 0.0}
    terms = cfg.plan.bm25_terms
    if terms is None:
        terms = measured.BM25_VOCABULARY_TERMS
        assumptions.append(
            f"BM25 vocabulary: {terms:,} terms (plan.bm25_terms), as {measured.BM25_SOURCE} had; a real corpus's "
            "grows with its size: give the distinct stemmed words of yours"
        )
    per_passage = measured.BM25_BYTES_PER_PASSAGE * cfg.kb.words_per_passage / measured.BM25_WORDS_PER_PASSAGE
    assumptions.append(
        f"BM25 shard files: {per_passage:.0f} bytes a passage ({measured.BM25_BYTES_PER_PASSAGE:g} at "
        f"{measured.BM25_WORDS_PER_PASSAGE} words, scaled by kb.words_per_passage) and "
        f"{measured.BM25_OFFSET_BYTES_PER_TERM} a vocabulary term; the vocabulary "
        f"{measured.BM25_VOCABULARY_DICT_BYTES_PER_TERM:g} bytes a term in each actor's dict ({measured.BM25_SOURCE})"
    )
    shard_file = shard_n * per_passage + terms * measured.BM25_OFFSET_BYTES_PER_TERM
    scores = cfg.data.batch_size * shard_n * FLOAT_BYTES  # a search's scores of every passage of the shard
    return {
        "actor_bytes": shard_file + terms * measured.BM25_VOCABULARY_DICT_BYTES_PER_TERM + scores,
        "disk_bytes": cfg.index.shards * shard_file + terms * measured.BM25_VOCABULARY_FILE_BYTES_PER_TERM,
    }


def _ranks_per_node(devices) -> int:
    return len(devices) if isinstance(devices, list) else int(devices)


def _node_layout(shards: int, replicas: int, nodes: int, ranks: int, encoders: int) -> list[dict]:
    rows: list[dict[str, Any]] = [
        {"node": i, "actors": [], "trainer_ranks": ranks, "encoder_actors": 0} for i in range(nodes)
    ]
    for shard in range(shards):
        for replica in range(replicas):
            rows[(shard * replicas + replica) % nodes]["actors"].append(f"s{shard}r{replica}")
    for j in range(encoders):
        rows[j % nodes]["encoder_actors"] += 1
    return rows


def _refresh(
    cfg: PlanConfig, model: IndexModel, encoder: EncoderShape, shard_n: int, enc_tokens: float, assumptions: list[str]
) -> dict:
    refresh_cfg, p = cfg.index_refresh, cfg.plan
    device = "gpu" if refresh_cfg.worker_gpus > 0 else "cpu"
    threads = max(1, int(refresh_cfg.worker_cpus))
    row = next(r for r in measured.ENCODE_RATES if r.device == device)
    flops = measured.transformer_flops(max(encoder.layers, 1), encoder.hidden, enc_tokens)  # 0 layers: as 1
    share = threads / row.threads if device == "cpu" else refresh_cfg.worker_gpus
    scaled = row.passages_per_s * row.flops_per_passage / flops * share
    if p.encode_rate is None:
        assumptions.append(
            f"encode rate: {scaled:.1f} passages/s an encoder actor: {row.passages_per_s:.1f}/s of "
            f"{row.encoder} at {row.tokens} tokens on {row.threads if device == 'cpu' else 1} "
            f"{'cores' if device == 'cpu' else 'GPU'} [{row.source}], scaled by FLOPs a passage "
            f"({encoder.layers} layers x {encoder.hidden} hidden x {enc_tokens:g} tokens) and by "
            f"{'cores' if device == 'cpu' else 'GPU share'} ({share:g})"
        )
    rate = p.encode_rate if p.encode_rate is not None else scaled
    build = build_seconds(model, shard_n) / threads
    assumptions.append(
        f"index build: {build:.0f} s a shard on {threads} thread(s) (index_refresh.worker_cpus), "
        "scaled from one-thread builds measured here (bench/plan_figures.py), linear in threads"
    )
    rounds = math.ceil(cfg.index.shards / refresh_cfg.workers)
    wall = rounds * (shard_n / rate + build)
    interval = (refresh_cfg.every_n_steps / p.steps_per_s) if refresh_cfg.every_n_steps is not None else None
    return {
        "enabled": refresh_cfg.every_n_steps is not None,
        "device": device,
        "workers": refresh_cfg.workers,
        "passages_per_s_per_worker": rate,
        "encode_s_per_shard": shard_n / rate,
        "build_s_per_shard": build,
        "wall_s": wall,
        "interval_s": interval,
    }


def _search(cfg: PlanConfig, model: IndexModel, shard_n: int, ranks: int, assumptions: list[str]) -> dict:
    batch, threads = cfg.data.batch_size, cfg.service.omp_threads
    per_query = search_seconds(model, shard_n, search_params(cfg.service.search_params))
    call = measured.RAY_CALL_S + batch * per_query / min(batch, threads)
    replica_qps = batch / call
    capacity = cfg.index.replicas * replica_qps
    demand = cfg.trainer.num_nodes * ranks * cfg.plan.steps_per_s * batch * cfg.trainer.accumulate_grad_batches
    assumptions.append(
        f"search: {per_query * 1e3:.3f} ms a query on one thread over {shard_n:,} vectors, scaled "
        f"from one-thread searches measured here (bench/plan_figures.py; {measured.SEARCH_SOURCE}), "
        f"+ {measured.RAY_CALL_S * 1e3:g} ms of Ray a call (bench/README.md), one call of "
        f"{batch} queries (data.batch_size) at a time a replica, {threads} thread(s) "
        "(service.omp_threads)"
    )
    return {
        "ms_per_query": per_query * 1e3,
        "ms_per_call": call * 1e3,
        "replica_qps": replica_qps,
        "capacity_qps": capacity,
        "demand_qps": demand,
        "utilisation": demand / capacity,
    }


def _warnings(cfg: PlanConfig, plan: Plan, model: IndexModel, shard_n: int) -> list[str]:
    warnings = []
    memory = cfg.plan.node_memory_gib
    for row in plan.nodes:
        if row["resident_gib"] > memory:
            warnings.append(
                f"node {row['node']}: {row['resident_gib']:.1f} GiB resident (shard actors "
                f"{row['actors_gib']:.1f}, torch processes {row['torch_gib']:.1f}) is over its "
                f"{memory:g} GiB (plan.node_memory_gib)"
            )
        elif row["resident_gib"] + row["page_cache_gib"] > memory:
            warnings.append(
                f"node {row['node']}: its shards' embeddings ({row['page_cache_gib']:.1f} GiB) do not "
                f"fit in the page cache beside {row['resident_gib']:.1f} GiB resident (plan."
                "node_memory_gib): searches will read them from disk"
            )
    gpus = cfg.plan.gpus_per_node if cfg.plan.gpus_per_node is not None else plan.inputs["trainer_ranks_per_node"]
    for row in plan.nodes:
        asked = (
            row["trainer_ranks"] * (cfg.trainer.accelerator == "gpu")
            + row["encoder_actors"] * cfg.index_refresh.worker_gpus
        )
        if plan.refresh["enabled"] and asked > gpus:
            warnings.append(
                f"node {row['node']}: its trainer ranks and encoder actors ask for {asked:g} GPUs of its "
                f"{gpus} (plan.gpus_per_node): Ray cannot place the encoder actors"
            )
    if cfg.index.replicas > cfg.trainer.num_nodes:
        warnings.append(
            f"index.replicas={cfg.index.replicas} is more than the {cfg.trainer.num_nodes} nodes "
            "(trainer.num_nodes): some replicas of a shard share a node, and die with it"
        )
    refresh = plan.refresh
    if refresh["enabled"] and refresh["wall_s"] > refresh["interval_s"]:
        warnings.append(
            f"a refresh takes {duration(refresh['wall_s'])}, longer than the "
            f"{duration(refresh['interval_s'])} between refreshes (index_refresh.every_n_steps="
            f"{cfg.index_refresh.every_n_steps} at plan.steps_per_s={cfg.plan.steps_per_s:g}): refreshes "
            "fall behind; add encoder workers or refresh less often"
        )
    search = plan.search
    if search["demand_qps"] > search["capacity_qps"]:
        warnings.append(
            f"the trainers ask {search['demand_qps']:,.0f} queries/s of every shard, more than its "
            f"{cfg.index.replicas} replica(s) answer ({search['capacity_qps']:,.0f}/s): add "
            "index.replicas or service.omp_threads"
        )
    if shard_n < model.train_min:
        warnings.append(
            f"index.factory={cfg.index.factory}: a shard of {shard_n:,} passages cannot train it "
            f"(faiss needs at least {model.train_min:,} vectors); use fewer shards or fewer centroids"
        )
    elif shard_n < model.train_advised:
        warnings.append(
            f"index.factory={cfg.index.factory}: a shard of {shard_n:,} passages is fewer than the "
            f"{model.train_advised:,} training vectors faiss asks for (39 a centroid); the clusters "
            "will be poor"
        )
    return warnings


def duration(seconds: float) -> str:
    return (
        f"{seconds / 3600:.1f} h"
        if seconds >= 3600
        else f"{seconds / 60:.1f} min"
        if seconds >= 60
        else f"{seconds:.1f} s"
    )
