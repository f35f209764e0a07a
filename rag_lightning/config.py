"""Structured configs: the schema behind conf/, and the one place where every default is written.

Each dataclass default is the value `python -m rag_lightning.train` runs with (the embedded
demo); a YAML option in conf/ holds only what that option changes. Hydra refuses a
mistyped key or a wrong type while composing; `checked()` then refuses, naming the key, an
added key that is no setting (`+trainer.max_step=5`) and a value out of its declared choices
or range (each field declares them beside its default), and runs the cross-field checks of
the `check()` methods. Every entry point calls it before any work starts.
"""
from __future__ import annotations

import difflib
import math
import re
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rag_lightning.errors import UserError
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, tokenizer_fingerprint
from rag_lightning.model.encoder_folders import default_score_scale, resolve_encoder
from rag_lightning.model.generator import check_generator_folder, generator_folder
from rag_lightning.model.rag_folder import GENERATOR_TOKENIZER, read_rag_folder
from retrieval_workers.encoding import POOLER
from retrieval_workers.ray_runtime import RayUnreachable, check_reachable
from retrieval_workers.types import RefreshSpec, ServiceSpec

REPO_ROOT = Path(__file__).resolve().parents[1]     # the checkout holding conf/
CONF_DIR = str(REPO_ROOT / "conf")                  # every command's @hydra.main config_path (absolute, so that
#                                                    the rag-* console scripts find it too)


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (the default among them)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def at_least(default: Any, minimum: float) -> Any:
    """A field whose value, when set, must be >= minimum."""
    return field(default=default, metadata={"min": minimum})


@dataclass
class EncoderConfig:
    """A dense encoder of questions or passages. What a folder is, is read from the folder
    (rag_lightning/model/encoder_folders.py): a sentence-transformers folder (modules.json) brings its pooling,
    normalisation and max_seq_length, a DPR folder its pooler output (projection included), any other Hugging Face
    encoder folder is BERT-style (mean pooling unless set). null below means: as the folder says."""

    pretrained: str | None = "minilm"   # "minilm" (bundled), a model folder, or null for a random model
    tokenizer: str | None = None        # a tokenizer folder; null: the pretrained model's (MiniLM's if random)
    pooling: str | None = choice(None, "mean", "cls")   # overrides a sentence-transformers folder's; refused for DPR
    normalize: bool | None = None       # L2-normalise the vectors (a sentence-transformers Normalize module)
    max_length: int | None = at_least(None, 2)   # tokens per text; null: max_seq_length, else 128
    num_layers: int = at_least(0, 0)       # keep only the first N layers of a pretrained model (0 = all)
    hidden_size: int = at_least(128, 1)    # sizes of a random model (made like the bundled MiniLM: mean pooling,
    num_heads: int = at_least(4, 1)        # normalised)

    def check(self, key: str) -> None:
        resolve_encoder(self, key)          # the folder is read now: a folder that is no encoder is refused here


@dataclass
class GeneratorConfig:
    """The generator: a pretrained sequence-to-sequence model with its own tokenizer, or a BART built from these
    sizes and trained from scratch (with the knowledge base's generator tokenizer)."""

    pretrained: str | None = None           # a folder (BART, mBART, T5/mT5, an EncoderDecoderModel) or "minilm"
    #                                         (MiniLM on both sides); null: from scratch, of the sizes below
    prefix: str | None = None               # text before every context (T5's task prefix, as transformers' RAG
    #                                         reads it from the generator's config.prefix); null: the folder's
    d_model: int = at_least(128, 1)
    layers: int = at_least(2, 1)
    heads: int = at_least(4, 1)
    ffn_dim: int = at_least(512, 1)
    dropout: float = at_least(0.0, 0.0)
    max_positions: int = at_least(512, 8)
    train: bool = True                      # false: the generator stays as it is (no gradients, no optimizer state),
    #                                         for training the retriever against a fixed reader

    def check(self, key: str) -> None:
        if self.pretrained is not None:
            check_generator_folder(self.pretrained, f"{key}.pretrained")


# The ranks k at which retrieval is scored (recall@k, mrr@k, gold_recall@k), in validation, test and evaluate
RECALL_AT = (1, 5, 20, 100)

def check_ranks(ks: list[int], key: str) -> None:
    if not ks or min(ks) < 1:
        raise UserError(f"{key}: {ks} is not a list of ranks >= 1")


# What model.n_docs, model.label_smoothing and model.max_context_tokens are when neither the config nor
# model.init_from's RAG folder sets them
MODEL_DEFAULTS = {"n_docs": 3, "label_smoothing": 0.0, "max_context_tokens": 256}


@dataclass
class ModelConfig:
    kind: str = choice("rag_sequence", "rag_token")
    init_from: str | None = None            # a whole RAG folder (transformers' save_pretrained, as the hub's
    #                                         facebook/rag-*, or our export): its question encoder, generator,
    #                                         tokenizers, and the three values below where they are null
    n_docs: int | None = at_least(None, 1)  # passages retrieved per question; null: init_from's, else 3
    question_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    label_smoothing: float | None = at_least(None, 0.0)   # null: init_from's, else 0
    max_question_tokens: int = at_least(32, 2)
    max_answer_tokens: int = at_least(8, 4)  # with "</s> <s>" and "</s>": the demo's answers are one word
    max_context_tokens: int | None = at_least(None, 2)    # passage + question, per retrieved document; null:
    #                                                       init_from's max_combined_length, else 256
    num_beams: int = at_least(2, 1)         # beam search at validation and test
    gradient_checkpointing: bool = False    # recompute the generator's and encoders' activations in the backward
    #                                         pass: less memory for more compute

    def check(self, key: str) -> None:
        if self.init_from is not None:
            if self.generator.pretrained is not None:
                raise UserError(f"{key}.generator.pretrained: {key}.init_from={self.init_from} brings its "
                                f"generator; set one of the two")
            if self.question_encoder != EncoderConfig():
                raise UserError(f"{key}.question_encoder: {key}.init_from={self.init_from} brings its question "
                                f"encoder (DPR); leave {key}.question_encoder unset")
        self.fill_unset(key)

    def fill_unset(self, key: str = "model") -> ModelConfig:
        """Set n_docs, label_smoothing and max_context_tokens where null: from init_from's RAG folder, else
        MODEL_DEFAULTS. Returns self."""
        values = MODEL_DEFAULTS
        if self.init_from is not None:
            folder = read_rag_folder(self.init_from, f"{key}.init_from")
            values = {"n_docs": folder.n_docs, "label_smoothing": folder.label_smoothing,
                      "max_context_tokens": folder.max_combined_length}
        for name, value in values.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def own_generator_tokenizer(self) -> Path | None:
        """The folder of the tokenizer the generator brings (init_from's generator_tokenizer/, a pretrained
        generator's folder); None for a generator trained from scratch on the knowledge base's tokenizer."""
        if self.init_from is not None:
            return Path(self.init_from) / GENERATOR_TOKENIZER       # the folder was checked by check()
        return generator_folder(self.generator.pretrained) if self.generator.pretrained is not None else None

    def question_vectors(self) -> tuple[str, bool]:
        """How the question encoder makes its vectors: (pooling, normalised). init_from's is a DPR encoder: its
        pooler output, not normalised."""
        if self.init_from is not None:
            return POOLER, False
        folder = resolve_encoder(self.question_encoder, "model.question_encoder")
        return folder.pooling, folder.normalize


@dataclass
class RetrieverConfig:
    """What the retriever learns: which encoders train, and the scale of its scores. The context encoder is the
    knowledge base's (kb.context_encoder); the searches themselves go to the retrieval service (`service`)."""

    train_question_encoder: bool = False    # the demo's MiniLM retrieves its passages (recall@1 0.985) untrained
    train_ctx_encoder: bool = False         # re-embed retrieved passages in the step, so gradients reach it
    freeze_embeddings: bool = True          # keep the encoders' token embedding tables fixed (most optimizer work)
    score_scale: float | None = at_least(None, 0.0)   # doc_scores = score_scale x (q . d), the logits of RAG's
    #   prior over passages. null: as the encoders say: 20 where question and passage vectors are both normalised
    #   (cosines; the scale sentence-transformers, and so the bundled MiniLM, trains with), else 1 (raw inner
    #   products: DPR, and any encoder with normalize=false)
    objective: str = choice("marginal", "distant", "pdist", "emdr2")   # what the encoders learn from:
    #   marginal: RAG's loss, as the generator; distant: InfoNCE with the candidates holding an answer (or of a
    #   gold title) as positives, the others and the batch's as negatives; pdist: Atlas' perplexity distillation;
    #   emdr2: EMDR2. All but marginal stop the RAG loss's gradient into the doc scores.
    objective_weight: float = at_least(1.0, 0.0)   # loss = RAG loss + objective_weight x the objective's
    temperature: float = at_least(1.0, 0.001)      # distant: of the InfoNCE logits; pdist: of the reader's scores
    positives: str = choice("answer_or_title", "answer")   # distant: a candidate holding a gold answer or of a gold
    #                                                        title is a positive; answer: only one holding an answer
    #                                                        (where a title names an article of many passages)
    candidates: int | None = at_least(None, 1)     # passages asked of the service per question, re-scored by the
    #                                                current encoders; the best model.n_docs go to the reader.
    #                                                null: model.n_docs
    eval_k: list[int] = field(default_factory=lambda: list(RECALL_AT))   # retrieval scored at these k in
    #                                                                      validation and test

    def check(self, key: str) -> None:
        check_ranks(self.eval_k, f"{key}.eval_k")

    def fill_unset(self, model: ModelConfig, context_encoder: EncoderConfig) -> RetrieverConfig:
        """Set score_scale where null: as the question encoder of `model` and the knowledge base's context encoder
        make their vectors (default_score_scale). Returns self."""
        if self.score_scale is None:
            passages_normalized = resolve_encoder(context_encoder, "kb.context_encoder").normalize
            self.score_scale = default_score_scale(model.question_vectors()[1], passages_normalized)
        return self


@dataclass
class IndexRefreshConfig:
    """Re-encoding the knowledge base with the current context encoder while training goes on."""

    every_n_steps: int | None = at_least(None, 1)   # global optimizer steps between refreshes; null = never
    workers: int = at_least(RefreshSpec.num_workers, 1)          # encoder actors
    worker_cpus: float = at_least(RefreshSpec.worker_cpus, 0.0)  # CPUs (and torch threads) per encoder actor
    worker_gpus: float = at_least(RefreshSpec.worker_gpus, 0.0)  # GPUs per encoder actor
    batch_size: int = at_least(RefreshSpec.batch_size, 1)
    keep_versions: int = at_least(RefreshSpec.keep_versions, 1)  # index versions kept on disk
    blocking: bool = False                  # stop training until each refresh is done (for comparison)


@dataclass
class OptimConfig:
    lr: float = at_least(5e-4, 0.0)         # generator
    question_encoder_lr: float = at_least(2e-5, 0.0)
    ctx_encoder_lr: float = at_least(2e-5, 0.0)
    weight_decay: float = at_least(0.01, 0.0)
    warmup_steps: int = at_least(100, 0)    # linear warm-up, then the schedule
    schedule: str = choice("constant", "linear")   # constant, or linear decay to 0 at the last step


@dataclass
class GeneratorTokenizerConfig:
    path: str | None = None              # a saved Hugging Face tokenizer; else one is trained
    kind: str = choice("wordlevel", "bpe")  # the trained tokenizer's model
    vocab_size: int = at_least(30000, 8)
    extra_texts: list[str] = field(default_factory=lambda: ["${data.dir}/train.jsonl"])  # QA JSONL files it also
    #                                                                                      learns the words of


@dataclass
class KBConfig:
    source: str | None = "${data.dir}/kb.jsonl"   # TSV/CSV (title, text columns), JSONL, or a transformers RAG
    #                                                  `datasets` folder (title, text, embeddings), imported as is
    source_index: str | None = None      # that folder's FAISS index file, checked against its embeddings
    dir: str = "${paths.run_dir}/kb"
    words_per_passage: int = at_least(100, 1)
    max_passage_tokens: int = at_least(192, 1)
    context_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator_tokenizer: GeneratorTokenizerConfig = field(default_factory=GeneratorTokenizerConfig)
    encode_batch_size: int = at_least(64, 1)
    rebuild: bool = False                   # rebuild even when an identical build exists


@dataclass
class IndexConfig:
    factory: str = "Flat"                   # a faiss.index_factory string, inner product
    shards: int = at_least(2, 1)
    replicas: int = at_least(1, 1)
    search_params: str = ServiceSpec.search_params    # e.g. "efSearch=128" or "nprobe=16"
    omp_threads: int = at_least(ServiceSpec.omp_threads, 1)   # FAISS threads per shard actor


@dataclass
class ServiceConfig:
    """The retrieval service: the Ray cluster its shard actors run on, and how the training side talks to it."""

    ray_address: str | None = None       # null starts a local Ray
    namespace: str = ServiceSpec.namespace
    host: str = "127.0.0.1"                 # the address a local Ray binds to
    dashboard: bool = False
    num_cpus: int | None = at_least(None, 1)   # CPUs of a local Ray; null: every core
    actor_cpus: float = at_least(ServiceSpec.actor_cpus, 0.0)   # CPUs Ray reserves per shard actor
    failover_timeout_s: float = at_least(ServiceSpec.failover_timeout_s, 0.001)  # a search waits this long for
    #                                                                               some replica of a dead shard
    temp_dir: str | None = None          # a local Ray's session files; null: /tmp/ray_<SLURM job id or pid>
    entropy_window: int = at_least(100, 1)  # training steps over which the retrieved-id entropy is measured

    def check(self, key: str) -> None:
        if self.ray_address:      # refused now, not after the data and the knowledge base are built
            try:
                check_reachable(self.ray_address)
            except RayUnreachable as e:
                raise UserError(f"{key}.ray_address: {e}") from None


@dataclass
class DataConfig:
    prepare: str | None = choice("demo", "nq_open", None)   # null: the files are already in dir
    source: str | None = None            # input of prepare (nq_open: the .jsonl.gz file)
    dir: str = "${paths.run_dir}/data"      # train/val/test .jsonl or .source/.target files
    demo_entities: int = at_least(3600, 10)
    batch_size: int = at_least(16, 1)       # per process
    eval_batch_size: int = at_least(32, 1)
    max_eval_examples: int = at_least(0, 0)   # 0 = all

    def check(self, key: str) -> None:
        if self.prepare is None and not Path(self.dir).is_dir():
            raise UserError(f"{key}.dir: no folder at {self.dir}; data=files needs {key}.dir=DIR, the folder of "
                            "your train/val/test files")


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, passed through as they are (a new one is one field here), then ours."""

    accelerator: str = "cpu"
    devices: Any = 1                        # a count >= 1, a list of device ids, or "auto"
    num_nodes: int = at_least(1, 1)
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = at_least(2000, 1)
    max_epochs: int = at_least(-1, -1)
    val_check_interval: int | None = at_least(500, 1)
    check_val_every_n_epoch: int | None = at_least(None, 1)
    log_every_n_steps: int = at_least(50, 1)
    gradient_clip_val: float | None = at_least(1.0, 0.0)
    accumulate_grad_batches: int = at_least(1, 1)
    num_sanity_val_steps: int = at_least(0, -1)
    # ours, not Lightning's:
    threads: int = at_least(0, 0)           # torch threads per process (0 = leave as is)
    checkpoint_every_n_steps: int | None = at_least(500, 1)   # also checkpoint every N steps (resume point);
    #                                                              null: at validation only

    def lightning_arguments(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("threads", "checkpoint_every_n_steps")}

    def check(self, key: str) -> None:
        devices = self.devices
        if isinstance(devices, bool) or not (devices == "auto" or (isinstance(devices, int) and devices >= 1)
                                             or (isinstance(devices, list) and devices)):
            raise UserError(f"{key}.devices: {devices!r} is not a device count >= 1, a list of device ids or 'auto'")


@dataclass
class LoggerConfig:
    kind: str = choice("csv", "wandb", "none")
    project: str = "rag-lightning"
    offline: bool = False                   # wandb: also when WANDB_MODE=offline or no WANDB_API_KEY is set


@dataclass
class PathsConfig:
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    index_refresh: IndexRefreshConfig = field(default_factory=IndexRefreshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kb: KBConfig = field(default_factory=KBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    evaluate_before_training: bool = True
    ckpt_path: str | None = None         # resume from it; null: from the run dir's newest checkpoint, if any
    stage: str = choice("all", "prepare", "train")   # prepare: data, KB, shard actors, then exit; train: attach

    def check(self, key: str) -> None:
        self.retriever.fill_unset(self.model, self.kb.context_encoder)
        if self.stage != "all" and not self.service.ray_address:
            raise UserError(f"stage={self.stage} needs service.ray_address: the shard actors live on a Ray "
                            "cluster that outlives each stage's processes")
        if not (self.model.generator.train or self.retriever.train_question_encoder
                or self.retriever.train_ctx_encoder):
            raise UserError("model.generator.train=false and the retriever trains no encoder "
                            "(retriever.train_question_encoder=false, retriever.train_ctx_encoder=false): nothing "
                            "would train")
        own_tokenizer, tokenizer_path = self.model.own_generator_tokenizer(), self.kb.generator_tokenizer.path
        if own_tokenizer is not None and tokenizer_path is not None:
            own, kb = (tokenizer_fingerprint(load_generator_tokenizer(p)) for p in (own_tokenizer, tokenizer_path))
            if own != kb:
                raise UserError(f"kb.generator_tokenizer.path: {tokenizer_path} ({kb}) is not the tokenizer of the "
                                f"generator ({own_tokenizer}: {own}); leave it unset to use the generator's")
        retriever = self.retriever
        if retriever.candidates is not None and retriever.candidates < self.model.n_docs:
            raise UserError(f"retriever.candidates={retriever.candidates} is smaller than model.n_docs="
                            f"{self.model.n_docs}: the reader reads the best n_docs of the candidates")
        if retriever.objective != "marginal" and not (retriever.train_question_encoder
                                                       or retriever.train_ctx_encoder):
            raise UserError(f"retriever.objective={retriever.objective} trains the retriever, but neither encoder "
                            "trains: set retriever.train_question_encoder=true (or train_ctx_encoder)")
        if self.index_refresh.every_n_steps is not None and not self.retriever.train_ctx_encoder:
            raise UserError("index_refresh.every_n_steps is set but retriever.train_ctx_encoder=false: the passage "
                            "embeddings would never change; train the context encoder or set "
                            "index_refresh.every_n_steps=null")


@dataclass
class PlanSettings:
    """What `python -m rag_lightning.plan` needs beyond a training run's config: the knowledge base at full size,
    the cluster's nodes, and figures measured of the run. The nodes and their GPUs are the run's trainer.num_nodes
    and trainer.devices. null: as the run's config says, or the planner's stated assumption."""

    passages: float | None = at_least(None, 1)          # passages in the knowledge base, e.g. 21e6 (required)
    dim: int | None = at_least(None, 1)                 # embedding dimension; null: the context encoder's output
    generator_tokens: float | None = at_least(None, 1)  # mean generator token ids a passage; null:
    #                                                     kb.max_passage_tokens
    encoder_tokens: float | None = at_least(None, 1)    # tokens the context encoder reads a passage (encoding cost,
    #                                                     stored ids); null: the encoder's max_length
    text_bytes: float | None = at_least(None, 1)        # UTF-8 bytes of a passage's title and text; null: 6 bytes a
    #                                                     word x kb.words_per_passage
    node_memory_gib: float = at_least(512.0, 0.001)     # host memory of one node
    gpus_per_node: int | None = at_least(None, 0)       # null: trainer.devices (the trainer ranks use them all)
    steps_per_s: float = at_least(1.0, 0.0001)          # optimizer steps a second of the whole job
    torch_process_gib: float = at_least(8.0, 0.0)       # host memory of one trainer rank or encoder actor
    actor_base_mib: float | None = at_least(None, 0.0)  # a shard actor's memory besides its data; null: measured
    encode_rate: float | None = at_least(None, 0.0001)  # passages/s of one encoder actor; null: from the planner's
    #                                                     table of measured rates, scaled to the encoder

    def check(self, key: str) -> None:
        if self.passages is None:
            raise UserError(f"{key}.passages: give the knowledge base's passage count, e.g. {key}.passages=21e6")


@dataclass
class PlanConfig(TrainConfig):
    """`python -m rag_lightning.plan plan.passages=21e6 [experiment=...] [overrides of the training run]`."""

    plan: PlanSettings = field(default_factory=PlanSettings)

    def check(self, key: str) -> None:
        super().check(key)
        if self.trainer.devices == "auto":
            raise UserError("trainer.devices: the plan needs the processes per node; give a count, e.g. "
                            "trainer.devices=8")


@dataclass
class BuildKBConfig:
    kb: KBConfig = field(default_factory=KBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0


@dataclass
class KnowledgeBaseRef:
    dir: str | None = None               # a knowledge base built by build_kb or train (its kb/ folder)


@dataclass
class EvaluateConfig:
    """`python -m rag_lightning.evaluate ckpt_path=... [data=...] [mode=retrieval]`, or, scoring a knowledge
    base's own encoder without a checkpoint, `python -m rag_lightning.evaluate mode=retrieval kb.dir=... data=...`."""

    ckpt_path: str | None = None
    mode: str = choice("answers", "retrieval")   # retrieval: rank passages only (no generation), at every k
    k: list[int] = field(default_factory=lambda: list(RECALL_AT))   # ranks at which retrieval is scored
    kb: KnowledgeBaseRef = field(default_factory=KnowledgeBaseRef)
    data: DataConfig | None = None       # null: the QA files the checkpoint trained on; or e.g. data=nq_open
    split: str = "test"
    batch_size: int = at_least(32, 1)
    max_examples: int = at_least(0, 0)      # 0 = all
    service: ServiceConfig = field(default_factory=ServiceConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def check(self, key: str) -> None:
        check_ranks(self.k, "k")
        if self.ckpt_path is not None and self.kb.dir is not None:
            raise UserError(f"kb.dir: {self.ckpt_path} brings its knowledge base; give ckpt_path or kb.dir")
        if self.ckpt_path is None and self.kb.dir is None:
            raise UserError("ckpt_path: give a checkpoint (ckpt_path=...), or a knowledge base to score its own "
                            "encoder (mode=retrieval kb.dir=... data=...)")
        if self.ckpt_path is None and self.mode != "retrieval":
            raise UserError(f"mode: kb.dir={self.kb.dir} without a checkpoint has no reader to answer with; "
                            "add mode=retrieval")
        if self.ckpt_path is None and self.data is None:
            raise UserError("data: a knowledge base alone names no questions; give data=files data.dir=DIR "
                            "(or data=nq_open)")


@dataclass
class GenerateConfig:
    """`python -m rag_lightning.generate ckpt_path=... question="..."` (or questions=FILE)."""

    ckpt_path: str = MISSING
    question: str | None = None
    questions: str | None = None         # a file: one question a line, or JSONL rows with a "question"
    output: str | None = None            # also write the answers and passages as JSONL here
    batch_size: int = at_least(16, 1)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def check(self, key: str) -> None:
        if (self.question is None) == (self.questions is None):
            raise UserError('give either question="..." or questions=FILE')
        if self.output is not None:
            check_file_writable(self.output, "output")


def check_file_writable(path: str, key: str) -> None:
    """Refuse, naming key, a file path a command would write only after its work: a folder, or a path whose
    folder is missing or cannot be written (tried by creating a file there, which root's permissions cannot
    fake)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{key}: {path} is a folder; give the path of a file")
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise UserError(f"{key}: cannot write {path} ({e.strerror} at {target.parent})") from None


@dataclass
class ExportConfig:
    """`python -m rag_lightning.export ckpt_path=... out=DIR`."""

    ckpt_path: str = MISSING
    out: str = MISSING                      # a new (or empty) folder


# Config groups renamed so that no two are confused (`retriever`: what learns; `service`: where searches go;
# `index_refresh`: re-encoding the knowledge base); the old names keep working on the command line.
RENAMED_GROUPS = {"retrieval": "service", "refresh": "index_refresh"}
_OLD_GROUP = re.compile(r"^(\+{0,2}|~)(" + "|".join(RENAMED_GROUPS) + r")(?=[.=@]|$)")


def with_current_names(overrides: list[str]) -> list[str]:
    """Command-line overrides with each renamed group's old name (`retrieval.ray_address=...`) made current."""
    return [_OLD_GROUP.sub(lambda m: m[1] + RENAMED_GROUPS[m[2]], o) for o in overrides]


def checked(cfg: DictConfig) -> Any:
    """The composed config as its schema's dataclass, every key and value checked (UserError naming the key)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]}: required; give {missing[0]}=...")
    _check_keys(cfg, OmegaConf.get_type(cfg), "")
    config = OmegaConf.to_object(cfg)
    _check_values(config, "")
    return config


def _check_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Refuse a key that Hydra's `+key=value` added to a structured node but its schema does not declare."""
    names = {f.name for f in fields(schema)}
    for key in node.keys():
        if key not in names:
            raise not_a_setting(f"{prefix}{key}", schema)
        child = node[key]
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            _check_keys(child, OmegaConf.get_type(child), f"{prefix}{key}.")


def not_a_setting(full_key: str, schema: type) -> UserError:
    """The error for a key that the dataclass schema of its parent does not declare, with the closest name."""
    prefix, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, [f.name for f in fields(schema)], n=1)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return UserError(f"{full_key}: not a setting of {prefix or 'the config'}{hint}")


def _check_values(config: Any, prefix: str) -> None:
    """Check every field against the choices or minimum it declares, then the dataclass's own check()."""
    for f in fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_values(value, f"{key}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            names = ", ".join("null" if c is None else str(c) for c in f.metadata["choices"])
            raise UserError(f"{key}: {value!r} is not one of {names}")
        elif "min" in f.metadata and value is not None and not math.isfinite(value):
            raise UserError(f"{key}: {value} is not a finite number")
        elif "min" in f.metadata and value is not None and value < f.metadata["min"]:
            raise UserError(f"{key} must be >= {f.metadata['min']} (got {value})")
    if hasattr(config, "check"):
        config.check(prefix.rstrip("."))


def register_configs() -> None:
    """Register the schemas, and the `${repo_root:}` resolver (the checkout holding conf/)."""
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    store = ConfigStore.instance()
    # train.yaml's schema is a group option, so that conf/plan.yaml can compose a training run on PlanConfig
    store.store(group="schema", name="train", node=TrainConfig, package="_global_")
    store.store(group="schema", name="plan", node=PlanConfig, package="_global_")
    store.store(name="build_kb_schema", node=BuildKBConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="export_schema", node=ExportConfig)
