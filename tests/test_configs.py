"""Every config in conf/ composes against the structured schema and becomes a typed config object."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from rag_lightning.config import (
    BuildKBConfig,
    DataConfig,
    EncoderConfig,
    IndexConfig,
    KBConfig,
    LoggerConfig,
    ModelConfig,
    TrainConfig,
    register_configs,
)

CONF = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted((group.name, option.stem) for group in CONF.iterdir() if group.is_dir()
                       and group.name != "experiment" for option in group.glob("*.yaml"))


def compose_config(config_name: str, overrides: list[str], run_dir: Path):
    """Compose like `python -m rag_lightning.<entry>` does, with the run dir set, and convert to the schema."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    cfg.hydra.runtime.cwd = str(REPO_ROOT)
    HydraConfig.instance().set_config(cfg)        # resolves ${hydra:runtime.output_dir} and ${hydra:runtime.cwd}
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg)


def test_conf_has_the_expected_groups():
    assert {"model", "data", "kb", "index", "retrieval", "trainer", "logger", "experiment"} <= \
        {p.name for p in CONF.iterdir() if p.is_dir()}
    assert (CONF / "train.yaml").is_file() and (CONF / "build_kb.yaml").is_file()


def test_default_train_config(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.model.question_encoder, EncoderConfig)
    assert isinstance(cfg.kb, KBConfig) and isinstance(cfg.index, IndexConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.paths.run_dir == str(tmp_path)
    # the embedded demo: data and KB are written into the run dir, MiniLM encoders, 2 flat shards, CPU
    assert cfg.model.kind == "rag_sequence"
    model_yaml = OmegaConf.load(CONF / "model" / "rag_sequence.yaml")
    assert cfg.model.n_docs == model_yaml.n_docs and cfg.model.generator.dropout == model_yaml.generator.dropout
    assert cfg.data.prepare == "demo" and cfg.data.dir == f"{tmp_path}/data"
    assert cfg.kb.source == f"{tmp_path}/data/kb.jsonl" and cfg.kb.dir == f"{tmp_path}/kb"
    assert cfg.kb.generator_tokenizer.extra_texts == [f"{tmp_path}/data/train.jsonl"]
    assert cfg.kb.context_encoder.pretrained == "minilm" == cfg.model.question_encoder.pretrained
    assert cfg.index == IndexConfig(factory="Flat", shards=2, replicas=1, search_params="", omp_threads=1)
    trainer_yaml = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "cpu.yaml"))
    assert {key: getattr(cfg.trainer, key) for key in trainer_yaml} == trainer_yaml    # every value of the group file
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.logger == LoggerConfig(kind="csv")
    assert cfg.retrieval.ray_address is None and cfg.retrieval.host == "127.0.0.1" and cfg.retrieval.dashboard is False


def test_default_build_kb_config(tmp_path):
    cfg = compose_config("build_kb", [], tmp_path)
    assert isinstance(cfg, BuildKBConfig)
    assert cfg.kb.source is None and cfg.kb.dir == "kb"
    assert cfg.kb.generator_tokenizer.extra_texts == []
    assert cfg.kb.context_encoder.pretrained == "minilm"
    assert cfg.index.factory == "Flat" and cfg.index.shards == 2

    cfg = compose_config("build_kb", ["kb.source=/data/p.tsv", "kb.dir=/tmp/kb", "index=hnsw", "index.shards=4"],
                         tmp_path)
    assert (cfg.kb.source, cfg.kb.dir, cfg.index.factory, cfg.index.shards) == ("/data/p.tsv", "/tmp/kb", "HNSW32", 4)


@pytest.mark.parametrize("overrides, expected", [
    (["model=rag_token"], {("model", "kind"): "rag_token",
                           ("model", "n_docs"): OmegaConf.load(CONF / "model" / "rag_token.yaml").n_docs}),
    (["index=hnsw"], {("index", "factory"): "HNSW32", ("index", "shards"): 2}),
    (["index=ivfpq"], {("index", "factory"): "IVF64,PQ16"}),
    (["logger=wandb"], {("logger", "kind"): "wandb", ("logger", "project"): "rag-lightning"}),
    (["logger=none"], {("logger", "kind"): "none"}),
    (["trainer=gpu"], {("trainer", "accelerator"): "gpu", ("trainer", "precision"): "bf16-mixed",   # the rest from cpu
                       ("trainer", "max_steps"): OmegaConf.load(CONF / "trainer" / "cpu.yaml").max_steps}),
    (["data=files", "data.dir=/my/qa"], {("data", "prepare"): None, ("data", "dir"): "/my/qa",
                                         ("kb", "source"): "/my/qa/kb.jsonl"}),
    (["data=nq_open"], {("data", "prepare"): "nq_open",
                        ("data", "source"): f"{REPO_ROOT}/../shared/data/nq-open-oracle.jsonl.gz"}),
    (["model=rag_token", "index=ivfpq", "index.shards=4", "index.replicas=2", "model.n_docs=3",
      "trainer.devices=8", "kb.context_encoder.pretrained=null"],
     {("model", "kind"): "rag_token", ("model", "n_docs"): 3, ("index", "shards"): 4, ("index", "replicas"): 2,
      ("trainer", "devices"): 8, ("kb", "context_encoder", "pretrained"): None}),
])
def test_group_choices_compose(tmp_path, overrides, expected):
    cfg = compose_config("train", overrides, tmp_path)
    assert isinstance(cfg, TrainConfig)
    for path, value in expected.items():
        node = cfg
        for key in path:
            node = getattr(node, key)
        assert node == value, (path, node)


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(tmp_path, group, option):
    overrides = [f"{group}={option}"] + (["data.dir=/qa"] if (group, option) == ("data", "files") else [])
    cfg = compose_config("train", overrides, tmp_path)
    assert isinstance(cfg, TrainConfig)
    assert type(getattr(cfg, group)) is type(getattr(TrainConfig(), group))   # the group's schema dataclass


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(tmp_path, name):
    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.paths.run_dir == str(tmp_path)
    # every value the experiment sets is in the composed config (it is a global package, applied last)
    experiment = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    composed = OmegaConf.structured(cfg)
    chosen_groups = {}
    for entry in experiment.pop("defaults", []):
        for key, option in (entry.items() if isinstance(entry, dict) or OmegaConf.is_dict(entry) else []):
            chosen_groups[key.replace("override /", "").strip()] = option
    for key, value in _leaves(OmegaConf.to_container(experiment, resolve=False)):
        assert OmegaConf.select(composed, key) == value, key
    # a group the experiment picks supplies the values the experiment does not set itself
    for group, option in chosen_groups.items():
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))):
            full_key = f"{group}.{key}"
            if OmegaConf.select(experiment, full_key) is None and not str(value).startswith("${"):
                assert OmegaConf.select(composed, full_key) == value, full_key


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("override, key", [
    ("model.nonexistent=1", "nonexistent"),
    ("model.n_docs=abc", "n_docs"),
    ("index.shards=two", "shards"),
    ("trainer.max_steps=1.5", "max_steps"),
    ("nonexistent_group_key=3", "nonexistent_group_key"),
])
def test_unknown_keys_and_wrong_types_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", [override], tmp_path)
    assert key in str(error.value) + str(error.value.__cause__)


def test_data_files_without_data_dir_is_refused(tmp_path):
    """conf/data/files.yaml declares `dir: ???`: a mandatory value, never a silent default."""
    with pytest.raises(MissingMandatoryValue, match=r"data\.dir"):
        compose_config("train", ["data=files"], tmp_path)
