"""Background re-encoding of the knowledge base, with real Ray actors: versions, the atomic switch,
failures, the in-flight rule, the context encoder's gradients and resuming onto a recorded version."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rag_lightning.callbacks.context_encoder_saver import SaveContextEncoder
from rag_lightning.callbacks.index_refresh import IndexRefresh
from rag_lightning.callbacks.index_version import IndexVersionCheckpointing
from rag_lightning.config import (
    DataConfig,
    EncoderConfig,
    GeneratorTokenizerConfig,
    IndexConfig,
    KBConfig,
    ModelConfig,
    OptimConfig,
    RetrieverConfig,
)
from rag_lightning.data.datamodule import QADataModule
from rag_lightning.data.demo import write_demo_data
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.kb.build import build_knowledge_base
from rag_lightning.model.rag_module import RagModule
from retrieval_workers.encoding import encode_token_ids
from retrieval_workers.kb_store import MANIFEST, PassageTable, load_embeddings, read_manifest, read_version_step
from retrieval_workers.refresh import encoder_name, launch_refresher, shutdown_refresher
from retrieval_workers.service import RetrievalClient, launch_service, shutdown_service
from retrieval_workers.types import RefreshSpec

from helpers import (
    perturbed_kb_encoder,
    quiet_trainer,
    tiny_encoder_config,
    tiny_generator_config,
    unique_spec,
    write_encoder_folder,
)


def _knowledge_base(
    tmp_path: Path, num_entities: int, shards: int, encoder: EncoderConfig | None = None
) -> tuple[Path, Path]:
    """Demo QA files and a KB over them (the tiny random encoder unless given); returns (data dir, kb dir)."""
    data_dir = tmp_path / "data"
    write_demo_data(data_dir, num_entities=num_entities, num_values=12, val_size=4, test_size=4)
    kb = KBConfig(
        source=str(data_dir / "kb.jsonl"),
        dir=str(tmp_path / "kb"),
        words_per_passage=100,
        max_passage_tokens=32,
        context_encoder=encoder or tiny_encoder_config(),
        generator_tokenizer=GeneratorTokenizerConfig(vocab_size=2000, extra_texts=[str(data_dir / "train.jsonl")]),
    )
    build_knowledge_base(kb, IndexConfig(factory="Flat", shards=shards))
    return data_dir, Path(kb.dir)


@pytest.fixture
def running_service(ray_cluster, tmp_path, request):
    """A KB with its shard service and refresh coordinator; params: (entities, shards, replicas, RefreshSpec), and
    optionally the kind of encoder folder (helpers.write_encoder_folder) the KB is encoded with."""
    num_entities, shards, replicas, refresh, *folder_kind = request.param
    encoder = (
        EncoderConfig(pretrained=str(write_encoder_folder(tmp_path / "encoder", folder_kind[0])))
        if folder_kind
        else None
    )
    data_dir, kb_dir = _knowledge_base(tmp_path, num_entities, shards, encoder)
    spec = unique_spec(kb_dir, shards=shards, replicas=replicas)
    launch_service(spec)
    coordinator = launch_refresher(spec, refresh)
    yield data_dir, spec, coordinator
    shutdown_refresher(spec)
    shutdown_service(spec)


def _refresh(coordinator, encoder, step: int):
    return ray.get(coordinator.refresh.remote([ray.put(encoder.snapshot(step))], step))


@pytest.mark.parametrize("running_service", [(40, 2, 1, RefreshSpec(batch_size=8, keep_versions=2))], indirect=True)
def test_refresh_writes_a_version_equal_to_a_direct_encoding_and_prunes_old_ones(running_service):
    _, spec, coordinator = running_service
    kb_dir = Path(spec.kb_dir)
    before = load_embeddings(kb_dir, read_manifest(kb_dir))
    encoder = perturbed_kb_encoder(kb_dir, seed=1)

    report = _refresh(coordinator, encoder, step=7)
    assert report.error is None and report.version == 1 and report.global_step == 7
    assert report.passages == 40 and report.passages_per_s > 0

    manifest = read_manifest(kb_dir)
    assert manifest.active_version == 1 and manifest.kept_versions() == [0, 1]
    assert read_version_step(kb_dir, manifest, 1) == 7
    values, offsets = PassageTable(kb_dir / manifest.passages_file).token_ids("encoder_ids")
    direct = encode_token_ids(encoder, values, offsets, batch_size=5)
    refreshed = load_embeddings(kb_dir, manifest)
    np.testing.assert_allclose(refreshed, direct, rtol=1e-4, atol=1e-5)
    assert not np.allclose(refreshed, before, atol=1e-3)

    # the service now answers from version 1, with version 1's stored embeddings
    client = RetrievalClient(spec)
    result = client.search(direct[:3], k=4)
    assert result.version == 1
    np.testing.assert_allclose(result.embeddings, refreshed[result.ids], rtol=1e-6)
    exact = direct[:3] @ refreshed.T
    np.testing.assert_allclose(result.scores, -np.sort(-exact, axis=1)[:, :4], rtol=1e-5, atol=1e-5)

    # two more refreshes: only the newest two versions stay on disk and in the manifest
    for step, seed in ((9, 2), (11, 3)):
        assert _refresh(coordinator, perturbed_kb_encoder(kb_dir, seed), step).error is None
    manifest = read_manifest(kb_dir)
    assert manifest.active_version == 3 and manifest.kept_versions() == [2, 3]
    assert sorted(p.name for p in kb_dir.glob("v*")) == ["v2", "v3"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "running_service",
    [
        (20, 2, 1, RefreshSpec(batch_size=8), "dpr_context"),
        (20, 2, 1, RefreshSpec(batch_size=8), "sentence_transformers"),
    ],
    indirect=True,
    ids=["dpr", "sentence_transformers"],
)
def test_a_refresh_of_a_dpr_or_sentence_transformers_encoder_equals_a_direct_encoding(running_service):
    """The snapshot carries the architecture (DPRContextEncoder, a BERT with [CLS] pooling and normalisation)."""
    _, spec, coordinator = running_service
    kb_dir = Path(spec.kb_dir)
    encoder = perturbed_kb_encoder(kb_dir, seed=1)
    report = _refresh(coordinator, encoder, step=5)
    assert report.error is None and report.version == 1
    manifest = read_manifest(kb_dir)
    values, offsets = PassageTable(kb_dir / manifest.passages_file).token_ids("encoder_ids")
    np.testing.assert_allclose(
        load_embeddings(kb_dir, manifest), encode_token_ids(encoder, values, offsets, 5), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("running_service", [(60, 3, 2, RefreshSpec(batch_size=8, keep_versions=10))], indirect=True)
def test_switch_is_atomic_for_queries_in_flight(running_service):
    """Queries run without pause from two clients while the service switches version four times: every
    result comes from one version, its embeddings are that version's, and versions never go back."""
    _, spec, coordinator = running_service
    kb_dir = Path(spec.kb_dir)
    queries = load_embeddings(kb_dir, read_manifest(kb_dir))[::7][:6]
    seen: list[list] = [[], []]
    errors: list[BaseException] = []
    stop = threading.Event()

    def query_loop(replica_offset: int):
        client = RetrievalClient(spec, replica_offset=replica_offset)
        try:
            while not stop.is_set():
                seen[replica_offset].append(client.search(queries, k=5))
        except BaseException as e:
            errors.append(e)

    def wait_for_answers_from(version: int) -> None:
        """Until each client's latest answer comes from this version (however slow a search on a loaded machine)."""
        deadline = time.monotonic() + 120
        while not all(results and results[-1].version == version for results in seen):
            assert not errors and time.monotonic() < deadline, (version, errors)
            time.sleep(0.05)

    threads = [threading.Thread(target=query_loop, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    stored = {0: load_embeddings(kb_dir, read_manifest(kb_dir))}
    try:
        for version in (1, 2, 3, 4):
            wait_for_answers_from(version - 1)
            assert _refresh(coordinator, perturbed_kb_encoder(kb_dir, seed=version), step=version).error is None
            stored[version] = load_embeddings(kb_dir, read_manifest(kb_dir), version)
        wait_for_answers_from(4)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert not errors, errors
    for results in seen:
        versions = [r.version for r in results]
        assert versions == sorted(versions), "a client went back to an older version"
        assert set(versions) == {0, 1, 2, 3, 4}, f"the queries span every version (saw {sorted(set(versions))})"
        for r in results:
            np.testing.assert_array_equal(r.embeddings, stored[r.version][r.ids])
            exact = queries @ stored[r.version].T
            np.testing.assert_allclose(r.scores, np.take_along_axis(exact, r.ids, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("running_service", [(4000, 4, 1, RefreshSpec(batch_size=1, keep_versions=2))], indirect=True)
def test_encoder_actor_killed_mid_refresh_leaves_the_active_version_serving(running_service):
    _, spec, coordinator = running_service
    kb_dir = Path(spec.kb_dir)
    manifest_before = (kb_dir / MANIFEST).read_bytes()
    v0 = load_embeddings(kb_dir, read_manifest(kb_dir))
    encoder = perturbed_kb_encoder(kb_dir, seed=1)
    pending = coordinator.refresh.remote([ray.put(encoder.snapshot(5))], 5)

    first_shard = kb_dir / ".v1.staging" / "shard_000.embeddings.npy"
    deadline = time.monotonic() + 60
    while not first_shard.is_file() and time.monotonic() < deadline:  # one shard of four is written
        time.sleep(0.01)
    assert first_shard.is_file()
    ray.kill(ray.get_actor(encoder_name(spec, 0), namespace=spec.namespace), no_restart=False)

    report = ray.get(pending)
    assert report.error is not None and "Actor" in report.error
    assert (kb_dir / MANIFEST).read_bytes() == manifest_before
    assert not (kb_dir / "v1").exists()
    result = RetrievalClient(spec).search(v0[:2], k=3)
    assert result.version == 0
    np.testing.assert_array_equal(result.embeddings, v0[result.ids])

    # the next attempt succeeds on the restarted actor
    report = _refresh(coordinator, encoder, step=6)
    assert report.error is None and report.version == 1
    assert read_manifest(kb_dir).active_version == 1


def _tiny_module(kb_dir: str, spec, **retriever) -> RagModule:
    torch.manual_seed(0)
    model = ModelConfig(
        kind="rag_sequence",
        n_docs=2,
        question_encoder=tiny_encoder_config(),
        generator=tiny_generator_config(dropout=0.0),
        max_context_tokens=64,
        max_answer_tokens=8,
        num_beams=1,
    )
    return RagModule(
        model=asdict(model),
        retriever=asdict(RetrieverConfig(train_context_encoder=True, **retriever)),
        optim=asdict(OptimConfig(lr=1e-3, warmup_steps=0)),
        service=asdict(spec),
    )


def _datamodule(data_dir: Path, module: RagModule) -> QADataModule:
    return QADataModule(
        DataConfig(dir=str(data_dir), batch_size=4, eval_batch_size=4),
        module.model_cfg,
        module.question_tokenizer,
        module.generator_tokenizer,
        module.answer_format,
    )


@pytest.mark.slow
@pytest.mark.parametrize("running_service", [(4000, 2, 1, RefreshSpec(batch_size=1, keep_versions=2))], indirect=True)
def test_refresh_due_while_one_is_in_flight_is_skipped_not_queued(running_service, tmp_path):
    data_dir, spec, _ = running_service
    module = _tiny_module(spec.kb_dir, spec)
    refresh = IndexRefresh(spec, every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=[refresh])
    trainer.fit(module, datamodule=_datamodule(data_dir, module))

    # due at steps 2, 4 and 6: the first one runs (encoding 4,000 passages one by one outlasts the steps),
    # the other two are skipped; training waited only for the one in flight, at the end
    assert (refresh.completed, refresh.skipped, refresh.failed) == (1, 2, 0)
    assert [r.global_step for r in refresh.reports] == [2]
    manifest = read_manifest(spec.kb_dir)
    assert manifest.active_version == 1 and manifest.kept_versions() == [0, 1]
    assert read_version_step(spec.kb_dir, manifest, 1) == 2


@pytest.mark.parametrize("running_service", [(40, 2, 1, RefreshSpec(batch_size=8, keep_versions=2))], indirect=True)
def test_checkpoint_records_its_index_version_and_resuming_activates_it(running_service, tmp_path, caplog):
    data_dir, spec, _ = running_service
    module = _tiny_module(spec.kb_dir, spec)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1, filename="{step}"
    )
    refresh = IndexRefresh(spec, every_n_steps=2, blocking=True)
    saver = SaveContextEncoder(tmp_path / "checkpoints" / "context_encoder")
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        callbacks=[refresh, IndexVersionCheckpointing(spec, refresh), saver, checkpoints],
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=_datamodule(data_dir, module))
    # refreshes after steps 2 and 4 made versions 1 and 2; steps 3-4 searched version 1
    assert read_manifest(spec.kb_dir).active_version == 2
    step4 = torch.load(tmp_path / "checkpoints" / "step=4.ckpt", weights_only=False)
    assert step4["index_version"] == 1
    assert torch.load(tmp_path / "checkpoints" / "step=2.ckpt", weights_only=False)["index_version"] == 0

    # the trained context encoder is saved beside the checkpoints as a folder that builds it again
    saved_cfg = EncoderConfig(pretrained=str(tmp_path / "checkpoints" / "context_encoder"))
    saved = build_encoder(saved_cfg, load_encoder_tokenizer(saved_cfg))
    assert (saved.pooling, saved.normalize) == (module.context_encoder.pooling, module.context_encoder.normalize)
    trained = module.context_encoder.model.state_dict()
    assert saved.model.state_dict().keys() == trained.keys()
    for name, tensor in saved.model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])

    # resuming from step 4 serves version 1 again, and the next step searches it
    resumed = _tiny_module(spec.kb_dir, spec)
    versions = IndexVersionCheckpointing(spec)
    trainer = quiet_trainer(tmp_path, max_steps=5, callbacks=[versions])
    trainer.fit(resumed, datamodule=_datamodule(data_dir, resumed), ckpt_path=tmp_path / "checkpoints" / "step=4.ckpt")
    assert trainer.global_step == 5
    assert read_manifest(spec.kb_dir).active_version == 1 and versions.version == 1

    # a checkpoint whose version was pruned (keep 2: versions 1 and 2) goes on with the active one, saying so
    with caplog.at_level(logging.WARNING):
        trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[IndexVersionCheckpointing(spec)])
        trainer.fit(
            _tiny_module(spec.kb_dir, spec),
            datamodule=_datamodule(data_dir, resumed),
            ckpt_path=tmp_path / "checkpoints" / "step=2.ckpt",
        )
    assert "index version 0 is no longer on disk" in caplog.text
    assert read_manifest(spec.kb_dir).active_version == 1

    # ... unless the job refreshes: then that version is made again from the checkpoint's context encoder
    refresh = IndexRefresh(spec, every_n_steps=100)
    versions = IndexVersionCheckpointing(spec, refresh)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[refresh, versions])
    module = _tiny_module(spec.kb_dir, spec)
    trainer.fit(module, datamodule=_datamodule(data_dir, module), ckpt_path=tmp_path / "checkpoints" / "step=2.ckpt")
    manifest = read_manifest(spec.kb_dir)
    assert manifest.active_version == 3 and read_version_step(spec.kb_dir, manifest, 3) == 2
    assert [r.global_step for r in refresh.reports] == [2] and versions.version == 3
