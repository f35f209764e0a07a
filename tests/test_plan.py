"""The capacity planner (`python -m rag_lightning.plan`): its arithmetic against figures computed by hand, the
actors' layout over the nodes, each warning, refused values, and the command end to end (its Hydra main)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from rag_lightning.capacity import measured
from rag_lightning.capacity.plan_model import GIB, MIB, make_plan
from rag_lightning.config import PlanConfig, checked
from rag_lightning.errors import UserError
from rag_lightning.plan import main
from rag_lightning.preflight import preflight

# A random context encoder of dim 64 (no folder read), every plan-only figure given, so that no measured figure
# but the search and build times enters the plans below
TINY = [
    "kb.context_encoder.pretrained=null",
    "kb.context_encoder.hidden_size=64",
    "kb.context_encoder.num_layers=1",
    "plan.generator_tokens=10",
    "plan.encoder_tokens=20",
    "plan.text_bytes=100",
    "plan.actor_base_mib=100",
    "plan.torch_process_gib=2",
    "plan.encode_rate=50",
]


def plan_config(tmp_path: Path, *overrides: str) -> PlanConfig:
    node = OmegaConf.structured(PlanConfig)
    node.paths.run_dir = str(tmp_path)
    node.merge_with_dotlist([*TINY, *overrides])
    return preflight(checked(node))


def plan_of(tmp_path: Path, *overrides: str):
    return make_plan(plan_config(tmp_path, *overrides))


def test_a_flat_plan_by_hand(tmp_path):
    plan = plan_of(
        tmp_path,
        "plan.passages=1000",
        "index.factory=Flat",
        "index.shards=2",
        "index.replicas=1",
        "trainer.num_nodes=1",
        "trainer.devices=2",
        "data.batch_size=4",
        "plan.steps_per_s=3",
        "trainer.accumulate_grad_batches=2",
        "retriever.train_context_encoder=true",
        "index_refresh.every_n_steps=1000",
        "index_refresh.workers=1",
        "index_refresh.keep_versions=2",
    )
    shard = 500
    index = shard * 64 * 4  # Flat: the vectors as float32
    tokens = shard * (10 + 1) * 4  # int32 ids and one int32 offset a passage
    base = 100 * MIB
    assert plan.actor["index_gib"] * GIB == pytest.approx(index)
    assert plan.actor["token_ids_gib"] * GIB == pytest.approx(tokens)
    assert plan.actor["resident_gib"] * GIB == pytest.approx(base + index + tokens)
    assert plan.actor["peak_gib"] * GIB == pytest.approx(base + 2 * index + tokens)  # refreshing: two versions
    node = plan.nodes[0]
    assert node["actors"] == ["s0r0", "s1r0"]
    assert node["resident_gib"] == pytest.approx(2 * (base + 2 * index + tokens) / GIB + (2 + 1) * 2)
    version = 2 * index + 2 * 128 + 1000 * 64 * 4  # two index files, two .npy headers, the embeddings
    table = 1000 * (24 + 100 + 4 * (10 + 20))
    assert plan.disk["version_gib"] * GIB == pytest.approx(version)
    assert plan.disk["passage_table_gib"] * GIB == pytest.approx(table)
    assert plan.disk["total_gib"] * GIB == pytest.approx(table + 2 * version)
    assert plan.disk["peak_gib"] * GIB == pytest.approx(table + 3 * version)
    assert plan.refresh["build_s_per_shard"] == 0  # Flat: nothing to train
    assert plan.refresh["wall_s"] == pytest.approx(2 * shard / 50)  # one worker takes both shards in turn
    assert plan.refresh["interval_s"] == pytest.approx(1000 / 3)
    assert plan.search["demand_qps"] == pytest.approx(1 * 2 * 3 * 4 * 2)
    assert plan.warnings == []


def test_a_bm25_index_adds_its_files_vocabulary_and_scores_by_hand(tmp_path):
    """index.sparse=bm25: each actor holds its shard's BM25 file, the vocabulary as a dict and a search's scores;
    the disk holds the shard files and the vocabulary once, outside the versions a refresh writes."""
    settings = ["plan.passages=1000", "index.shards=2", "data.batch_size=4", "kb.words_per_passage=50"]
    dense, sparse = (
        plan_of(tmp_path, *settings),
        plan_of(tmp_path, *settings, "index.sparse=bm25", "plan.bm25_terms=5000"),
    )
    shard_file = 500 * measured.BM25_BYTES_PER_PASSAGE / 2 + 5000 * measured.BM25_OFFSET_BYTES_PER_TERM
    in_actor = shard_file + 5000 * measured.BM25_VOCABULARY_DICT_BYTES_PER_TERM + 4 * 500 * 4
    assert dense.actor["bm25_gib"] == 0
    assert sparse.actor["bm25_gib"] * GIB == pytest.approx(in_actor)
    assert (sparse.actor["resident_gib"] - dense.actor["resident_gib"]) * GIB == pytest.approx(in_actor)
    on_disk = 2 * shard_file + 5000 * measured.BM25_VOCABULARY_FILE_BYTES_PER_TERM
    assert sparse.disk["bm25_gib"] * GIB == pytest.approx(on_disk)
    assert sparse.disk["version_gib"] == dense.disk["version_gib"]
    assert (sparse.disk["total_gib"] - dense.disk["total_gib"]) * GIB == pytest.approx(on_disk)
    assert any("plan.bm25_terms" in a for a in plan_of(tmp_path, *settings, "index.sparse=bm25").assumptions)


def test_an_ivfpq_plan_by_hand(tmp_path):
    plan = plan_of(
        tmp_path,
        "plan.passages=40000",
        "index.factory='IVF16,PQ8x8'",
        "index.shards=4",
        "index.replicas=2",
        "trainer.num_nodes=2",
        "trainer.devices=1",
    )
    shard = 10_000
    fixed = 16 * 64 * 4 + 256 * 64 * 4  # coarse centroids; 8 codebooks of 256 x 8 floats
    index = fixed + shard * (8 + 8)  # a PQ code of 8 bytes and an 8-byte id a vector
    assert plan.index["fixed_bytes"] == fixed
    assert plan.actor["index_gib"] * GIB == pytest.approx(index)
    assert plan.actor["peak_gib"] == plan.actor["resident_gib"]  # no refresh: one version at a time
    assert plan.actor["resident_gib"] * GIB == pytest.approx(100 * MIB + index + shard * 11 * 4)
    assert plan.disk["version_gib"] * GIB == pytest.approx(4 * fixed + 40_000 * 16 + 4 * 128 + 40_000 * 64 * 4)
    assert plan.disk["versions_kept"] == 1
    assert plan.refresh["build_s_per_shard"] > 0  # k-means of the lists and the codebooks
    assert [len(row["actors"]) for row in plan.nodes] == [4, 4]


def test_replicas_of_a_shard_land_on_different_nodes(tmp_path):
    plan = plan_of(tmp_path, "plan.passages=1000", "index.shards=8", "index.replicas=2", "trainer.num_nodes=4")
    node_of = {actor: row["node"] for row in plan.nodes for actor in row["actors"]}
    assert len(node_of) == 16
    for shard in range(8):
        assert node_of[f"s{shard}r0"] != node_of[f"s{shard}r1"]
    assert [len(row["actors"]) for row in plan.nodes] == [4, 4, 4, 4]
    uneven = plan_of(tmp_path, "plan.passages=1000", "index.shards=3", "index.replicas=2", "trainer.num_nodes=4")
    assert sorted(len(row["actors"]) for row in uneven.nodes) == [1, 1, 2, 2]


def test_search_capacity_grows_with_replicas(tmp_path):
    one, two = (plan_of(tmp_path, "plan.passages=1e6", f"index.replicas={r}", "trainer.num_nodes=2") for r in (1, 2))
    assert one.search["ms_per_query"] > 0
    assert two.search["capacity_qps"] == pytest.approx(2 * one.search["capacity_qps"])
    assert one.search["replica_qps"] < 16 / (2e-3)  # never faster than Ray's call alone allows


def _warned(plan, fragment: str) -> bool:
    return any(fragment in w for w in plan.warnings)


FITS = ["plan.passages=100000", "index.factory=Flat", "index.shards=2", "index.replicas=2", "trainer.num_nodes=2"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["plan.node_memory_gib=1"], "plan.node_memory_gib"),
        (
            ["retriever.train_context_encoder=true", "index_refresh.every_n_steps=10", "plan.steps_per_s=10"],
            "between refreshes",
        ),
        (["plan.steps_per_s=1000"], "queries/s of every shard"),
        (["index.factory='IVF65536,PQ8'"], "cannot train"),
        (["index.factory='IVF2048,PQ8'"], "39 a centroid"),
        (["index.replicas=3"], "share a node"),
        (
            [
                "trainer.accelerator=gpu",
                "retriever.train_context_encoder=true",
                "index_refresh.every_n_steps=5000",
                "index_refresh.worker_gpus=1",
            ],
            "plan.gpus_per_node",
        ),
    ],
)
def test_each_warning_fires_and_only_then(tmp_path, overrides, fragment):
    fitting = plan_of(tmp_path, *FITS)
    assert fitting.warnings == [], fitting.warnings
    assert _warned(plan_of(tmp_path, *FITS, *overrides), fragment)


def test_embeddings_beyond_the_page_cache_are_warned_apart_from_resident_memory(tmp_path):
    node = plan_of(tmp_path, *FITS).nodes[0]
    assert node["page_cache_gib"] * GIB == pytest.approx(2 * 50_000 * 64 * 4)  # two actors' embeddings
    tight = plan_of(tmp_path, *FITS, f"plan.node_memory_gib={node['resident_gib'] + node['page_cache_gib'] / 2}")
    assert _warned(tight, "do not fit in the page cache") and not _warned(tight, "GiB resident (shard actors")


def test_a_refresh_that_keeps_up_is_not_warned(tmp_path):
    plan = plan_of(
        tmp_path,
        *FITS,
        "retriever.train_context_encoder=true",
        "index_refresh.every_n_steps=5000",
        "plan.steps_per_s=1",
    )
    assert plan.refresh["wall_s"] == pytest.approx(math.ceil(2 / 1) * 50_000 / 50)
    assert plan.refresh["wall_s"] < plan.refresh["interval_s"] and plan.warnings == []


@pytest.mark.parametrize(
    "overrides, key",
    [
        ([], "plan.passages"),
        (["plan.passages=1e6", "plan.node_memory_gib=0"], "plan.node_memory_gib"),
        (["plan.passages=1e6", "index.factory=NoSuchIndex"], "index.factory"),
        (["plan.passages=1e6", "service.search_params=nprobe"], "service.search_params"),
        (["plan.passages=1e6", "trainer.devices=auto"], "trainer.devices"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(tmp_path, overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        make_plan(plan_config(tmp_path, *overrides))


def run_command(monkeypatch, *args: str) -> None:
    """`python -m rag_lightning.plan ARGS`, through its Hydra main, in this process."""
    monkeypatch.setattr(sys, "argv", ["rag_lightning.plan", *args])
    GlobalHydra.instance().clear()
    main()


def test_the_command_prints_the_plan_and_writes_its_json(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_command(
        monkeypatch,
        *TINY,
        "plan.passages=21e6",
        "index=ivfpq",
        "index.factory='IVF4096,PQ16'",
        "index.shards=8",
        "index.replicas=2",
        "trainer.num_nodes=4",
        "trainer.devices=8",
        f"hydra.run.dir={run_dir}",
    )
    printed = capsys.readouterr().out
    assert "Shard actor (2,625,000 passages)" in printed and "Assumptions" in printed
    results = json.loads((run_dir / "results.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["inputs"]["passages"] == 21_000_000 and len(plan["nodes"]) == 4
    assert results["search_demand_qps"] == pytest.approx(4 * 8 * 1.0 * 16)
    assert results["actor_peak_gib"] == pytest.approx(plan["actor"]["peak_gib"])

    with pytest.raises(SystemExit) as exit_code:
        run_command(monkeypatch, "plan.passages=-5", f"hydra.run.dir={run_dir}")
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: plan.passages must be >= 1 (got -5.0)"]
