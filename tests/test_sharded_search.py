"""The sharded, replicated retrieval service returns exactly what one flat index over all vectors returns."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import ray

from rag_lightning.config import IndexConfig
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers.kb_store import PassageTable, load_embeddings, read_manifest
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service
from retrieval_workers.types import PAD_TOKEN

from helpers import TINY_DIM, tiny_kb_config, unique_spec, write_documents

NUM_DOCS = 15  # 24 words each, 8 words a passage -> 45 passages
NUM_PASSAGES = 45


@pytest.fixture(scope="module")
def kb_with_shards(tmp_path_factory):
    """kb_with_shards(S) -> the directory of a 45-passage Flat KB split into S shards (built once per S)."""
    source = tmp_path_factory.mktemp("source") / "kb.jsonl"
    write_documents(source, NUM_DOCS)
    built: dict[int, Path] = {}

    def get(shards: int) -> Path:
        if shards not in built:
            kb_dir = tmp_path_factory.mktemp(f"kb_s{shards}")
            manifest = build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(factory="Flat", shards=shards))
            assert manifest.num_passages == NUM_PASSAGES
            assert len(manifest.shards) == shards
            built[shards] = kb_dir
        return built[shards]

    return get


def _queries(embeddings: np.ndarray, n: int = 6) -> np.ndarray:
    """Random queries plus queries near stored rows (fewer than 20 rows, so FAISS scores them one by one)."""
    rng = np.random.default_rng(0)
    near = embeddings[rng.choice(len(embeddings), n // 2, replace=False)] - embeddings.mean(0)
    near += 0.05 * rng.standard_normal(near.shape)
    return np.concatenate([rng.standard_normal((n - n // 2, embeddings.shape[1])), near]).astype(np.float32)


def _stored(kb_dir: Path):
    manifest = read_manifest(kb_dir)
    embeddings = load_embeddings(kb_dir, manifest)
    values, offsets = PassageTable(kb_dir / manifest.passages_file).token_ids("generator_ids")
    return manifest, embeddings, values, offsets


def _assert_matches_flat(result, queries, k, manifest, embeddings, values, offsets):
    reference = faiss.IndexFlatIP(embeddings.shape[1])
    reference.add(embeddings)
    ref_scores, ref_ids = reference.search(queries, k)
    batch = len(queries)

    assert result.version == manifest.active_version
    assert result.ids.shape == (batch, k) and result.ids.dtype == np.int64
    assert result.scores.shape == (batch, k)
    np.testing.assert_array_equal(result.ids, ref_ids)
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(result.scores, axis=1) <= 0), "scores must be best first"

    # the returned embeddings are the stored rows of the returned ids, bit for bit
    assert result.embeddings.shape == (batch, k, embeddings.shape[1])
    np.testing.assert_array_equal(result.embeddings, embeddings[result.ids])
    # and the scores are those embeddings' inner products with the query
    np.testing.assert_allclose(result.scores, np.einsum("bd,bkd->bk", queries, result.embeddings), rtol=1e-4, atol=1e-4)

    # token ids: each passage's stored generator ids, right-padded with PAD_TOKEN to the longest
    expected_lengths = offsets[result.ids + 1] - offsets[result.ids]
    np.testing.assert_array_equal(result.lengths, expected_lengths)
    assert result.token_ids.shape[:2] == (batch, k)
    assert result.token_ids.shape[2] == expected_lengths.max()
    for (b, j), passage_id in np.ndenumerate(result.ids):
        n = result.lengths[b, j]
        np.testing.assert_array_equal(result.token_ids[b, j, :n], values[offsets[passage_id] : offsets[passage_id + 1]])
        assert np.all(result.token_ids[b, j, n:] == PAD_TOKEN)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_search_equals_single_flat_index(ray_cluster, kb_with_shards, shards, replicas):
    kb_dir = kb_with_shards(shards)
    manifest, embeddings, values, offsets = _stored(kb_dir)
    assert embeddings.shape == (NUM_PASSAGES, TINY_DIM)
    assert len(offsets) == NUM_PASSAGES + 1 and np.all(np.diff(offsets) > 0)
    queries = _queries(embeddings)
    spec = unique_spec(kb_dir, shards, replicas)
    launch_service(spec)
    try:
        for shard in range(shards):
            for replica in range(replicas):  # S x R named actors, each serving the active version
                actor = ray.get_actor(spec.actor_name(shard, replica), namespace=spec.namespace)
                assert ray.get(actor.ready.remote()) == manifest.active_version
        smallest_shard = min(end - start for start, end in manifest.shards)
        assert shards < 3 or smallest_shard < 20
        for offset in range(replicas):
            client = RetrievalClient(spec, replica_offset=offset)
            assert len(client.shards) == shards
            # k=20 is more than a shard holds when S >= 3: the merge must still give the exact global top-k
            for k in (1, 5, 20):
                _assert_matches_flat(client.search(queries, k), queries, k, manifest, embeddings, values, offsets)
    finally:
        shutdown_service(spec)


def test_k_beyond_the_knowledge_base_pads_with_missing_hits(ray_cluster, kb_with_shards):
    kb_dir = kb_with_shards(3)
    manifest, embeddings, values, offsets = _stored(kb_dir)
    queries = _queries(embeddings, n=4)
    spec = unique_spec(kb_dir, 3, 1)
    launch_service(spec)
    try:
        k = NUM_PASSAGES + 3
        result = RetrievalClient(spec).search(queries, k)
        reference = faiss.IndexFlatIP(embeddings.shape[1])
        reference.add(embeddings)
        ref_scores, ref_ids = reference.search(queries, NUM_PASSAGES)
        np.testing.assert_array_equal(result.ids[:, :NUM_PASSAGES], ref_ids)
        np.testing.assert_allclose(result.scores[:, :NUM_PASSAGES], ref_scores, rtol=1e-5, atol=1e-5)
        assert np.all(result.ids[:, NUM_PASSAGES:] == -1)
        assert np.all(result.lengths[:, NUM_PASSAGES:] == 0)
        assert np.all(np.isneginf(result.scores[:, NUM_PASSAGES:]))
        assert np.all(result.embeddings[:, NUM_PASSAGES:] == 0)
        assert np.all(result.token_ids[:, NUM_PASSAGES:] == PAD_TOKEN)
        # every passage appears exactly once in each row
        assert all(sorted(row) == list(range(NUM_PASSAGES)) for row in result.ids[:, :NUM_PASSAGES].tolist())
    finally:
        shutdown_service(spec)


def test_replica_offset_picks_other_replicas_with_the_same_results(ray_cluster, kb_with_shards):
    shards, replicas = 2, 2
    kb_dir = kb_with_shards(shards)
    manifest, embeddings, values, offsets = _stored(kb_dir)
    queries = _queries(embeddings)
    spec = unique_spec(kb_dir, shards, replicas)
    launch_service(spec)
    try:
        clients = [RetrievalClient(spec, replica_offset=offset) for offset in range(3)]
        chosen = []
        for offset, client in enumerate(clients):
            expected = [
                ray.get_actor(spec.actor_name(shard, (offset + shard) % replicas), namespace=spec.namespace)
                for shard in range(shards)
            ]
            assert [a._actor_id for a in client.shards] == [a._actor_id for a in expected]
            chosen.append([a._actor_id for a in client.shards])
        assert chosen[0] != chosen[1], "offsets 0 and 1 must use different replicas"
        assert not set(chosen[0]) & set(chosen[1]), "no shard replica may be shared between offsets 0 and 1"
        assert chosen[2] == chosen[0], "the offset wraps around the replica count"

        results = [client.search(queries, 7) for client in clients[:2]]
        for field in ("ids", "scores", "embeddings", "token_ids", "lengths"):
            np.testing.assert_array_equal(getattr(results[0], field), getattr(results[1], field))
        _assert_matches_flat(results[1], queries, 7, manifest, embeddings, values, offsets)
    finally:
        shutdown_service(spec)
