"""Knowledge-base builds: what is written reads back equal, builds are atomic, identical builds are reused."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import rag_lightning.kb.build as build_kb_module
import retrieval_workers.kb_store as kb_store
from rag_lightning.config import IndexConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.errors import UserError
from rag_lightning.kb.build import build_knowledge_base
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer
from rag_lightning.kb.passage_text import DOC_SEP
from rag_lightning.kb.source import read_documents, split_into_passages
from retrieval_workers.encoding import encode_token_ids
from retrieval_workers.index_shard import IndexShard
from retrieval_workers.kb_store import MANIFEST, PassageTable, load_embeddings, read_manifest, sha256_file, verify_file

from helpers import TINY_DIM, tiny_kb_config, write_documents


def _assert_kb_whole(kb_dir: Path):
    """Every file the manifest lists verifies, and every shard loads and answers a query."""
    manifest = read_manifest(kb_dir)
    assert manifest.files, "a manifest must list its files"
    listed_passages = [f for f in manifest.files if f == manifest.passages_file]
    assert listed_passages == [manifest.passages_file]
    for relative in manifest.files:
        assert verify_file(kb_dir, manifest, relative).is_file()
    assert (kb_dir / manifest.encoder["generator_tokenizer"]).is_dir()
    load_generator_tokenizer(kb_dir / manifest.encoder["generator_tokenizer"])
    for shard, (start, end) in enumerate(manifest.shards):
        index_shard = IndexShard(str(kb_dir), shard)
        assert index_shard.active == manifest.active_version
        assert faiss.read_index(str(kb_dir / manifest.shard_index_file(shard))).ntotal == end - start
        result = index_shard.search(np.ones((1, manifest.dim), np.float32), 2)
        assert np.all((result.ids >= start) & (result.ids < end))
    return manifest


def _manifest_bytes(kb_dir: Path) -> bytes:
    return (kb_dir / MANIFEST).read_bytes()


# --- round trip ---------------------------------------------------------------------------------------------


def test_build_round_trip(tmp_path):
    source = tmp_path / "docs.jsonl"
    rows = write_documents(source, num_docs=6, words_per_doc=20)  # 20 words, 8 a passage -> 3 passages a doc
    kb = tiny_kb_config(source, tmp_path / "kb")
    torch.manual_seed(1234)  # the random context encoder is the first thing drawn from torch's RNG
    manifest = build_knowledge_base(kb, IndexConfig(factory="Flat", shards=2))
    kb_dir = Path(kb.dir)

    # passages: the source split into passages of at most 8 words, in order, each keeping its title
    expected = list(split_into_passages(read_documents(source), kb.words_per_passage))
    assert len(expected) == 18
    assert [(p.title, p.text) for p in expected][:3] == [
        (rows[0]["title"], " ".join(rows[0]["text"].split()[i : i + 8])) for i in (0, 8, 16)
    ]
    assert manifest.num_passages == 18 and manifest.dim == TINY_DIM
    assert manifest.shards == [(0, 9), (9, 18)]
    assert manifest.active_version == 0
    assert manifest.index_factory == "Flat"
    _assert_kb_whole(kb_dir)

    table = PassageTable(kb_dir / manifest.passages_file)
    assert len(table) == 18
    assert table._table.column("id").to_pylist() == list(range(18))
    assert table.titles_and_texts(range(18)) == [(p.title, p.text) for p in expected]
    assert table.titles_and_texts([5, 0]) == [
        (expected[5].title, expected[5].text),
        (expected[0].title, expected[0].text),
    ]

    # generator token ids: the KB's saved tokenizer over "title / text //"
    generator_tokenizer = load_generator_tokenizer(kb_dir / manifest.encoder["generator_tokenizer"])
    want_generator = generator_tokenizer(
        [p.title + " / " + p.text + " //" for p in expected],
        add_special_tokens=False,
        truncation=True,
        max_length=kb.max_passage_tokens,
    )["input_ids"]
    values, offsets = table.token_ids("generator_ids")
    got_generator = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(18)]
    assert got_generator == want_generator
    # a slice of rows reads back the same ids with offsets rebased to 0
    part_values, part_offsets = table.token_ids("generator_ids", 9, 18)
    assert part_offsets[0] == 0
    assert [part_values[part_offsets[i] : part_offsets[i + 1]].tolist() for i in range(9)] == want_generator[9:]

    # encoder token ids: the encoder tokenizer over (title, text) pairs
    encoder_tokenizer = load_encoder_tokenizer(kb.context_encoder)
    want_encoder = encoder_tokenizer(
        [p.title for p in expected],
        [p.text for p in expected],
        truncation=True,
        max_length=kb.context_encoder.max_length,
    )["input_ids"]
    enc_values, enc_offsets = table.token_ids("encoder_ids")
    assert [enc_values[enc_offsets[i] : enc_offsets[i + 1]].tolist() for i in range(18)] == want_encoder

    # embeddings: the same random encoder (same seed), run directly
    embeddings = load_embeddings(kb_dir, manifest)
    assert embeddings.dtype == np.float32 and embeddings.shape == (18, TINY_DIM)
    encoder = build_encoder(kb.context_encoder, encoder_tokenizer).eval()
    np.testing.assert_allclose(encode_token_ids(encoder, enc_values, enc_offsets, 4), embeddings, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # one passage at a time, no padding: the batching must not change any row
        one_by_one = np.stack([encoder(torch.tensor([ids]))[0].numpy() for ids in want_encoder])
    np.testing.assert_allclose(one_by_one, embeddings, rtol=1e-4, atol=1e-5)
    assert len({tuple(np.round(row, 5)) for row in embeddings}) == 18

    # each shard's index holds exactly its rows: an exact search over it reproduces the rows' scores
    query = np.random.default_rng(0).standard_normal((1, TINY_DIM)).astype(np.float32)
    for shard, (start, end) in enumerate(manifest.shards):
        index = faiss.read_index(str(kb_dir / manifest.shard_index_file(shard)))
        assert index.ntotal == end - start and index.metric_type == faiss.METRIC_INNER_PRODUCT
        scores, ids = index.search(query, end - start)
        np.testing.assert_allclose(scores[0], (embeddings[start:end] @ query[0])[ids[0]], rtol=1e-5, atol=1e-5)
        assert sorted(ids[0].tolist()) == list(range(end - start))

    # the manifest lists exactly the passage table and the version's files, with their checksums
    assert set(manifest.files) == {
        manifest.passages_file,
        "v0/version.json",
        "v0/shard_000.faiss",
        "v0/shard_000.embeddings.npy",
        "v0/shard_001.faiss",
        "v0/shard_001.embeddings.npy",
    }
    assert all(sha256_file(kb_dir / f) == digest for f, digest in manifest.files.items())
    assert json.loads(_manifest_bytes(kb_dir))["active_version"] == 0


def test_generator_vocabulary_covers_the_passage_separators(tmp_path):
    """Passages are stored as "title / text //": with a vocabulary trained on the KB, no id is <unk>, and each
    passage ends with the "//" that separates it from the question in a context."""
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=4)
    kb = tiny_kb_config(source, tmp_path / "kb")
    manifest = build_knowledge_base(kb, IndexConfig(factory="Flat", shards=1))
    generator_tokenizer = load_generator_tokenizer(Path(kb.dir) / manifest.encoder["generator_tokenizer"])
    values, offsets = PassageTable(Path(kb.dir) / manifest.passages_file).token_ids("generator_ids")
    passages = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(manifest.num_passages)]
    assert generator_tokenizer.convert_ids_to_tokens(passages[0][-1]) == DOC_SEP.strip()
    assert generator_tokenizer.unk_token_id not in values
    assert all(ids[-1] == passages[0][-1] for ids in passages)


def test_a_build_in_several_chunks_equals_one_in_one_chunk(tmp_path, monkeypatch):
    """The passages stream through tokenizing and the passage table CHUNK_PASSAGES at a time: chunks of 7 (the
    last one short) give the same passage table, embeddings and indexes as one chunk, and the stages count every
    passage. Each stage that worked took time, and the stages are parts of the build that do not overlap."""
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=12, words_per_doc=20)  # 36 passages
    built = {}
    for chunk in (1000, 7):
        monkeypatch.setattr(build_kb_module, "CHUNK_PASSAGES", chunk)
        torch.manual_seed(1234)
        stages = build_kb_module.BuildStages()
        kb_dir = tmp_path / f"kb-{chunk}"
        built[chunk] = (
            kb_dir,
            build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(factory="Flat", shards=2), stages),
        )
        assert stages.passages == 36
        seconds = stages.seconds()
        # Flat needs no training, and no BM25 index is asked for
        assert all(seconds[stage] > 0 for stage in seconds if stage not in ("index_train", "sparse")), seconds
        assert seconds["sparse"] == 0
        assert sum(seconds.values()) <= stages.total_s, (seconds, stages.total_s)
    (one_dir, one), (many_dir, many) = built[1000], built[7]
    assert many.num_passages == one.num_passages == 36 and many.shards == one.shards
    one_table = PassageTable(one_dir / one.passages_file)._table
    many_table = PassageTable(many_dir / many.passages_file)._table
    assert many_table.num_rows == 36 and many_table.column("id").to_pylist() == list(range(36))
    assert many_table.schema == one_table.schema and many_table.equals(one_table)
    np.testing.assert_array_equal(load_embeddings(many_dir, many), load_embeddings(one_dir, one))
    for shard in range(len(one.shards)):
        assert (many_dir / many.shard_index_file(shard)).read_bytes() == (
            one_dir / one.shard_index_file(shard)
        ).read_bytes()
    _assert_kb_whole(many_dir)


# --- reuse and replacement ----------------------------------------------------------------------------------


def test_identical_rebuild_is_reused(tmp_path, monkeypatch):
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=5)
    kb = tiny_kb_config(source, tmp_path / "kb")
    index = IndexConfig(factory="Flat", shards=2)
    first = build_knowledge_base(kb, index)
    before = _manifest_bytes(Path(kb.dir))
    listing = sorted(p.name for p in Path(kb.dir).rglob("*"))

    def must_not_encode(*args, **kwargs):
        raise AssertionError("an identical build must be reused, not encoded again")

    with monkeypatch.context() as patch:
        patch.setattr(build_kb_module, "build_shard", must_not_encode)
        again = build_knowledge_base(replace(kb, encode_batch_size=3), index)  # batch size is not an input
    assert again == first
    assert _manifest_bytes(Path(kb.dir)) == before
    assert sorted(p.name for p in Path(kb.dir).rglob("*")) == listing
    _assert_kb_whole(Path(kb.dir))

    # kb.rebuild forces a new version even with identical inputs
    rebuilt = build_knowledge_base(replace(kb, rebuild=True), index)
    assert rebuilt.active_version == first.active_version + 1
    assert rebuilt.fingerprint == first.fingerprint
    assert not (Path(kb.dir) / "v0").exists()
    _assert_kb_whole(Path(kb.dir))

    # a different index setting is a different build
    resharded = build_knowledge_base(kb, IndexConfig(factory="Flat", shards=3))
    assert resharded.active_version == rebuilt.active_version + 1 and len(resharded.shards) == 3
    _assert_kb_whole(Path(kb.dir))


CRASH_POINTS = ["encode_shard", "shard_index_write", "manifest_write"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_crashed_rebuild_leaves_the_previous_kb_whole_and_a_later_build_replaces_it(tmp_path, monkeypatch, crash_at):
    kb_dir = tmp_path / "kb"
    source_a, source_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_documents(source_a, num_docs=5, seed=1)
    rows_b = write_documents(source_b, num_docs=7, seed=2)
    index = IndexConfig(factory="Flat", shards=2)
    first = build_knowledge_base(tiny_kb_config(source_a, kb_dir), index)
    first_bytes = _manifest_bytes(kb_dir)
    first_embeddings = load_embeddings(kb_dir, first)
    first_texts = PassageTable(kb_dir / first.passages_file).titles_and_texts(range(first.num_passages))

    class SimulatedCrash(Exception):
        pass

    def crash(*args, **kwargs):
        raise SimulatedCrash(crash_at)

    real_write_index = build_kb_module.faiss.write_index
    shard_writes = []

    def crash_on_second_shard(shard_index, path):
        shard_writes.append(path)
        if len(shard_writes) == 2:
            raise SimulatedCrash(crash_at)
        real_write_index(shard_index, path)

    with monkeypatch.context() as patch:
        if crash_at == "encode_shard":
            patch.setattr(build_kb_module, "build_shard", crash)
        elif crash_at == "shard_index_write":
            patch.setattr(build_kb_module.faiss, "write_index", crash_on_second_shard)
        else:
            patch.setattr(kb_store, "write_manifest", crash)
        with pytest.raises(SimulatedCrash):
            build_knowledge_base(tiny_kb_config(source_b, kb_dir), index)

    # the first knowledge base is untouched and serves as before
    assert _manifest_bytes(kb_dir) == first_bytes
    manifest = _assert_kb_whole(kb_dir)
    assert manifest == first
    np.testing.assert_array_equal(load_embeddings(kb_dir, manifest), first_embeddings)
    assert PassageTable(kb_dir / manifest.passages_file).titles_and_texts(range(first.num_passages)) == first_texts

    # a successful build of the new source replaces it, and the old version's files are pruned
    second = build_knowledge_base(tiny_kb_config(source_b, kb_dir), index)
    assert second.active_version == first.active_version + 1
    assert second.fingerprint != first.fingerprint
    assert second.num_passages == 7 * 3
    _assert_kb_whole(kb_dir)
    texts = PassageTable(kb_dir / second.passages_file).titles_and_texts(range(second.num_passages))
    assert texts[0] == (rows_b[0]["title"], " ".join(rows_b[0]["text"].split()[:8]))
    for old in first.files:
        if old not in second.files:
            assert not (kb_dir / old).exists(), f"{old} of the replaced version was not pruned"
    assert not (kb_dir / first.encoder["generator_tokenizer"]).exists()
    assert not (kb_dir / first.version_dir()).exists()
    top_level = {p.name for p in kb_dir.iterdir()}
    assert top_level == {MANIFEST, second.passages_file, second.encoder["generator_tokenizer"], second.version_dir()}, (
        "no staging dirs or temp files may be left behind"
    )


def test_a_rebuild_deletes_nothing_outside_the_kb_that_a_tampered_manifest_lists(tmp_path, caplog):
    """Pruning the previous build deletes only paths inside kb_dir: never an absolute path, one through .. or a
    symlinked folder, a symlink, or kb_dir itself, whatever manifest.json says."""
    source, kb_dir = tmp_path / "docs.jsonl", tmp_path / "kb"
    write_documents(source, num_docs=4)
    index = IndexConfig(factory="Flat", shards=1)
    first = build_knowledge_base(tiny_kb_config(source, kb_dir), index)
    victim, absolute, linked = tmp_path / "victim.txt", tmp_path / "elsewhere" / "absolute.txt", tmp_path / "linked"
    absolute.parent.mkdir()
    linked.mkdir()
    for path in (victim, absolute, linked / "data.txt"):
        path.write_text("the user's")
    (tmp_path / "tokenizer").mkdir()
    (kb_dir / "link").symlink_to(linked, target_is_directory=True)
    tampered = ["../victim.txt", str(absolute), "link/data.txt", "link", ".", "v0/../../tokenizer"]
    raw = json.loads((kb_dir / MANIFEST).read_text())
    raw["files"].update({relative: "0" * 64 for relative in tampered})
    raw["encoder"]["generator_tokenizer"] = "../tokenizer"
    (kb_dir / MANIFEST).write_text(json.dumps(raw))

    second = build_knowledge_base(tiny_kb_config(source, kb_dir, words_per_passage=6), index)  # other settings

    for path in (victim, absolute, linked / "data.txt"):
        assert path.read_text() == "the user's", path
    assert (tmp_path / "tokenizer").is_dir() and (kb_dir / "link").is_symlink()
    _assert_kb_whole(kb_dir)
    assert not any((kb_dir / relative).exists() for relative in first.files if relative not in second.files)
    for relative in [*tampered, "../tokenizer"]:
        assert f"not deleting {relative!r}" in caplog.text, relative


def test_a_folder_of_other_files_is_refused_as_kb_dir_but_an_interrupted_first_build_is_taken_up(tmp_path, monkeypatch):
    """A build replaces folders of its own names (v0/, ...): without a manifest.json, kb.dir may hold only what an
    interrupted build left, never the user's other files."""
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=4)
    index = IndexConfig(factory="Flat", shards=1)
    theirs = tmp_path / "theirs"
    (theirs / "v0").mkdir(parents=True)
    (theirs / "v0" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match=r"kb\.dir: .*theirs is a folder of other files.*found v0"):
        build_knowledge_base(tiny_kb_config(source, theirs), index)
    assert sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*")) == ["v0", "v0/notes.txt"]
    assert (theirs / "v0" / "notes.txt").read_text() == "the user's"

    kb_dir = tmp_path / "kb"
    with monkeypatch.context() as patch:
        patch.setattr(build_kb_module, "build_shard", lambda *args, **kwargs: 1 / 0)
        patch.setattr(build_kb_module, "_remove_uncommitted", lambda *args, **kwargs: None)  # as if SIGKILLed
        with pytest.raises(ZeroDivisionError):
            build_knowledge_base(tiny_kb_config(source, kb_dir), index)
    assert not (kb_dir / MANIFEST).exists() and any(kb_dir.iterdir())
    build_knowledge_base(tiny_kb_config(source, kb_dir), index)
    _assert_kb_whole(kb_dir)


# --- index types --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, index_type, num_docs, shards",
    [
        ("HNSW32", faiss.IndexHNSWFlat, 8, 2),
        ("IVF4,PQ8", faiss.IndexIVFPQ, 100, 1),  # PQ8 trains 256 centroids per sub-vector: >= 256 passages a shard
    ],
)
def test_approximate_index_factories_build_and_search(tmp_path, factory, index_type, num_docs, shards):
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=num_docs)
    kb = tiny_kb_config(source, tmp_path / "kb")
    manifest = build_knowledge_base(kb, IndexConfig(factory=factory, shards=shards))
    assert manifest.index_factory == factory and len(manifest.shards) == shards
    _assert_kb_whole(Path(kb.dir))
    embeddings = load_embeddings(Path(kb.dir), manifest)
    queries = embeddings[::7][:8] - embeddings.mean(0)
    for shard, (start, end) in enumerate(manifest.shards):
        index = faiss.read_index(str(Path(kb.dir) / manifest.shard_index_file(shard)))  # already the concrete type
        assert isinstance(index, index_type)
        assert index.is_trained and index.ntotal == end - start
        assert index.metric_type == faiss.METRIC_INNER_PRODUCT

        params = "nprobe=4" if factory.startswith("IVF") else "efSearch=64"
        served = IndexShard(kb.dir, shard, search_params=params).search(queries, 5)
        ids = served.ids
        assert np.all((ids >= start) & (ids < end))
        assert all(len(set(row)) == 5 for row in ids.tolist())
        assert np.all(np.diff(served.scores, axis=1) <= 1e-6)
        np.testing.assert_array_equal(served.embeddings, embeddings[ids])
        exact = np.argsort(-(queries @ embeddings[start:end].T), axis=1)[:, :5] + start
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids.tolist(), exact.tolist())])
        assert recall >= (0.9 if factory.startswith("HNSW") else 0.6), recall


def test_pq_factory_with_too_few_passages_is_refused_before_encoding(tmp_path):
    """PQ8 needs 256 training vectors a shard; a 45-passage KB gets a clear index.factory error, not a crash."""
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=15)
    with pytest.raises(UserError, match=r"index\.factory.*IVF4,PQ8"):
        build_knowledge_base(tiny_kb_config(source, tmp_path / "kb"), IndexConfig(factory="IVF4,PQ8", shards=1))
    assert not (tmp_path / "kb" / MANIFEST).exists()


def test_unknown_factory_and_too_many_ivf_lists_are_refused(tmp_path):
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=4)  # 12 passages
    kb = tiny_kb_config(source, tmp_path / "kb")
    with pytest.raises(UserError, match=r"index\.factory: 'NoSuchIndex12' is not a FAISS index factory string"):
        build_knowledge_base(kb, IndexConfig(factory="NoSuchIndex12", shards=1))
    with pytest.raises(UserError, match=r"index\.factory: 'IVF16,Flat' needs at least 16 passages per shard"):
        build_knowledge_base(kb, IndexConfig(factory="IVF16,Flat", shards=1))
    assert not (tmp_path / "kb" / MANIFEST).exists()


@pytest.mark.parametrize("shards, replicas", [(0, 1), (-1, 1), (1, 0)])
def test_non_positive_shards_or_replicas_are_refused(tmp_path, shards, replicas):
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=4)
    with pytest.raises(UserError, match=r"index\.shards and index\.replicas must be >= 1"):
        build_knowledge_base(
            tiny_kb_config(source, tmp_path / "kb"), IndexConfig(factory="Flat", shards=shards, replicas=replicas)
        )
    assert not (tmp_path / "kb" / MANIFEST).exists()


def test_more_shards_than_passages_is_refused_with_the_passage_count(tmp_path):
    source = tmp_path / "docs.jsonl"
    write_documents(source, num_docs=4)  # 12 passages
    with pytest.raises(UserError, match=r"index\.shards=20 is more than the 12 passages"):
        build_knowledge_base(tiny_kb_config(source, tmp_path / "kb"), IndexConfig(factory="Flat", shards=20))
    assert not (tmp_path / "kb" / MANIFEST).exists()


def test_every_file_of_a_knowledge_base_has_the_mode_a_plain_open_gives(two_shard_kb):
    """manifest.json and the passage table were written 0600 (mkstemp's mode), the other files 0644."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {
        p.relative_to(two_shard_kb).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in two_shard_kb.rglob("*")
        if p.is_file()
    }
    assert "manifest.json" in modes and modes == dict.fromkeys(modes, 0o666 & ~umask)
