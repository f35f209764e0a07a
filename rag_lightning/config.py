"""Structured configs: the schema behind conf/, and the one place where every default is written.

Each dataclass default is the value `python -m rag_lightning.train` runs with (the embedded demo); a YAML option
in conf/ holds only what that option changes. Each field carries its help, and its choices or minimum, as data
beside its default (`setting`, `choice`, `at_least`): `checked()` refuses a value outside them, and
docs/reference/configuration.md is generated from them (rag_lightning/config_reference.py).

Hydra refuses a mistyped key or a wrong type while composing; `checked()` then refuses, naming the key, an added
key that is no setting (`+trainer.max_step=5`) and a value out of its declared choices or range, and runs the
cross-field checks of the `check()` methods. This module reads no file: the checks that read the folders,
tokenizers or Ray cluster a config names are rag_lightning/preflight.py's, run next by every command.
"""

from __future__ import annotations

import difflib
import math
import string
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.resources import files
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rag_lightning.errors import UserError
from retrieval_workers import RefreshSpec, ServiceSpec

# Every command's @hydra.main config_path: conf/, installed inside the package as rag_lightning.conf (a
# package-dir mapping in pyproject.toml), so that a wheel's rag-* commands find it from any folder
CONF_PACKAGE = "rag_lightning.conf"
CONF_PATH = f"pkg://{CONF_PACKAGE}"


def conf_dir() -> str:
    """The folder of the installed conf/ (the checkout's own under an editable install)."""
    return str(files(CONF_PACKAGE))


def setting(default: Any, help: str) -> Any:
    """A field with its default and its help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def choice(default: Any, *choices: Any, help: str) -> Any:
    """A field whose value must be one of `choices` (the default among them)."""
    return field(default=default, metadata={"help": help, "choices": (default, *choices)})


def at_least(default: Any, minimum: float, help: str) -> Any:
    """A field whose value, when set, must be >= minimum."""
    return field(default=default, metadata={"help": help, "min": minimum})


@dataclass
class EncoderConfig:
    """A dense encoder of questions or passages. What a folder is, is read from the folder
    (rag_lightning/encoders/folders.py): a sentence-transformers folder (modules.json) brings its pooling,
    normalisation and max_seq_length, a DPR folder its pooler output (projection included), any other Hugging Face
    encoder folder is BERT-style (mean pooling unless set). null below means: as the folder says."""

    pretrained: str | None = setting(
        "minilm",
        '"minilm" (the bundled all-MiniLM-L6-v2), a model folder, or null for a random model of the sizes below',
    )
    tokenizer: str | None = setting(None, "a tokenizer folder; null: the pretrained model's (MiniLM's if random)")
    pooling: str | None = choice(
        None,
        "mean",
        "cls",
        help="overrides a sentence-transformers folder's pooling; refused for DPR (its pooler output)",
    )
    normalize: bool | None = setting(None, "L2-normalise the vectors (a sentence-transformers Normalize module)")
    max_length: int | None = at_least(None, 2, help="tokens per text; null: the folder's max_seq_length, else 128")
    num_layers: int = at_least(
        0, 0, help="keep only the first N layers of a pretrained model (0 = all); a random model's layers"
    )
    hidden_size: int = at_least(
        128, 1, help="hidden size of a random model (made like the bundled MiniLM: mean pooling, normalised)"
    )
    num_heads: int = at_least(4, 1, help="attention heads of a random model")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on a causal-LM generator: only the adapters train, the model they sit on stays as it
    was loaded, and checkpoints hold the adapters alone."""

    rank: int = at_least(0, 0, help="the adapters' rank; 0: no adapters, the whole generator trains")
    alpha: int = at_least(16, 1, help="the adapters' scale is alpha / rank")
    dropout: float = at_least(0.05, 0.0, help="dropout on the adapters' input")
    target_modules: list[str] = setting(
        ["q_proj", "v_proj"],
        "the names of the linear layers that get adapters (Llama's q_proj, v_proj; GPT-2's c_attn)",
    )


@dataclass
class GeneratorConfig:
    """The generator (the reader): a pretrained sequence-to-sequence model or causal language model with its own
    tokenizer, or a BART built from these sizes and trained from scratch (with the knowledge base's generator
    tokenizer)."""

    pretrained: str | None = setting(
        None,
        "a folder of a sequence-to-sequence model (BART, mBART, T5/mT5, an EncoderDecoderModel) or of a causal "
        'language model (Llama, SmolLM, Qwen, GPT-2, ...), "minilm" (MiniLM on both sides) or "smollm2" (the '
        "bundled SmolLM2-135M-Instruct); null: a BART from scratch, of the sizes below",
    )
    prefix: str | None = setting(
        None,
        "text before every context (T5's task prefix, as transformers' RAG reads it "
        "from the generator's config.prefix); null: the folder's",
    )
    d_model: int = at_least(128, 1, help="hidden size of a generator trained from scratch")
    layers: int = at_least(2, 1, help="encoder and decoder layers of a generator trained from scratch")
    heads: int = at_least(4, 1, help="attention heads of a generator trained from scratch")
    ffn_dim: int = at_least(512, 1, help="feed-forward size of a generator trained from scratch")
    dropout: float = at_least(0.0, 0.0, help="dropout of a generator trained from scratch")
    max_positions: int = at_least(512, 8, help="positions of a generator trained from scratch")
    train: bool = setting(
        True,
        "false: the generator stays as it is (no gradients, no optimizer state), for "
        "training the retriever against a fixed reader",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


# The ranks k at which retrieval is scored (recall@k, mrr@k, gold_recall@k), in validation, test and evaluate
RECALL_AT = [1, 5, 20, 100]


def check_ranks(ks: list[int], key: str) -> None:
    if not ks or min(ks) < 1:
        raise UserError(f"{key}: {ks} is not a list of ranks >= 1")


# What model.n_docs, model.label_smoothing and model.max_context_tokens are when neither the config nor
# model.init_from's RAG folder sets them
MODEL_DEFAULTS = {"n_docs": 3, "label_smoothing": 0.0, "max_context_tokens": 256}


@dataclass
class ModelConfig:
    """The RAG model: its kind, where it starts from, its question encoder and generator, and its sizes."""

    kind: str = choice(
        "rag_sequence",
        "rag_token",
        help="RAG-Sequence or RAG-Token marginalisation (Lewis et al. 2020, transformers' losses)",
    )
    init_from: str | None = setting(
        None,
        "a whole RAG folder (transformers' save_pretrained, as the hub's "
        "facebook/rag-*, or our export): its question encoder, generator, "
        "tokenizers, and n_docs, label_smoothing, max_context_tokens where null",
    )
    n_docs: int | None = at_least(
        None, 1, help=f"passages retrieved per question; null: init_from's, else {MODEL_DEFAULTS['n_docs']}"
    )
    question_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    label_smoothing: float | None = at_least(
        None, 0.0, help=f"null: init_from's, else {MODEL_DEFAULTS['label_smoothing']}"
    )
    max_question_tokens: int = at_least(32, 2, help="question tokens kept")
    max_answer_tokens: int = at_least(
        8, 4, help='answer tokens generated, with "</s> <s>" and "</s>" (the demo\'s answers are one word)'
    )
    max_context_tokens: int | None = at_least(
        None,
        2,
        help="passage + question tokens per retrieved document; "
        "null: init_from's max_combined_length, else "
        f"{MODEL_DEFAULTS['max_context_tokens']}",
    )
    num_beams: int = at_least(2, 1, help="beam search at validation and test")
    prompt: str = setting(
        "Title: {title}\n{text}\n\nQuestion: {question}\nAnswer:",
        "a causal-LM generator's input for each passage: {title}, {text} and {question} are filled in and the "
        "answer follows; sequence-to-sequence generators read `title / text // question` (transformers' RAG)",
    )
    chat_template: bool = setting(
        True, "a causal-LM generator whose tokenizer has a chat template reads the prompt as the user's turn of it"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute the generator's and encoders' activations in the backward pass: less memory for more compute"
    )

    def check(self, key: str) -> None:
        check_prompt(self.prompt, f"{key}.prompt")
        if self.init_from is not None:
            if self.generator.pretrained is not None:
                raise UserError(
                    f"{key}.generator.pretrained: {key}.init_from={self.init_from} brings its "
                    f"generator; set one of the two"
                )
            if self.question_encoder != EncoderConfig():
                raise UserError(
                    f"{key}.question_encoder: {key}.init_from={self.init_from} brings its question "
                    f"encoder (DPR); leave {key}.question_encoder unset"
                )


PROMPT_FIELDS = ("title", "text", "question")


def check_prompt(prompt: str, key: str) -> None:
    """A prompt names {text} and {question}, may name {title}, and nothing else between braces."""
    try:
        named = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as e:  # an unmatched brace
        raise UserError(f"{key}: {e} in the prompt {prompt!r}") from None
    unknown = sorted(set(named) - set(PROMPT_FIELDS))
    missing = [name for name in ("text", "question") if name not in named]
    if unknown or missing:
        what = f"names {{{unknown[0]}}}" if unknown else f"has no {{{missing[0]}}}"
        raise UserError(f"{key}: the prompt {what}; it takes {{title}}, {{text}} and {{question}} ({prompt!r})")


@dataclass
class RetrieverConfig:
    """What the retriever learns: which encoders train, and the scale of its scores. The context encoder is the
    knowledge base's (kb.context_encoder); the searches themselves go to the retrieval service (`service`)."""

    train_question_encoder: bool = setting(
        False, "train the question encoder (the demo's MiniLM retrieves its passages, recall@1 0.985, untrained)"
    )
    train_context_encoder: bool = setting(
        False,
        "re-embed retrieved passages in the step, so gradients reach the "
        "context encoder (index_refresh re-encodes the knowledge base)",
    )
    freeze_embeddings: bool = setting(True, "keep the encoders' token embedding tables fixed (most optimizer work)")
    score_scale: float | None = at_least(
        None,
        0.0,
        help="doc_scores = score_scale x (q . d), the logits of RAG's "
        "prior over passages. null: as the encoders say: 20 where "
        "question and passage vectors are both normalised "
        "(cosines, the scale sentence-transformers trains with), "
        "else 1 (raw inner products: DPR, normalize=false)",
    )
    objective: str = choice(
        "marginal",
        "distant",
        "pdist",
        "emdr2",
        help="what the encoders learn from. marginal: RAG's loss, as the generator; distant: "
        "InfoNCE with the candidates holding an answer (or of a gold title) as positives, "
        "the others and the batch's as negatives; pdist: Atlas' perplexity distillation; "
        "emdr2: EMDR2. All but marginal stop the RAG loss's gradient into the doc scores",
    )
    objective_weight: float = at_least(1.0, 0.0, help="loss = RAG loss + objective_weight x the objective's")
    temperature: float = at_least(1.0, 0.001, help="distant: of the InfoNCE logits; pdist: of the reader's scores")
    positives: str = choice(
        "answer_or_title",
        "answer",
        help="distant: a candidate holding a gold answer or of a gold title is a positive; "
        "answer: only one holding an answer (where a title names an article of many "
        "passages)",
    )
    candidates: int | None = at_least(
        None,
        1,
        help="passages asked of the service per question, re-scored by the "
        "current encoders; the best model.n_docs go to the reader. "
        "null: model.n_docs",
    )
    fusion: str = choice(
        "dense",
        "sparse",
        "hybrid",
        help="how the candidates are ranked and doc_scores formed. dense: score_scale x (q . d); sparse: "
        "sparse_weight x the BM25 score standardised over the question's candidates; hybrid: their sum. sparse and "
        "hybrid need a knowledge base built with index.sparse=bm25, whose candidates are then the union of the "
        "dense and the BM25 top candidates",
    )
    sparse_weight: float = at_least(
        1.0, 0.0, help="sparse and hybrid: the weight of the standardised BM25 score (a fixed bias, no gradient)"
    )
    retrieve_ahead: bool = setting(
        True,
        "when no encoder trains: retrieve each training batch (and build a causal reader's prompts) in a background "
        "thread while the step before it runs, which hides retrieval where the step leaves CPU to spare (its "
        "compute on a GPU); on a CPU whose every core trains, it competes with the step instead",
    )
    eval_k: list[int] = setting(
        RECALL_AT, "ranks at which retrieval is scored in validation and test (with model.n_docs)"
    )

    def check(self, key: str) -> None:
        check_ranks(self.eval_k, f"{key}.eval_k")

    def candidates_of(self, n_docs: int) -> int:
        """Passages asked of the service per question for a reader of n_docs: candidates, at least n_docs."""
        return max(self.candidates or n_docs, n_docs)


@dataclass
class IndexRefreshConfig:
    """Re-encoding the knowledge base with the current context encoder while training goes on."""

    every_n_steps: int | None = at_least(None, 1, help="global optimizer steps between refreshes; null = never")
    workers: int = at_least(RefreshSpec.num_workers, 1, help="encoder actors")
    worker_cpus: float = at_least(RefreshSpec.worker_cpus, 0.0, help="CPUs (and torch threads) per encoder actor")
    worker_gpus: float = at_least(RefreshSpec.worker_gpus, 0.0, help="GPUs per encoder actor")
    batch_size: int = at_least(RefreshSpec.batch_size, 1, help="passages an encoder actor encodes at a time")
    keep_versions: int = at_least(RefreshSpec.keep_versions, 1, help="index versions kept on disk")
    blocking: bool = setting(False, "stop training until each refresh is done (for comparison)")


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters, one learning rate a part."""

    lr: float = at_least(5e-4, 0.0, help="the generator's learning rate")
    question_encoder_lr: float = at_least(2e-5, 0.0, help="the question encoder's learning rate")
    context_encoder_lr: float = at_least(2e-5, 0.0, help="the context encoder's learning rate")
    weight_decay: float = at_least(0.01, 0.0, help="AdamW's weight decay")
    warmup_steps: int = at_least(100, 0, help="linear warm-up, then the schedule")
    schedule: str = choice("constant", "linear", help="constant, or linear decay to 0 at the last step")


@dataclass
class GeneratorTokenizerConfig:
    """The tokenizer the knowledge base stores its passages in: the generator's own, or one trained on the data."""

    path: str | None = setting(None, "a saved Hugging Face tokenizer; null: the generator's own, else one is trained")
    kind: str = choice("wordlevel", "bpe", help="the trained tokenizer's model")
    vocab_size: int = at_least(30000, 8, help="the trained tokenizer's vocabulary size")
    extra_texts: list[str] = setting(
        ["${data.dir}/train.jsonl"], "QA JSONL files whose words the trained tokenizer also learns"
    )


@dataclass
class KBConfig:
    """The knowledge base: its source texts, its folder, its passages and the encoder of its vectors."""

    source: str | None = setting(
        "${data.dir}/kb.jsonl",
        "TSV/CSV (title, text columns), JSONL, or a transformers "
        "RAG `datasets` folder (title, text, embeddings), imported "
        "as is",
    )
    source_index: str | None = setting(None, "that folder's FAISS index file, checked against its embeddings")
    dir: str = setting("${paths.run_dir}/kb", "the knowledge base's folder (its versions, shards and passages)")
    words_per_passage: int = at_least(100, 1, help="documents are split into passages of this many words")
    max_passage_tokens: int = at_least(192, 1, help="generator tokens stored a passage")
    context_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator_tokenizer: GeneratorTokenizerConfig = field(default_factory=GeneratorTokenizerConfig)
    encode_batch_size: int = at_least(64, 1, help="passages encoded at a time while building")
    rebuild: bool = setting(False, "rebuild even when an identical build exists")


@dataclass
class IndexConfig:
    """The FAISS index of the knowledge base's vectors, split into shards."""

    factory: str = setting("Flat", "a faiss.index_factory string, inner product (Flat, HNSW32, IVF64,PQ16, ...)")
    shards: int = at_least(2, 1, help="index shards, each served by its own Ray actors")
    replicas: int = at_least(1, 1, help="actors serving each shard (a search fails over between them)")
    sparse: str | None = choice(
        None,
        "bm25",
        help="bm25: also build a BM25 index of each shard's passages (title and text; corpus-wide statistics), "
        "for retriever.fusion=sparse or hybrid and BM25 candidates in distant supervision; null: dense only",
    )


@dataclass
class ServiceConfig:
    """The retrieval service: the Ray cluster its shard actors run on, how they search, and how the training side
    talks to them."""

    ray_address: str | None = setting(None, "a Ray cluster's address (host:port or auto); null starts a local Ray")
    namespace: str = setting(ServiceSpec.namespace, "the Ray namespace of the shard actors")
    host: str = setting("127.0.0.1", "the address a local Ray binds to")
    dashboard: bool = setting(False, "start a local Ray's dashboard")
    num_cpus: int | None = at_least(None, 1, help="CPUs of a local Ray; null: every core")
    actor_cpus: float = at_least(ServiceSpec.actor_cpus, 0.0, help="CPUs Ray reserves per shard actor")
    omp_threads: int = at_least(ServiceSpec.omp_threads, 1, help="FAISS threads per shard actor")
    search_params: str = setting(
        ServiceSpec.search_params,
        'faiss.ParameterSpace settings of the shard actors\' searches, e.g. "efSearch=128" or "nprobe=16"; '
        "evaluate and generate: empty keeps the setting the checkpoint trained with",
    )
    failover_timeout_s: float = at_least(
        ServiceSpec.failover_timeout_s, 0.001, help="a search waits this long for some replica of a dead shard"
    )
    temp_dir: str | None = setting(None, "a local Ray's session files; null: /tmp/ray_<SLURM job id or pid>")
    entropy_window: int = at_least(100, 1, help="training steps over which the retrieved-id entropy is measured")


@dataclass
class DataConfig:
    """The question-answer splits, and how they are made."""

    prepare: str | None = choice(
        "demo",
        "nq_open",
        None,
        help="what writes the files into dir: the embedded demo, "
        "NQ-open from data.source; null: they are already "
        "in dir",
    )
    source: str | None = setting(None, "input of prepare (nq_open: the NQ-open oracle .jsonl.gz, docs/data.md)")
    dir: str = setting("${paths.run_dir}/data", "the folder of the train/val/test .jsonl (or .source/.target) files")
    demo_entities: int = at_least(3600, 10, help="entities of the embedded demo")
    batch_size: int = at_least(16, 1, help="training questions a batch, per process")
    eval_batch_size: int = at_least(32, 1, help="questions a batch at validation and test")
    max_eval_examples: int = at_least(0, 0, help="questions of each evaluation split scored (0 = all)")


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, passed through as they are: a new one is one field here."""

    accelerator: str = setting("cpu", "cpu, gpu, ... (Lightning's)")
    devices: Any = setting(1, 'a count >= 1, a list of device ids, or "auto"')
    num_nodes: int = at_least(1, 1, help="nodes of the job (SLURM: the allocation's)")
    strategy: str = setting("auto", "Lightning's strategy: auto, ddp, ...")
    precision: str = setting("32-true", "32-true, bf16-mixed, ...")
    max_steps: int = at_least(2000, 1, help="optimizer steps of training")
    max_epochs: int = at_least(-1, -1, help="-1: as many as max_steps takes")
    max_time: str | None = setting(None, 'also stop training after this wall time, "DD:HH:MM:SS"; null: no limit')
    val_check_interval: int | None = at_least(500, 1, help="training batches between validations")
    check_val_every_n_epoch: int | None = at_least(None, 1, help="null: validate by val_check_interval alone")
    log_every_n_steps: int = at_least(50, 1, help="steps between logged training metrics")
    gradient_clip_val: float | None = at_least(1.0, 0.0, help="gradient norm clipping; null: none")
    accumulate_grad_batches: int = at_least(1, 1, help="batches a step")
    num_sanity_val_steps: int = at_least(0, -1, help="validation batches before training (-1: all)")

    def lightning_arguments(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check(self, key: str) -> None:
        devices = self.devices
        if isinstance(devices, bool) or not (
            devices == "auto" or (isinstance(devices, int) and devices >= 1) or (isinstance(devices, list) and devices)
        ):
            raise UserError(f"{key}.devices: {devices!r} is not a device count >= 1, a list of device ids or 'auto'")


@dataclass
class LoggerConfig:
    """Where the run's metrics go (a run also writes results.json and logs/metrics.csv)."""

    kind: str = choice("csv", "wandb", "none", help="csv: logs/metrics.csv; wandb: Weights & Biases")
    project: str = setting("rag-lightning", "the W&B project")
    offline: bool = setting(False, "wandb: log offline; also when WANDB_MODE=offline or no WANDB_API_KEY is set")


@dataclass
class PathsConfig:
    """Where a run writes."""

    run_dir: str = setting("${hydra:runtime.output_dir}", "the run's folder (Hydra's output dir)")


@dataclass
class TrainConfig:
    """`python -m rag_lightning.train [experiment=...] [overrides]`: a training run."""

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
    seed: int = setting(0, "the seed of every random choice")
    evaluate_before_training: bool = setting(True, "score the untrained model on the test split (initial/*)")
    evaluate_answers: bool = setting(
        True,
        "validation and test generate answers (em, f1) and pick the best checkpoint by val/em; false: they rank "
        "passages only and pick it by val/mrr at the largest k, for runs that train the retriever alone",
    )
    ckpt_path: str | None = setting(None, "resume from it; null: from the run dir's newest checkpoint, if any")
    checkpoint_every_n_steps: int | None = at_least(
        500, 1, help="also checkpoint every N steps (the resume point of a stopped job); null: at validation only"
    )
    threads: int = at_least(0, 0, help="torch threads per process (0 = leave as is)")
    stage: str = choice(
        "all",
        "prepare",
        "train",
        help="prepare: data, knowledge base, shard actors, then exit; "
        "train: attach to them (slurm/train.sbatch runs both)",
    )

    def check(self, key: str) -> None:
        if self.stage != "all" and not self.service.ray_address:
            raise UserError(
                f"stage={self.stage} needs service.ray_address: the shard actors live on a Ray "
                "cluster that outlives each stage's processes"
            )
        if not (
            self.model.generator.train or self.retriever.train_question_encoder or self.retriever.train_context_encoder
        ):
            raise UserError(
                "model.generator.train=false and the retriever trains no encoder "
                "(retriever.train_question_encoder=false, retriever.train_context_encoder=false): "
                "nothing would train"
            )
        retriever = self.retriever
        if retriever.objective != "marginal" and not (
            retriever.train_question_encoder or retriever.train_context_encoder
        ):
            raise UserError(
                f"retriever.objective={retriever.objective} trains the retriever, but neither encoder "
                "trains: set retriever.train_question_encoder=true (or train_context_encoder)"
            )
        if retriever.fusion != "dense" and self.index.sparse is None:
            raise UserError(
                f"retriever.fusion={retriever.fusion} reads BM25 scores, but index.sparse is null: add "
                "index.sparse=bm25 to build a BM25 index beside the dense one (the knowledge base is rebuilt with it)"
            )
        if (
            retriever.fusion == "sparse"
            and retriever.objective != "distant"
            and (retriever.train_question_encoder or retriever.train_context_encoder)
        ):
            raise UserError(
                f"retriever.fusion=sparse makes doc_scores BM25's alone, so retriever.objective="
                f"{retriever.objective} reaches no encoder: use retriever.objective=distant, or retriever.fusion=hybrid"
            )
        if self.index_refresh.every_n_steps is not None and not self.retriever.train_context_encoder:
            raise UserError(
                "index_refresh.every_n_steps is set but retriever.train_context_encoder=false: the "
                "passage embeddings would never change; train the context encoder or set "
                "index_refresh.every_n_steps=null"
            )


@dataclass
class PlanSettings:
    """What `python -m rag_lightning.plan` needs beyond a training run's config: the knowledge base at full size,
    the cluster's nodes, and figures measured of the run. The nodes and their GPUs are the run's trainer.num_nodes
    and trainer.devices. null: as the run's config says, or the planner's stated assumption."""

    passages: float | None = at_least(None, 1, help="passages in the knowledge base, e.g. 21e6 (required)")
    dim: int | None = at_least(None, 1, help="embedding dimension; null: the context encoder's output")
    generator_tokens: float | None = at_least(
        None, 1, help="mean generator token ids a passage; null: kb.max_passage_tokens"
    )
    encoder_tokens: float | None = at_least(
        None,
        1,
        help="tokens the context encoder reads a passage (encoding cost, stored ids); null: the encoder's max_length",
    )
    text_bytes: float | None = at_least(
        None, 1, help="UTF-8 bytes of a passage's title and text; null: 6 bytes a word x kb.words_per_passage"
    )
    bm25_terms: float | None = at_least(
        None, 1, help="index.sparse=bm25: distinct terms of the BM25 vocabulary; null: bench/scale.py's at 1M"
    )
    node_memory_gib: float = at_least(512.0, 0.001, help="host memory of one node")
    gpus_per_node: int | None = at_least(None, 0, help="null: trainer.devices (the trainer ranks use them all)")
    steps_per_s: float = at_least(1.0, 0.0001, help="optimizer steps a second of the whole job")
    torch_process_gib: float = at_least(8.0, 0.0, help="host memory of one trainer rank or encoder actor")
    actor_base_mib: float | None = at_least(None, 0.0, help="a shard actor's memory besides its data; null: measured")
    encode_rate: float | None = at_least(
        None,
        0.0001,
        help="passages/s of one encoder actor; null: from the planner's table of measured rates, scaled to the encoder",
    )

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
            raise UserError(
                "trainer.devices: the plan needs the processes per node; give a count, e.g. trainer.devices=8"
            )


@dataclass
class BuildKBConfig:
    """`python -m rag_lightning.build_kb kb.source=... kb.dir=...`: a knowledge base alone."""

    kb: KBConfig = field(default_factory=KBConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = setting(0, "the seed of a random context encoder")


@dataclass
class FusionOverride:
    """How `evaluate` ranks passages where it differs from the checkpoint's retriever."""

    fusion: str | None = choice(
        None,
        "dense",
        "sparse",
        "hybrid",
        help="retriever.fusion to rank by (sparse and hybrid need a knowledge base with a BM25 index); null: the "
        "checkpoint's, dense for a knowledge base alone",
    )
    sparse_weight: float | None = at_least(
        None, 0.0, help="retriever.sparse_weight; null: the checkpoint's, RetrieverConfig's for a knowledge base alone"
    )


@dataclass
class KnowledgeBaseRef:
    """A knowledge base already built."""

    dir: str | None = setting(None, "a knowledge base built by build_kb or train (its kb/ folder)")


@dataclass
class EvaluateConfig:
    """`python -m rag_lightning.evaluate ckpt_path=... [data=...] [mode=retrieval]`, or, scoring a knowledge
    base's own encoder without a checkpoint, `python -m rag_lightning.evaluate mode=retrieval kb.dir=... data=...`."""

    ckpt_path: str | None = setting(None, "the checkpoint to score")
    mode: str = choice("answers", "retrieval", help="retrieval: rank passages only (no generation), at every k")
    eval_k: list[int] = setting(RECALL_AT, "ranks at which retrieval is scored")
    kb: KnowledgeBaseRef = field(default_factory=KnowledgeBaseRef)
    retriever: FusionOverride = field(default_factory=FusionOverride)
    data: DataConfig | None = setting(None, "null: the QA files the checkpoint trained on; or e.g. data=nq_open")
    split: str = setting("test", "the split scored: train, val or test")
    eval_batch_size: int = at_least(32, 1, help="questions a batch")
    max_eval_examples: int = at_least(0, 0, help="questions scored (0 = all)")
    service: ServiceConfig = field(default_factory=ServiceConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def check(self, key: str) -> None:
        check_ranks(self.eval_k, "eval_k")
        if self.ckpt_path is not None and self.kb.dir is not None:
            raise UserError(f"kb.dir: {self.ckpt_path} brings its knowledge base; give ckpt_path or kb.dir")
        if self.ckpt_path is None and self.kb.dir is None:
            raise UserError(
                "ckpt_path: give a checkpoint (ckpt_path=...), or a knowledge base to score its own "
                "encoder (mode=retrieval kb.dir=... data=...)"
            )
        if self.ckpt_path is None and self.mode != "retrieval":
            raise UserError(
                f"mode: kb.dir={self.kb.dir} without a checkpoint has no reader to answer with; add mode=retrieval"
            )
        if self.ckpt_path is None and self.data is None:
            raise UserError(
                "data: a knowledge base alone names no questions; give data=files data.dir=DIR (or data=nq_open)"
            )


@dataclass
class GenerateConfig:
    """`python -m rag_lightning.generate ckpt_path=... question="..."` (or questions=FILE)."""

    ckpt_path: str = setting(MISSING, "the checkpoint that answers")
    question: str | None = setting(None, "one question")
    questions: str | None = setting(None, 'a file: one question a line, or JSONL rows with a "question"')
    output: str | None = setting(None, "also write the answers and passages as JSONL here")
    batch_size: int = at_least(16, 1, help="questions answered at a time")
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def check(self, key: str) -> None:
        if (self.question is None) == (self.questions is None):
            raise UserError('give either question="..." or questions=FILE')


@dataclass
class ExportConfig:
    """`python -m rag_lightning.export ckpt_path=... out=DIR`: a checkpoint in transformers' RAG format."""

    ckpt_path: str = setting(MISSING, "the checkpoint to export")
    out: str = setting(MISSING, "a new (or empty) folder")


# Each command's config: the name of its conf/<name>.yaml, and its schema
COMMAND_SCHEMAS = {
    "train": TrainConfig,
    "build_kb": BuildKBConfig,
    "evaluate": EvaluateConfig,
    "generate": GenerateConfig,
    "export": ExportConfig,
    "plan": PlanConfig,
}


def checked(cfg: DictConfig) -> Any:
    """The composed config as its schema's dataclass, every key and value checked (UserError naming the key)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{missing[0]}: required; give {missing[0]}=...")
    _check_keys(cfg, _schema(cfg), "")
    config = OmegaConf.to_object(cfg)
    _check_values(config, "")
    return config


def _check_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Refuse a key that Hydra's `+key=value` added to a structured node but its schema does not declare."""
    names = {f.name for f in fields(schema)}
    for key in node.keys():
        if key not in names:
            raise not_a_setting(f"{prefix}{key!s}", schema)
        child = node[key]
        if isinstance(child, DictConfig) and is_dataclass(OmegaConf.get_type(child)):
            _check_keys(child, _schema(child), f"{prefix}{key!s}.")


def _schema(node: DictConfig) -> type:
    """The dataclass a structured node was made from."""
    schema = OmegaConf.get_type(node)
    assert schema is not None, "a node composed on a structured config"
    return schema


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
    """Register the schemas with Hydra's config store."""
    store = ConfigStore.instance()
    # train.yaml's schema is a group option, so that conf/plan.yaml can compose a training run on PlanConfig
    store.store(group="schema", name="train", node=TrainConfig, package="_global_")
    store.store(group="schema", name="plan", node=PlanConfig, package="_global_")
    for name in ("build_kb", "evaluate", "generate", "export"):
        store.store(name=f"{name}_schema", node=COMMAND_SCHEMAS[name])
