"""Structured configs: the schema behind conf/, so a mistyped key or a wrong type is refused at once.

`register_configs()` puts the schemas in Hydra's ConfigStore; conf/train.yaml and
conf/build_kb.yaml start their defaults lists with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class EncoderConfig:
    pretrained: str | None = "minilm"   # "minilm" (bundled), a model folder, or null for a random model
    tokenizer: str | None = None        # a tokenizer folder; null: the pretrained model's (MiniLM's if random)
    pooling: str = "mean"                  # mean | cls
    normalize: bool = True                 # L2-normalise the vectors: the bundled MiniLM was trained for cosine
    num_layers: int = 0                    # keep only the first N layers of a pretrained model (0 = all)
    hidden_size: int = 128                 # sizes of a random model (pretrained: null)
    num_heads: int = 4
    max_length: int = 128


@dataclass
class GeneratorConfig:
    """A BART generator built from these sizes (trained from scratch)."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.1
    max_positions: int = 512


@dataclass
class ModelConfig:
    kind: str = "rag_sequence"              # rag_sequence | rag_token
    n_docs: int = 5
    question_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    label_smoothing: float = 0.0
    max_question_tokens: int = 32
    max_answer_tokens: int = 24
    max_context_tokens: int = 256           # passage + question, per retrieved document
    num_beams: int = 2                      # beam search at validation and test


@dataclass
class RetrieverConfig:
    """Which encoders learn. The context encoder is the knowledge base's (kb.context_encoder)."""

    train_question_encoder: bool = True
    train_ctx_encoder: bool = False         # re-embed retrieved passages in the step, so gradients reach it
    freeze_embeddings: bool = True          # keep the encoders' token embedding tables fixed (most optimizer work)


@dataclass
class RefreshConfig:
    """Re-encoding the knowledge base with the current context encoder while training goes on."""

    every_n_steps: int | None = None     # global optimizer steps between refreshes; null = never
    workers: int = 1                        # encoder actors
    worker_cpus: float = 1.0                # CPUs (and torch threads) per encoder actor
    worker_gpus: float = 0.0                # GPUs per encoder actor
    batch_size: int = 64
    keep_versions: int = 2                  # index versions kept on disk
    blocking: bool = False                  # stop training until each refresh is done (for comparison)


@dataclass
class OptimConfig:
    lr: float = 5e-4                        # generator
    question_encoder_lr: float = 2e-5
    ctx_encoder_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100                 # linear warm-up, then the schedule
    schedule: str = "linear"                # linear (decay to 0 at the last step) | constant


@dataclass
class GeneratorTokenizerConfig:
    path: str | None = None              # a saved Hugging Face tokenizer; else one is trained
    kind: str = "wordlevel"                 # trained tokenizer: wordlevel | bpe
    vocab_size: int = 30000
    extra_texts: list[str] = field(default_factory=list)   # more files (QA JSONL) to train it on


@dataclass
class KBConfig:
    source: str | None = None            # TSV/CSV (title, text columns), JSONL, or a transformers RAG
    #                                         `datasets` folder (title, text, embeddings), imported as it is
    source_index: str | None = None      # that folder's FAISS index file, checked against its embeddings
    dir: str = "kb"
    words_per_passage: int = 100
    max_passage_tokens: int = 192
    context_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator_tokenizer: GeneratorTokenizerConfig = field(default_factory=GeneratorTokenizerConfig)
    encode_batch_size: int = 64
    rebuild: bool = False                   # rebuild even when an identical build exists


@dataclass
class IndexConfig:
    factory: str = "Flat"                   # a faiss.index_factory string, inner product
    shards: int = 2
    replicas: int = 1
    search_params: str = ""                 # e.g. "efSearch=128" or "nprobe=16"
    omp_threads: int = 1


@dataclass
class RetrievalConfig:
    ray_address: str | None = None       # null starts a local Ray
    namespace: str = "rag_lightning"
    host: str = "127.0.0.1"
    dashboard: bool = False
    num_cpus: int | None = None
    actor_cpus: float = 0.0
    failover_timeout_s: float = 120.0       # a search waits this long for some replica of a dead shard actor
    temp_dir: str | None = None          # a local Ray's session files; null: /tmp/ray_<SLURM job id or pid>
    entropy_window: int = 100               # training steps over which the retrieved-id entropy is measured


@dataclass
class DataConfig:
    prepare: str | None = None           # demo | nq_open | null (files already in dir)
    source: str | None = None            # input of prepare (nq_open: the .jsonl.gz file)
    dir: str = MISSING                      # train/val/test .jsonl or .source/.target files
    demo_entities: int = 3600
    batch_size: int = 8
    eval_batch_size: int = 32
    max_eval_examples: int = 0              # 0 = all


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 1000
    max_epochs: int = -1
    val_check_interval: int | None = 250
    check_val_every_n_epoch: int | None = None
    log_every_n_steps: int = 25
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    num_sanity_val_steps: int = 0
    threads: int = 0                        # torch threads per process (0 = leave as is)
    checkpoint_every_n_steps: int | None = 500   # also checkpoint every N steps (resume point); null: at val only


@dataclass
class LoggerConfig:
    kind: str = "csv"                       # csv | wandb | none
    project: str = "rag-lightning"
    offline: bool = False                   # wandb: also when WANDB_MODE=offline or no API key


@dataclass
class PathsConfig:
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kb: KBConfig = field(default_factory=KBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    evaluate_before_training: bool = True
    ckpt_path: str | None = None         # resume from it; null: from the run dir's newest checkpoint, if any
    stage: str = "all"                      # all | prepare (data, KB, shard actors, then exit) | train (attach to them)


@dataclass
class BuildKBConfig:
    kb: KBConfig = field(default_factory=KBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0


@dataclass
class EvaluateConfig:
    """`python -m rag_lightning.evaluate ckpt_path=... [data=...]`."""

    ckpt_path: str = MISSING
    data: DataConfig | None = None       # null: the QA files the checkpoint trained on; or e.g. data=nq_open
    split: str = "test"
    batch_size: int = 32
    max_examples: int = 0                   # 0 = all
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class GenerateConfig:
    """`python -m rag_lightning.generate ckpt_path=... question="..."` (or questions=FILE)."""

    ckpt_path: str = MISSING
    question: str | None = None
    questions: str | None = None         # a file: one question a line, or JSONL rows with a "question"
    output: str | None = None            # also write the answers and passages as JSONL here
    batch_size: int = 16
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


@dataclass
class ExportConfig:
    """`python -m rag_lightning.export ckpt_path=... out=DIR`."""

    ckpt_path: str = MISSING
    out: str = MISSING                      # a new (or empty) folder


def register_configs() -> None:
    """Register the schemas, and the `${repo_root:}` resolver (the checkout holding conf/)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(Path(__file__).resolve().parents[1]))
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="build_kb_schema", node=BuildKBConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="export_schema", node=ExportConfig)
