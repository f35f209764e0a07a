"""What a training job sets up before its Trainer: the QA data, the knowledge base, Ray and the shard actors.

Only the first process of `stage=all` (and `stage=prepare`) prepares the data, builds or
checks the knowledge base and launches the actors (idempotently); every other process
(DDP ranks, `stage=train` under SLURM) reads what it made and attaches to the same cluster.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from tqdm import tqdm

from rag_lightning.config import KBConfig, TrainConfig, TrainerConfig
from rag_lightning.data.prepare import prepare_data
from rag_lightning.data.qa_files import QAExample, read_split
from rag_lightning.errors import UserError
from rag_lightning.evaluation.metrics import answer_patterns, holds_pattern
from rag_lightning.kb.build import build_knowledge_base
from rag_lightning.model.folder_settings import own_generator_tokenizer
from retrieval_workers import (
    Manifest,
    PassageTable,
    RefreshSpec,
    ServiceSpec,
    check_sparse_files,
    connect,
    launch_refresher,
    launch_service,
    read_manifest,
    writer_lock,
)


def is_first_process() -> bool:
    """Whether this is the job's first process, as its launcher says: torchrun's RANK, srun's SLURM_PROCID, or
    Lightning's (NODE_RANK for the node, whose first process then starts the others with LOCAL_RANK set); a plain
    `python` process is the first."""
    for variable in ("RANK", "SLURM_PROCID"):
        if variable in os.environ:
            return int(os.environ[variable]) == 0
    return all(int(os.environ.get(variable, 0)) == 0 for variable in ("NODE_RANK", "LOCAL_RANK"))


# The Trainer arguments Lightning checks when a Trainer is made, in the order they are tried: the first group it
# refuses names the setting at fault
LIGHTNING_CHECKED = (("accelerator", "devices", "num_nodes"), ("strategy",), ("precision",))


def check_trainer_arguments(trainer: TrainerConfig) -> None:
    """Refuse what Lightning's Trainer would refuse (an accelerator this machine has not, an unknown strategy or
    precision), naming the setting, by making a Trainer of these arguments now: before the knowledge base is
    built and Ray started, not after."""
    arguments = trainer.lightning_arguments()
    lightning_log = logging.getLogger("lightning.pytorch")  # its "GPU available: ..." lines come at fit
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        tried: dict[str, Any] = {}
        for names in LIGHTNING_CHECKED:
            tried.update({name: arguments[name] for name in names})
            try:
                L.Trainer(
                    **tried,
                    logger=False,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                )
            except (MisconfigurationException, ValueError) as e:
                raise UserError(f"trainer.{names[0]}={arguments[names[0]]}: {e}") from None
    finally:
        lightning_log.setLevel(level)


def kb_writer_lock(cfg: TrainConfig) -> AbstractContextManager:
    """The knowledge base's writer lock (retrieval_workers/kb_lock.py), for the job's first process to hold for the
    whole job: it builds the knowledge base, and the refresher it launches re-encodes it. A second job on the same
    kb.dir is refused at once instead of rebuilding the folder under this one. Other processes take none."""
    return writer_lock(cfg.kb.dir, "kb.dir") if cfg.stage != "train" and is_first_process() else nullcontext()


def service_spec(cfg: TrainConfig) -> ServiceSpec:
    """The job's shard actors: enough for any of its processes to attach to them."""
    return ServiceSpec(
        kb_dir=str(Path(cfg.kb.dir).resolve()),
        num_shards=cfg.index.shards,
        num_replicas=cfg.index.replicas,
        namespace=cfg.service.namespace,
        omp_threads=cfg.service.omp_threads,
        actor_cpus=cfg.service.actor_cpus,
        search_params=cfg.service.search_params,
        failover_timeout_s=cfg.service.failover_timeout_s,
    )


def kb_config(cfg: TrainConfig) -> KBConfig:
    """cfg.kb, with the tokenizer a pretrained generator brings as the generator tokenizer unless one is set."""
    own_tokenizer = own_generator_tokenizer(cfg.model)
    if own_tokenizer is None or cfg.kb.generator_tokenizer.path is not None:
        return cfg.kb
    return replace(cfg.kb, generator_tokenizer=replace(cfg.kb.generator_tokenizer, path=str(own_tokenizer)))


def prepare(cfg: TrainConfig, spec: ServiceSpec) -> Manifest:
    """Data and knowledge base checked or built, the job's Ray cluster attached or started, the actors running."""
    first = cfg.stage != "train" and is_first_process()
    if first:
        prepare_data(cfg.data)
    # every QA file checked before the expensive work
    splits = {split: read_split(cfg.data.dir, split) for split in ("train", "val", "test")}
    manifest = build_knowledge_base(kb_config(cfg), cfg.index) if first else read_manifest(cfg.kb.dir)
    check_sparse_files(cfg.kb.dir, manifest)
    if first and cfg.retriever.objective == "distant":
        check_distant_supervision(cfg, manifest, splits["train"])
    n_docs = cfg.model.n_docs
    assert n_docs is not None  # filled in by preflight
    if n_docs > manifest.num_passages:
        raise UserError(
            f"model.n_docs={cfg.model.n_docs} is larger than the knowledge base "
            f"({manifest.num_passages} passages in {cfg.kb.dir})"
        )
    connect(
        cfg.service.ray_address,
        namespace=spec.namespace,
        host=cfg.service.host,
        dashboard=cfg.service.dashboard,
        num_cpus=cfg.service.num_cpus,
        temp_dir=cfg.service.temp_dir,
    )
    if first:
        launch_service(spec)
        refresh = cfg.index_refresh
        if refresh.every_n_steps is not None:
            launch_refresher(
                spec,
                RefreshSpec(
                    num_workers=refresh.workers,
                    worker_cpus=refresh.worker_cpus,
                    worker_gpus=refresh.worker_gpus,
                    batch_size=refresh.batch_size,
                    keep_versions=refresh.keep_versions,
                ),
            )
    return manifest


DISTANT_CHECK_QUESTIONS = 500  # training questions whose answers are looked for in the passages
PASSAGES_PER_READ = 10_000


def check_distant_supervision(cfg: TrainConfig, manifest: Manifest, examples: list[QAExample]) -> None:
    """retriever.objective=distant needs positives: gold titles in the training examples (unless retriever.positives=
    answer), or answers that passages hold (looked for among the answers of the first training questions; the
    passages are read until one is found)."""
    titles_count = cfg.retriever.positives == "answer_or_title"
    if titles_count and any(e.gold_titles for e in examples):
        return
    checked = examples[:DISTANT_CHECK_QUESTIONS]
    patterns = answer_patterns([a for e in checked for a in e.answers])
    passages = PassageTable(Path(cfg.kb.dir) / manifest.passages_file)
    for start in tqdm(
        range(0, len(passages), PASSAGES_PER_READ),
        desc="looking for answers in the passages",
        unit="chunk",
        mininterval=2.0,
    ):
        texts = passages.titles_and_texts(range(start, min(start + PASSAGES_PER_READ, len(passages))))
        if any(holds_pattern(text, patterns) for _, text in texts):
            return
    titles = ", and no question names gold titles" if titles_count else " (retriever.positives=answer)"
    raise UserError(
        f"retriever.objective=distant: no passage of {cfg.kb.dir} holds an answer of the first "
        f"{len(checked)} training questions of {cfg.data.dir}{titles}; distant supervision would find "
        "no positive"
    )
