"""A whole RAG checkpoint as transformers writes it (`model.init_from`): the hub's facebook/rag-* models, a folder
of `RagSequenceForGeneration`/`RagTokenForGeneration.save_pretrained` with `RagTokenizer.save_pretrained`, or
our own export.

Such a folder holds one RagConfig (the question encoder's and the generator's configs inside
it, and n_docs, max_combined_length, label_smoothing, title_sep, doc_sep, ...), the weights of
both parts, and the two tokenizers in `question_encoder_tokenizer/` and `generator_tokenizer/`.
The weights are the same for RAG-Sequence and RAG-Token, so `model.kind` chooses freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, RagConfig, RagSequenceForGeneration, RagTokenizer

from rag_lightning.config import ModelConfig
from rag_lightning.errors import UserError
from rag_lightning.kb.passage_text import DOC_SEP, TITLE_SEP
from rag_lightning.model.generator import RAG_CLASSES, read_model_config, ready_for_rag, set_model_values
from retrieval_workers import POOLER

QUESTION_TOKENIZER, GENERATOR_TOKENIZER = "question_encoder_tokenizer", "generator_tokenizer"  # RagTokenizer's


@dataclass(frozen=True)
class RagFolder:
    """What a RAG folder says about the model it holds."""

    path: Path
    n_docs: int
    max_combined_length: int
    label_smoothing: float

    @property
    def question_tokenizer_dir(self) -> Path:
        return self.path / QUESTION_TOKENIZER


def read_rag_folder(path: str, key: str) -> RagFolder:
    """The RAG folder at `path` (the config at `key`), checked: one line naming the folder when it is no RAG model
    we can train."""
    folder = Path(path)
    config = read_model_config(folder, key)
    if config.get("model_type") != "rag":
        raise UserError(
            f"{key}: {folder} is a {config.get('model_type')} model, not a RAG model (transformers' "
            "RagSequenceForGeneration or RagTokenForGeneration, as the hub's facebook/rag-*)"
        )
    question_encoder = (config.get("question_encoder") or {}).get("model_type")
    if question_encoder != "dpr":
        raise UserError(
            f"{key}: {folder} has a {question_encoder} question encoder; transformers' RAG scores "
            "passages by the pooler output of a DPR question encoder, the one kind we load from a RAG "
            "folder"
        )
    rag_config = RagConfig.from_pretrained(str(folder))
    separators = (rag_config.title_sep, rag_config.doc_sep)
    if separators != (TITLE_SEP, DOC_SEP):
        raise UserError(
            f"{key}: {folder}/config.json joins title, text and question with title_sep="
            f"{separators[0]!r} and doc_sep={separators[1]!r}; the knowledge base stores its passages "
            f"with transformers' defaults {TITLE_SEP!r} and {DOC_SEP!r}"
        )
    for tokenizer in (QUESTION_TOKENIZER, GENERATOR_TOKENIZER):
        if not (folder / tokenizer).is_dir():
            raise UserError(
                f"{key}: {folder} has no {tokenizer}/ folder (RagTokenizer.save_pretrained writes "
                "both tokenizers beside the model)"
            )
    return RagFolder(
        folder,
        n_docs=rag_config.n_docs,
        max_combined_length=rag_config.max_combined_length,
        label_smoothing=rag_config.label_smoothing,
    )


def load_rag_folder(
    model_cfg: ModelConfig, generator_tokenizer
) -> tuple[RagSequenceForGeneration, PreTrainedTokenizerBase]:
    """The RAG model of model_cfg.init_from as model_cfg.kind (RAG-Sequence or RAG-Token) with model_cfg's values
    on top, and its question tokenizer; generator_tokenizer is the folder's own."""
    assert model_cfg.init_from is not None  # called for a model made from a RAG folder
    folder = read_rag_folder(model_cfg.init_from, "model.init_from")
    rag = RAG_CLASSES[model_cfg.kind].from_pretrained(str(folder.path))
    rag.generator = ready_for_rag(rag.generator, generator_tokenizer)
    return set_model_values(rag, model_cfg), AutoTokenizer.from_pretrained(str(folder.question_tokenizer_dir))


def write_rag_folder(folder: Path, question_encoder: Path, generator: Path, **rag_values) -> Path:
    """A RAG folder, laid out as the hub's facebook/rag-* are, from a DPR question encoder folder and a generator
    folder (each with its tokenizer); rag_values (n_docs, max_combined_length, ...) go into its RagConfig."""
    rag = RagSequenceForGeneration.from_pretrained_question_encoder_generator(str(question_encoder), str(generator))
    rag.config.retrieval_vector_size = (
        rag.question_encoder.config.projection_dim or rag.question_encoder.config.hidden_size
    )
    for name, value in rag_values.items():
        setattr(rag.config, name, value)
    rag.save_pretrained(str(folder))
    RagTokenizer(
        question_encoder=AutoTokenizer.from_pretrained(str(question_encoder)),
        generator=AutoTokenizer.from_pretrained(str(generator)),
    ).save_pretrained(str(folder))
    return folder


def export_mismatch(pooling: str, normalize: bool, score_scale: float) -> str | None:
    """What keeps a model from exporting exactly, given how its question encoder makes its vectors and the scale
    of its scores; None when nothing does. train says it at start-up, export refuses the checkpoint with it."""
    if pooling in ("cls", POOLER) and not normalize and score_scale == 1:
        return None
    return (
        f"model.question_encoder.pooling={pooling}, normalize={str(normalize).lower()} and retriever.score_scale="
        f"{score_scale:g}; transformers' RAG scores passages by the raw [CLS] vector of its question encoder "
        "(DPRQuestionEncoder), so only pooling=cls (or a DPR encoder), normalize=false and score_scale=1 export "
        "exactly"
    )
