"""The BM25 index beside the dense one, through real Ray actors: sharded, it is one BM25 over the whole knowledge
base (bm25s' own, exactly); the service's union of dense and BM25 candidates is a brute force's; a dead replica
fails over; a refresh leaves the BM25 files as they were; an interrupted build leaves none behind."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path

import bm25s
import numpy as np
import pytest
import ray
import Stemmer

from rag_lightning.config import IndexConfig
from rag_lightning.kb import build as build_module
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers.kb_store import PassageTable, load_embeddings, read_manifest, sha256_file
from retrieval_workers.refresh import launch_refresher, shutdown_refresher
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service
from retrieval_workers.sparse_index import Bm25Settings
from retrieval_workers.types import RefreshSpec

from helpers import perturbed_kb_encoder, tiny_kb_config, unique_spec, write_documents

NUM_PASSAGES = 60  # 20 documents of 24 words, 8 words a passage
K = 4


@pytest.fixture(scope="module")
def sparse_kb(tmp_path_factory):
    """sparse_kb(S) -> the directory of a 60-passage Flat KB with a BM25 index, in S shards (built once per S)."""
    source = tmp_path_factory.mktemp("source") / "kb.jsonl"
    write_documents(source, 20)
    built: dict[int, Path] = {}

    def get(shards: int) -> Path:
        if shards not in built:
            kb_dir = tmp_path_factory.mktemp(f"kb_s{shards}")
            build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(shards=shards, sparse="bm25"))
            built[shards] = kb_dir
        return built[shards]

    return get


def _questions(kb_dir: Path, n: int = 6) -> list[str]:
    """Questions made of a few words of the passages (and one of words no passage holds)."""
    texts = [
        text for chunk in PassageTable(kb_dir / read_manifest(kb_dir).passages_file).joined_texts(100) for text in chunk
    ]
    rng = random.Random(0)
    made = [" ".join(rng.sample(rng.choice(texts).split(), 3)) + " ?" for _ in range(n - 1)]
    return [*made, "what is the zzyzx of the quux ?"]


def _bm25s_reference(kb_dir: Path, questions: list[str]) -> np.ndarray:
    """bm25s' own scores of every passage for each question [B, N]: one index over the whole knowledge base, built
    with its public tokenize and index, with the settings the manifest records."""
    settings = asdict(Bm25Settings())
    assert read_manifest(kb_dir).sparse == {**read_manifest(kb_dir).sparse, **settings}
    texts = [
        text for chunk in PassageTable(kb_dir / read_manifest(kb_dir).passages_file).joined_texts(100) for text in chunk
    ]
    stemmer = Stemmer.Stemmer(settings["stemmer"])
    retriever = bm25s.BM25(k1=settings["k1"], b=settings["b"], method=settings["method"])
    retriever.index(
        bm25s.tokenize(texts, stopwords=settings["stopwords"], stemmer=stemmer, show_progress=False),
        show_progress=False,
    )
    tokens = bm25s.tokenize(
        questions, stopwords=settings["stopwords"], stemmer=stemmer, return_ids=False, show_progress=False
    )
    return np.stack([retriever.get_scores(t) if t else np.zeros(len(texts), np.float32) for t in tokens])


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k best of scores [N] by descending score, then id."""
    return np.lexsort((np.arange(len(scores)), -scores))[:k]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_the_union_of_sharded_bm25_and_dense_equals_a_brute_force_over_the_whole_kb(
    ray_cluster, sparse_kb, shards, replicas
):
    kb_dir = sparse_kb(shards)
    embeddings = load_embeddings(kb_dir, read_manifest(kb_dir))
    questions = _questions(kb_dir)
    vectors = np.random.default_rng(0).standard_normal((len(questions), embeddings.shape[1])).astype(np.float32)
    bm25 = _bm25s_reference(kb_dir, questions)
    dense = vectors @ embeddings.T
    spec = unique_spec(kb_dir, shards, replicas)
    launch_service(spec)
    try:
        for offset in range(replicas):
            result = RetrievalClient(spec, replica_offset=offset).search(vectors, K, questions)
            assert result.ids.shape == (len(questions), 2 * K) and result.bm25 is not None
            for b, ids in enumerate(result.ids):
                assert len(set(ids.tolist())) == 2 * K, "each candidate once"
                # both scores of every candidate: BM25 exactly bm25s', q . d the brute force's
                np.testing.assert_array_equal(result.bm25[b], bm25[b, ids])
                np.testing.assert_allclose(result.scores[b], dense[b, ids], rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(result.embeddings[b], embeddings[ids])
                # the dense top K first, then BM25's top K not among them, then the next dense candidates
                dense_order = _best(dense[b], NUM_PASSAGES)
                matching = np.flatnonzero(bm25[b] > 0)
                bm25_top = matching[_best(bm25[b, matching], K)]
                np.testing.assert_array_equal(ids[:K], dense_order[:K])
                extra = [i for i in bm25_top if i not in dense_order[:K]]
                np.testing.assert_array_equal(ids[K : K + len(extra)], extra)
                np.testing.assert_array_equal(
                    ids[K + len(extra) :], [i for i in dense_order[K:] if i not in extra][: K - len(extra)]
                )
            assert (bm25[:-1] > 0).sum(1).min() >= K, "the made-up questions match passages"
            assert np.all(result.bm25[-1] == 0), "a question of unknown words matches nothing"
            # the dense search alone is unchanged
            assert RetrievalClient(spec).search(vectors, K).bm25 is None
    finally:
        shutdown_service(spec)


def test_sparse_search_fails_over_to_another_replica(ray_cluster, sparse_kb):
    kb_dir = sparse_kb(2)
    questions = _questions(kb_dir, 3)
    vectors = load_embeddings(kb_dir, read_manifest(kb_dir))[[1, 12, 25]]
    spec = unique_spec(kb_dir, shards=2, replicas=2)
    launch_service(spec)
    try:
        client = RetrievalClient(spec)
        before = client.search(vectors, K, questions)
        ray.kill(client.replicas[0][0], no_restart=True)
        for _ in range(300):  # ray.kill returns at once: wait until the actor no longer answers
            try:
                ray.get(client.replicas[0][0].ready.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
        after = client.search(vectors, K, questions)
        assert client.failovers == 1
        for field in ("ids", "scores", "bm25"):
            np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
    finally:
        shutdown_service(spec)


def test_a_refresh_keeps_the_bm25_files_byte_identical_and_hybrid_search_serves_the_new_version(
    ray_cluster, sparse_kb, tmp_path
):
    import shutil

    kb_dir = Path(shutil.copytree(sparse_kb(2), tmp_path / "kb"))
    manifest = read_manifest(kb_dir)
    sparse_files = {name: digest for name, digest in manifest.files.items() if name.startswith(manifest.sparse["dir"])}
    assert len(sparse_files) == 3  # the vocabulary and one file per shard
    questions = _questions(kb_dir, 3)
    vectors = load_embeddings(kb_dir, manifest)[[1, 12, 25]]
    spec = unique_spec(kb_dir, shards=2, replicas=1)
    launch_service(spec)
    coordinator = launch_refresher(spec, RefreshSpec(batch_size=16, keep_versions=2))
    try:
        client = RetrievalClient(spec)
        before = client.search(vectors, K, questions)
        encoder = perturbed_kb_encoder(kb_dir, seed=3)
        report = ray.get(coordinator.refresh.remote([ray.put(encoder.snapshot(5))], 5))
        assert report.error is None
        refreshed = read_manifest(kb_dir)
        assert refreshed.active_version == 1 and refreshed.sparse == manifest.sparse
        for name, digest in sparse_files.items():
            assert refreshed.files[name] == digest == sha256_file(kb_dir / name)
        after = client.search(vectors, K, questions)
        assert after.version == 1
        new_embeddings = load_embeddings(kb_dir, refreshed)
        for b, ids in enumerate(after.ids):
            np.testing.assert_array_equal(after.embeddings[b], new_embeddings[ids])
            np.testing.assert_allclose(after.scores[b], new_embeddings[ids] @ vectors[b], rtol=1e-5, atol=1e-5)
        # BM25's own top K (always in the union) and their scores did not move
        for b in range(len(questions)):
            matched = [
                sorted((-score, i) for i, score in zip(r.ids[b].tolist(), r.bm25[b].tolist()) if score > 0)[:K]
                for r in (before, after)
            ]
            assert matched[0] == matched[1] and (b == len(questions) - 1 or matched[0])
    finally:
        shutdown_refresher(spec)
        shutdown_service(spec)


def test_an_interrupted_build_leaves_no_bm25_file_behind(tmp_path, monkeypatch):
    source = tmp_path / "kb.jsonl"
    write_documents(source, 6)
    kb_dir = tmp_path / "kb"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as a stop signal arrives while the shards are encoded, after the BM25 index

    monkeypatch.setattr(build_module, "build_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(shards=2, sparse="bm25"))
    assert sorted(p.name for p in kb_dir.iterdir() if not p.name.startswith(".write_probe")) == []
