"""Build a knowledge base: passages + token ids (Arrow), embeddings, sharded FAISS indexes.

    python -m rag_lightning.build_kb kb.source=passages.tsv kb.dir=my_kb index.factory=HNSW32 index.shards=4

Nothing is encoded before the source file and the config have been checked. The build
writes new files beside any existing ones and commits by replacing manifest.json, so an
interrupted build leaves the previous knowledge base whole. An identical earlier build
(same source bytes and settings) is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import faiss
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from rag_lightning.config import IndexConfig, KBConfig, register_configs
from rag_lightning.encoders import TextEncoder, build_encoder, load_encoder_tokenizer
from rag_lightning.errors import UserError, exit_on_user_error
from rag_lightning.generator_tokenizer import extra_texts, load_generator_tokenizer, train_tokenizer
from rag_lightning.kb_source import read_documents, split_into_passages
from retrieval_workers.kb_store import (KnowledgeBaseError, Manifest, read_manifest, staged_directory,
                                        sha256_file, shard_ranges, write_manifest, write_passage_table)

log = logging.getLogger(__name__)
TITLE_SEP, DOC_SEP = " / ", " // "   # as transformers' RagConfig: title / text // question


def check_index_config(index: IndexConfig, dim: int, num_passages: int) -> None:
    """Refuse a bad index config before any encoding, naming the key."""
    if index.shards < 1 or index.replicas < 1:
        raise UserError(f"index.shards and index.replicas must be >= 1 (got {index.shards}, {index.replicas})")
    shard_size = num_passages // index.shards
    if shard_size < 1:
        raise UserError(f"index.shards={index.shards} is more than the {num_passages} passages")
    try:
        probe = faiss.index_factory(dim, index.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[-1]
        raise UserError(f"index.factory: {index.factory!r} is not a FAISS index factory string ({first_line})") from None
    ivf = faiss.try_extract_index_ivf(probe)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else probe), "pq", None)
    needed = max(ivf.nlist if ivf is not None else 0, pq.ksub if pq is not None else 0)
    if needed and shard_size < needed:
        raise UserError(f"index.factory: {index.factory!r} needs at least {needed} passages per shard to train, "
                        f"the smallest shard has {shard_size}; use a smaller index or fewer index.shards")


def build_knowledge_base(kb: KBConfig, index: IndexConfig) -> Manifest:
    """Build (or reuse) the knowledge base described by kb and index; returns its manifest."""
    if kb.source is None:
        raise UserError("kb.source: no source file given (a .tsv, .csv or .jsonl with title and text)")
    if kb.words_per_passage < 1:
        raise UserError(f"kb.words_per_passage must be >= 1 (got {kb.words_per_passage})")
    kb_dir = Path(kb.dir)
    _check_writable(kb_dir)
    passages = split_into_passages(read_documents(kb.source), kb.words_per_passage)
    encoder_tokenizer = load_encoder_tokenizer(kb.context_encoder)
    encoder = build_encoder(kb.context_encoder, len(encoder_tokenizer)).eval()
    check_index_config(index, encoder.dim, len(passages))

    fingerprint = _fingerprint(kb, index)
    previous = _existing_manifest(kb_dir)
    if previous is not None and previous.fingerprint == fingerprint and not kb.rebuild:
        log.info("knowledge base in %s is up to date (%d passages), reusing it", kb_dir, previous.num_passages)
        return previous

    tag = fingerprint[:12]
    generator_tokenizer = (load_generator_tokenizer(kb.generator_tokenizer.path) if kb.generator_tokenizer.path
                           else train_tokenizer(kb.generator_tokenizer,
                                                [p.title + TITLE_SEP + p.text + DOC_SEP for p in passages]
                                                + list(extra_texts(kb.generator_tokenizer.extra_texts))))
    tokenizer_dir = f"generator_tokenizer-{tag}"
    with staged_directory(kb_dir / tokenizer_dir) as staging:
        generator_tokenizer.save_pretrained(str(staging))

    log.info("tokenizing %d passages", len(passages))
    generator_ids = generator_tokenizer([p.title + TITLE_SEP + p.text + DOC_SEP for p in passages],
                                        add_special_tokens=False, truncation=True,
                                        max_length=kb.max_passage_tokens)["input_ids"]
    encoder_ids = encoder_tokenizer([p.title for p in passages], [p.text for p in passages], truncation=True,
                                    max_length=kb.context_encoder.max_length)["input_ids"]
    passages_file = f"passages-{tag}.arrow"
    write_passage_table(kb_dir / passages_file, {
        "id": list(range(len(passages))), "title": [p.title for p in passages], "text": [p.text for p in passages],
        "generator_ids": generator_ids, "encoder_ids": encoder_ids})

    embeddings = encode_passages(encoder, encoder_ids, encoder_tokenizer.pad_token_id, kb.encode_batch_size)
    version = previous.active_version + 1 if previous is not None else 0
    manifest = Manifest(num_passages=len(passages), dim=encoder.dim, shards=shard_ranges(len(passages), index.shards),
                        active_version=version, index_factory=index.factory, passages_file=passages_file,
                        encoder={**asdict(kb.context_encoder), "generator_tokenizer": tokenizer_dir},
                        fingerprint=fingerprint)
    write_index_version(kb_dir, manifest, embeddings, version)
    manifest.files[passages_file] = sha256_file(kb_dir / passages_file)
    write_manifest(kb_dir, manifest)
    if previous is not None:
        _remove_unreferenced(kb_dir, previous, manifest)
    log.info("knowledge base ready in %s: %d passages, %d shards, index %s, version %d",
             kb_dir, len(passages), index.shards, index.factory, version)
    return manifest


@torch.no_grad()
def encode_passages(encoder: TextEncoder, token_ids: list[list[int]], pad_id: int, batch_size: int) -> np.ndarray:
    """Embed passages in batches of similar length (little padding), with a progress bar."""
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    out = np.empty((len(token_ids), encoder.dim), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="encoding passages", unit="batch"):
        rows = order[start:start + batch_size]
        width = max(len(token_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, :len(token_ids[i])] = torch.tensor(token_ids[i])
        out[rows] = encoder(ids, (ids != pad_id).long()).float().numpy()
    return out


def write_index_version(kb_dir: Path, manifest: Manifest, embeddings: np.ndarray, version: int) -> None:
    """Write v<version>/ (embeddings + one index per shard) under a temp name, then rename it into place."""
    final = kb_dir / manifest.version_dir(version)
    with staged_directory(final) as staging:
        np.save(staging / "embeddings.npy", embeddings)
        for shard, (start, end) in enumerate(tqdm(manifest.shards, desc="building shard indexes", unit="shard")):
            shard_index = faiss.index_factory(manifest.dim, manifest.index_factory, faiss.METRIC_INNER_PRODUCT)
            vectors = np.ascontiguousarray(embeddings[start:end])
            if not shard_index.is_trained:
                shard_index.train(vectors)
            shard_index.add(vectors)
            faiss.write_index(shard_index, str(staging / f"shard_{shard:03d}.faiss"))
    for path in sorted(final.iterdir()):
        manifest.files[f"{final.name}/{path.name}"] = sha256_file(path)


def _fingerprint(kb: KBConfig, index: IndexConfig) -> str:
    settings = {k: v for k, v in asdict(kb).items() if k not in ("dir", "rebuild", "encode_batch_size")}
    settings["index"] = {"factory": index.factory, "shards": index.shards}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in [kb.source, *kb.generator_tokenizer.extra_texts]:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _existing_manifest(kb_dir: Path) -> Manifest | None:
    try:
        return read_manifest(kb_dir)
    except KnowledgeBaseError:
        return None


def _check_writable(kb_dir: Path) -> None:
    try:
        kb_dir.mkdir(parents=True, exist_ok=True)
        probe = kb_dir / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"kb.dir: {kb_dir} is not writable ({e.strerror})") from None


def _remove_unreferenced(kb_dir: Path, old: Manifest, new: Manifest) -> None:
    """Delete what the previous manifest listed and the new one does not (only our own files)."""
    keep = set(new.files) | {new.encoder["generator_tokenizer"]}
    for relative in list(old.files) + [old.encoder.get("generator_tokenizer", "")]:
        if relative and relative not in keep:
            path = kb_dir / relative
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for version_dir in {relative.split("/")[0] for relative in old.files if "/" in relative}:
        path = kb_dir / version_dir
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


@hydra.main(version_base="1.3", config_path="../conf", config_name="build_kb")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = OmegaConf.to_object(cfg)
    build_knowledge_base(cfg.kb, cfg.index)


register_configs()

if __name__ == "__main__":
    main()
