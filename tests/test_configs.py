"""The config tree: the schema's defaults are the default run, a YAML option holds only what it changes, every
config composes, and `checked()` refuses bad keys and values naming the key, for every entry point."""

from __future__ import annotations

import logging
import shutil
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from rag_lightning.config import (
    MODEL_DEFAULTS,
    PlanConfig,
    TrainConfig,
    checked,
    register_configs,
)
from rag_lightning.errors import UserError
from rag_lightning.model.folder_settings import fill_model_settings, fill_score_scale
from rag_lightning.model.rag_folder import write_rag_folder
from rag_lightning.preflight import preflight

from helpers import write_encoder_folder, write_generator_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF = REPO_ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF.iterdir()
    if group.is_dir() and group.name not in ("experiment", "hydra")
    for option in group.glob("*.yaml")
)
# data=nq_open's source as these tests give it: any existing file (preflight checks that it is one; only preparing
# the data reads it)
NQ_SOURCE = str(CONF / "data" / "nq_open.yaml")
ENTRY_POINTS = ("train", "build_kb", "evaluate", "generate", "export", "plan")


def compose_raw(config_name: str, overrides: list[str], run_dir: Path):
    """Compose like `python -m rag_lightning.<entry>` does, with the run dir set; the DictConfig, unchecked."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(run_dir)
    cfg.hydra.runtime.cwd = str(REPO_ROOT)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.output_dir} and ${hydra:runtime.cwd}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def compose_config(config_name: str, overrides: list[str], run_dir: Path):
    return preflight(checked(compose_raw(config_name, overrides, run_dir)))


def schema_defaults(run_dir: Path) -> TrainConfig:
    """TrainConfig() with its interpolations resolved as in a run whose run dir is run_dir."""
    node = OmegaConf.structured(TrainConfig)
    node.paths.run_dir = str(run_dir)
    defaults = OmegaConf.to_object(node)
    fill_model_settings(
        defaults.model
    )  # n_docs, label_smoothing, max_context_tokens: null in the schema, set by checked()
    fill_score_scale(defaults.retriever, defaults.model, defaults.kb.context_encoder)  # score_scale, likewise
    return defaults


def test_the_default_run_is_the_schema_defaults(tmp_path):
    """`python -m rag_lightning.train` runs exactly what config.py's dataclass defaults say."""
    cfg = compose_config("train", [], tmp_path)
    assert cfg == schema_defaults(tmp_path)
    # what those defaults are: the embedded demo, written into the run dir, MiniLM encoders, 2 flat shards, CPU
    assert (cfg.data.prepare, cfg.data.dir) == ("demo", f"{tmp_path}/data")
    assert (cfg.kb.source, cfg.kb.dir) == (f"{tmp_path}/data/kb.jsonl", f"{tmp_path}/kb")
    assert cfg.kb.generator_tokenizer.extra_texts == [f"{tmp_path}/data/train.jsonl"]


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_a_group_option_holds_only_what_it_changes(tmp_path, group, option):
    """Every value an option sets differs from the schema's default, except the one that names the group's
    default option (e.g. model/rag_sequence.yaml: kind: rag_sequence); choosing it changes nothing."""
    values = dict(_leaves(OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))))
    defaults = OmegaConf.structured(TrainConfig)
    restated = {key for key, value in values.items() if OmegaConf.select(defaults, f"{group}.{key}") == value}
    default_option = OmegaConf.load(CONF / "train.yaml").defaults
    if {group: option} in [dict(entry) for entry in default_option if OmegaConf.is_dict(entry)]:
        assert len(restated) <= 1, restated
        assert compose_config("train", [f"{group}={option}"], tmp_path) == schema_defaults(tmp_path)
    else:
        assert not restated, f"{group}/{option}.yaml repeats the schema's defaults: {sorted(restated)}"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=rag_token"], {"model.kind": "rag_token"}),
        (["index=hnsw"], {"index.factory": "HNSW32"}),
        (["index=ivfpq"], {"index.factory": "IVF64,PQ16"}),
        (["logger=wandb"], {"logger.kind": "wandb"}),
        (["trainer=gpu"], {"trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed"}),
        (
            ["index_refresh=background", "retriever.train_context_encoder=true"],
            {"index_refresh.every_n_steps": 500, "retriever.train_context_encoder": True},
        ),
        (
            ["data=files", "data.dir=/tmp"],
            {
                "data.prepare": None,
                "data.dir": "/tmp",
                "kb.source": "/tmp/kb.jsonl",
                "kb.generator_tokenizer.extra_texts": ["/tmp/train.jsonl"],
            },
        ),
        (
            ["data=nq_open", f"data.source={NQ_SOURCE}"],
            {"data.prepare": "nq_open", "data.source": NQ_SOURCE},
        ),
    ],
)
def test_a_group_choice_changes_what_it_names_and_nothing_else(tmp_path, overrides, expected):
    cfg = OmegaConf.structured(compose_config("train", overrides, tmp_path))
    defaults = OmegaConf.structured(schema_defaults(tmp_path))
    changed = {key for key, value in _leaves(OmegaConf.to_container(cfg)) if OmegaConf.select(defaults, key) != value}
    assert changed == set(expected)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_what_it_sets(tmp_path, name):
    cfg = OmegaConf.structured(compose_config("train", [f"experiment={name}", f"data.source={NQ_SOURCE}"], tmp_path))
    experiment = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    experiment.pop("defaults", None)
    for key, value in _leaves(OmegaConf.to_container(experiment, resolve=False)):
        assert OmegaConf.select(cfg, key) == value, key


def test_build_kb_defaults(tmp_path):
    cfg = compose_config("build_kb", ["kb.source=/data/p.tsv", "index=hnsw", "index.shards=4"], tmp_path)
    assert (cfg.kb.source, cfg.kb.dir, cfg.index.factory, cfg.index.shards) == ("/data/p.tsv", "kb", "HNSW32", 4)
    assert cfg.kb.generator_tokenizer.extra_texts == []
    assert cfg.kb.context_encoder == schema_defaults(tmp_path).kb.context_encoder


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


# --- refused keys and values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.nonexistent=1", "nonexistent"),
        ("model.n_docs=abc", "n_docs"),
        ("index.shards=two", "shards"),
        ("trainer.max_steps=1.5", "max_steps"),
        ("nonexistent_group_key=3", "nonexistent_group_key"),
    ],
)
def test_hydra_refuses_unknown_keys_and_wrong_types(tmp_path, override, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("train", [override], tmp_path)
    assert key in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+trainer.max_step=5"], "trainer.max_step: not a setting of trainer; did you mean trainer.max_steps?"),
        (["+model.question_encoder.pool=cls"], "model.question_encoder.pool: not a setting"),
        (
            ["model.question_encoder.pooling=maen"],
            "model.question_encoder.pooling: 'maen' is not one of null, mean, cls",
        ),
        (["kb.context_encoder.pooling=first"], "kb.context_encoder.pooling: 'first' is not one of null, mean, cls"),
        (["model.kind=rag_paragraph"], "model.kind: 'rag_paragraph' is not one of rag_sequence, rag_token"),
        (["optim.schedule=cosine"], "optim.schedule: 'cosine' is not one of constant, linear"),
        (["logger.kind=tensorboard"], "logger.kind: 'tensorboard' is not one of csv, wandb, none"),
        (
            ["kb.generator_tokenizer.kind=unigram"],
            "kb.generator_tokenizer.kind: 'unigram' is not one of wordlevel, bpe",
        ),
        (["data.prepare=squad"], "data.prepare: 'squad' is not one of demo, nq_open, null"),
        (["stage=launch"], "stage: 'launch' is not one of all, prepare, train"),
        (["trainer.devices=0"], "trainer.devices: 0 is not a device count >= 1"),
        (["model.n_docs=0"], "model.n_docs must be >= 1 (got 0)"),
        (["data.batch_size=0"], "data.batch_size must be >= 1 (got 0)"),
        (["service.failover_timeout_s=0"], "service.failover_timeout_s must be >= 0.001 (got 0.0)"),
        (["checkpoint_every_n_steps=0"], "checkpoint_every_n_steps must be >= 1 (got 0)"),
        (
            ["index_refresh=background", "index_refresh.every_n_steps=0", "retriever.train_context_encoder=true"],
            "index_refresh.every_n_steps must be >= 1 (got 0)",
        ),
        (["index_refresh=background"], "index_refresh.every_n_steps is set but retriever.train_context_encoder=false"),
        (["stage=train"], "stage=train needs service.ray_address"),
        (["data=files"], "data.dir: no folder at"),
        (
            ["retriever.objective=contrastive"],
            "retriever.objective: 'contrastive' is not one of marginal, distant, pdist, emdr2",
        ),
        (["retriever.candidates=2", "model.n_docs=3"], "retriever.candidates=2 is smaller than model.n_docs=3"),
        (["retriever.objective=pdist"], "retriever.objective=pdist trains the retriever, but neither encoder trains"),
        (["retriever.eval_k=[0,5]"], "retriever.eval_k: [0, 5] is not a list of ranks >= 1"),
        (["optim.lr=nan"], "optim.lr: nan is not a finite number"),
        (["trainer.gradient_clip_val=inf"], "trainer.gradient_clip_val: inf is not a finite number"),
    ],
)
def test_checked_refuses_bad_values_naming_the_key(tmp_path, overrides, message):
    raw = compose_raw("train", overrides, tmp_path)
    with pytest.raises(UserError) as error:
        preflight(checked(raw))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "entry, overrides, message",
    [
        ("build_kb", ["kb.source=x.tsv", "kb.context_encoder.pooling=maen"], "kb.context_encoder.pooling: 'maen'"),
        (
            "build_kb",
            ["kb.source=x.tsv", "+index.shard=3"],
            "index.shard: not a setting of index; did you mean index.shards?",
        ),
        ("evaluate", ["ckpt_path=x.ckpt", "eval_batch_size=0"], "eval_batch_size must be >= 1 (got 0)"),
        ("evaluate", ["ckpt_path=x.ckpt", "data=files", "data.dir=qa", "data.prepare=squad"], "data.prepare: 'squad'"),
        ("evaluate", [], "ckpt_path: give a checkpoint (ckpt_path=...), or a knowledge base"),
        ("evaluate", ["ckpt_path=x.ckpt", "kb.dir=kb"], "kb.dir: x.ckpt brings its knowledge base"),
        ("evaluate", ["kb.dir=kb", "data=nq_open"], "mode: kb.dir=kb without a checkpoint has no reader"),
        ("evaluate", ["kb.dir=kb", "mode=retrieval"], "data: a knowledge base alone names no questions"),
        ("evaluate", ["ckpt_path=x.ckpt", "mode=answer"], "mode: 'answer' is not one of answers, retrieval"),
        ("evaluate", ["ckpt_path=x.ckpt", "eval_k=[]"], "eval_k: [] is not a list of ranks >= 1"),
        ("generate", ["ckpt_path=x.ckpt"], 'give either question="..." or questions=FILE'),
        ("generate", ["ckpt_path=x.ckpt", "question=hi", "service.num_cpus=0"], "service.num_cpus must be >= 1"),
        ("generate", ["question=hi"], "ckpt_path: required; give ckpt_path=..."),
        (
            "generate",
            ["ckpt_path=x.ckpt", "question=hi", "output=/nowhere/answers.jsonl"],
            "output: cannot write /nowhere/answers.jsonl (No such file or directory at /nowhere)",
        ),
        ("generate", ["ckpt_path=x.ckpt", "question=hi", "output=/"], "output: / is a folder"),
        ("export", ["ckpt_path=x.ckpt"], "out: required; give out=..."),
        ("export", ["ckpt_path=x.ckpt", "out=o", "+format=onnx"], "format: not a setting of the config"),
        ("plan", [], "plan.passages: give the knowledge base's passage count"),
        ("plan", ["plan.passages=1e6", "+plan.nodes=4"], "plan.nodes: not a setting of plan"),
        ("plan", ["plan.passages=1e6", "plan.steps_per_s=0"], "plan.steps_per_s must be >= 0.0001 (got 0.0)"),
        ("plan", ["plan.passages=nan"], "plan.passages: nan is not a finite number"),
        ("plan", ["plan.passages=inf"], "plan.passages: inf is not a finite number"),
    ],
)
def test_every_entry_point_checks_its_config(tmp_path, entry, overrides, message):
    with pytest.raises(UserError) as error:
        preflight(checked(compose_raw(entry, overrides, tmp_path)))
    assert message in str(error.value)


def test_the_plan_composes_a_training_run_and_its_own_keys(tmp_path):
    """`python -m rag_lightning.plan` takes a training run's config as it is (experiment, group options,
    overrides) and adds plan.*."""
    overrides = ["experiment=nq_open_e2e", f"data.source={NQ_SOURCE}", "index=ivfpq", "trainer.num_nodes=4"]
    plan = compose_config("plan", [*overrides, "plan.passages=21e6"], tmp_path)
    train = compose_config("train", overrides, tmp_path)
    assert isinstance(plan, PlanConfig) and plan.plan.passages == 21e6
    assert {f.name: getattr(plan, f.name) for f in fields(TrainConfig)} == vars(train)


def test_checked_accepts_every_valid_choice(tmp_path):
    cfg = compose_config(
        "train",
        ["model.question_encoder.pooling=cls", "trainer.devices=[0,1]", "data=files", f"data.dir={tmp_path}"],
        tmp_path,
    )
    assert cfg.model.question_encoder == replace(schema_defaults(tmp_path).model.question_encoder, pooling="cls")
    assert cfg.trainer.devices == [0, 1] and cfg.data.prepare is None


def test_a_generator_folder_is_checked_with_its_tokenizer_against_the_knowledge_base_one(tmp_path):
    """model.generator.pretrained: a folder that is neither a sequence-to-sequence model nor a causal LM is refused,
    and so is a kb.generator_tokenizer.path that is not the generator's own tokenizer; both before anything is
    built."""
    encoder = write_encoder_folder(tmp_path / "bert", "bert_style")
    raw = compose_raw("train", [f"model.generator.pretrained={encoder}"], tmp_path)
    with pytest.raises(
        UserError,
        match=f"^model.generator.pretrained: {encoder} is a bert model \\(BertModel\\), neither a sequence-to-sequence",
    ):
        preflight(checked(raw))
    generator = write_generator_folder(tmp_path / "t5", "t5", ["some words"])
    raw = compose_raw(
        "train", [f"model.generator.pretrained={generator}", f"kb.generator_tokenizer.path={encoder}"], tmp_path
    )
    with pytest.raises(
        UserError,
        match=f"^kb.generator_tokenizer.path: {encoder} \\([0-9a-f]{{12}}\\) is not the "
        f"tokenizer of the generator \\({generator}: ",
    ):
        preflight(checked(raw))
    same = compose_raw(
        "train", [f"model.generator.pretrained={generator}", f"kb.generator_tokenizer.path={generator}"], tmp_path
    )
    assert preflight(checked(same)).model.generator.pretrained == str(generator)


def test_a_rag_folder_gives_its_values_unless_the_config_sets_them(tmp_path):
    """model.init_from: n_docs, max_combined_length and label_smoothing come from the folder's RagConfig, a model.*
    override wins, and without a folder they are MODEL_DEFAULTS."""
    generator = write_generator_folder(tmp_path / "bart", "bart", ["some words"])
    rag = write_rag_folder(
        tmp_path / "rag",
        write_encoder_folder(tmp_path / "dpr", "dpr_question"),
        generator,
        n_docs=7,
        max_combined_length=100,
        label_smoothing=0.1,
    )

    def values(overrides: list[str]) -> dict:
        model = compose_config("train", overrides, tmp_path).model
        return {name: getattr(model, name) for name in MODEL_DEFAULTS}

    assert values([f"model.init_from={rag}"]) == {"n_docs": 7, "max_context_tokens": 100, "label_smoothing": 0.1}
    assert values([f"model.init_from={rag}", "model.n_docs=4", "model.label_smoothing=0"]) == {
        "n_docs": 4,
        "max_context_tokens": 100,
        "label_smoothing": 0.0,
    }
    assert values([]) == MODEL_DEFAULTS == {"n_docs": 3, "max_context_tokens": 256, "label_smoothing": 0.0}
    # its question encoder is DPR (raw inner products): retriever.score_scale 1 whatever kb.context_encoder is
    assert compose_config("train", [f"model.init_from={rag}"], tmp_path).retriever.score_scale == 1.0


@pytest.mark.parametrize(
    "question, context, overrides, scale, exports",
    [
        ("minilm", "minilm", [], 20.0, False),  # the default: MiniLM, normalised (cosines) and mean-pooled
        ("sentence_transformers", "sentence_transformers", [], 20.0, False),  # normalised, [CLS] pooling
        ("dpr_question", "dpr_context", [], 1.0, True),
        ("dpr_question", "dpr_context", ["retriever.score_scale=20"], 20.0, False),  # a value set wins
        ("bert_style", "bert_style", [], 1.0, False),  # not normalised, but mean-pooled
        ("bert_style", "bert_style", ["model.question_encoder.pooling=cls"], 1.0, True),
        ("sentence_transformers", "bert_style", [], 1.0, False),  # the passages' vectors are not normalised
    ],
)
def test_the_score_scale_follows_the_encoders_and_train_warns_when_export_would_refuse(
    tmp_path, caplog, question, context, overrides, scale, exports
):
    """retriever.score_scale null: 20 (sentence-transformers' scale of cosines) where question and passage vectors
    are both normalised, else 1; and train says in one warning line when export will refuse the run."""
    from rag_lightning.train import warn_unless_exportable

    folders = {
        side: kind if kind == "minilm" else write_encoder_folder(tmp_path / side, kind)
        for side, kind in (("question", question), ("context", context))
    }
    cfg = compose_config(
        "train",
        [
            f"model.question_encoder.pretrained={folders['question']}",
            f"kb.context_encoder.pretrained={folders['context']}",
            *overrides,
        ],
        tmp_path,
    )
    assert cfg.retriever.score_scale == scale
    with caplog.at_level(logging.WARNING, logger="rag_lightning.train"):
        warn_unless_exportable(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rag_lightning.train"]
    assert len(warnings) == (0 if exports else 1), warnings
    for warning in warnings:
        assert (
            warning.startswith(
                "rag_lightning.export will refuse this run's checkpoints: it trains with "
                "model.question_encoder.pooling="
            )
            and "\n" not in warning
        )


def test_a_rag_folder_that_is_none_or_conflicts_is_refused(tmp_path):
    """One line naming the key and the folder, at config time."""
    generator = write_generator_folder(tmp_path / "bart", "bart", ["some words"])
    question_encoder = write_encoder_folder(tmp_path / "dpr", "dpr_question")
    rag = write_rag_folder(tmp_path / "rag", question_encoder, generator)
    other_separators = write_rag_folder(tmp_path / "rag_sep", question_encoder, generator, title_sep=" | ")
    no_tokenizers = write_rag_folder(tmp_path / "rag_bare", question_encoder, generator)
    shutil.rmtree(no_tokenizers / "generator_tokenizer")
    for overrides, message in [
        ([f"model.init_from={generator}"], f"model.init_from: {generator} is a bart model, not a RAG model"),
        (
            [f"model.init_from={tmp_path / 'nowhere'}"],
            f"model.init_from: {tmp_path / 'nowhere'} is not a Hugging Face model folder",
        ),
        (
            [f"model.init_from={other_separators}"],
            f"model.init_from: {other_separators}/config.json joins title, text and question with title_sep=' | '",
        ),
        ([f"model.init_from={no_tokenizers}"], f"model.init_from: {no_tokenizers} has no generator_tokenizer/"),
        (
            [f"model.init_from={rag}", f"model.generator.pretrained={generator}"],
            f"model.generator.pretrained: model.init_from={rag} brings its generator",
        ),
        (
            [f"model.init_from={rag}", "model.question_encoder.pretrained=null"],
            f"model.question_encoder: model.init_from={rag} brings its question encoder",
        ),
        (
            [f"model.init_from={rag}", f"kb.generator_tokenizer.path={question_encoder}"],
            f"kb.generator_tokenizer.path: {question_encoder} (",
        ),
    ]:
        with pytest.raises(UserError) as refused:
            compose_config("train", overrides, tmp_path)
        assert str(refused.value).startswith(message), (overrides, str(refused.value))
    assert f"is not the tokenizer of the generator ({rag}/generator_tokenizer: " in str(refused.value)
