"""A whole RAG checkpoint as transformers writes it (`model.init_from`): the hub's facebook/rag-* models, a folder
of `RagSequenceForGeneration`/`RagTokenForGeneration.save_pretrained` with `RagTokenizer.save_pretrained`, or
our own export.

Such a folder holds one RagConfig (the question encoder's and the generator's configs inside
it, and n_docs, max_combined_length, label_smoothing, title_sep, doc_sep, ...), the weights of
both parts, and the two tokenizers in `question_encoder_tokenizer/` and `generator_tokenizer/`.
The weights are the same for RAG-Sequence and RAG-Token, so `model.kind` chooses freely.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, PreTrainedTokenizerBase, RagConfig, RagSequenceForGeneration

from rag_lightning.errors import UserError
from rag_lightning.kb.passage_text import DOC_SEP, TITLE_SEP
from rag_lightning.model.generator import RAG_CLASSES, ready_for_rag, set_model_values

if TYPE_CHECKING:       # config.py reads a RAG folder with read_rag_folder
    from rag_lightning.config import ModelConfig

QUESTION_TOKENIZER, GENERATOR_TOKENIZER = "question_encoder_tokenizer", "generator_tokenizer"   # RagTokenizer's


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

    @property
    def generator_tokenizer_dir(self) -> Path:
        return self.path / GENERATOR_TOKENIZER


def read_rag_folder(path: str, key: str) -> RagFolder:
    """The RAG folder at `path` (the config at `key`), checked: one line naming the folder when it is no RAG model
    we can train."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{key}: {folder} is not a Hugging Face model folder (no readable config.json)") from None
    if config.get("model_type") != "rag":
        raise UserError(f"{key}: {folder} is a {config.get('model_type')} model, not a RAG model (transformers' "
                        "RagSequenceForGeneration or RagTokenForGeneration, as the hub's facebook/rag-*)")
    question_encoder = (config.get("question_encoder") or {}).get("model_type")
    if question_encoder != "dpr":
        raise UserError(f"{key}: {folder} has a {question_encoder} question encoder; transformers' RAG scores "
                        "passages by the pooler output of a DPR question encoder, the one kind we load from a RAG "
                        "folder")
    rag_config = RagConfig.from_pretrained(str(folder))
    separators = (rag_config.title_sep, rag_config.doc_sep)
    if separators != (TITLE_SEP, DOC_SEP):
        raise UserError(f"{key}: {folder}/config.json joins title, text and question with title_sep="
                        f"{separators[0]!r} and doc_sep={separators[1]!r}; the knowledge base stores its passages "
                        f"with transformers' defaults {TITLE_SEP!r} and {DOC_SEP!r}")
    for tokenizer in (QUESTION_TOKENIZER, GENERATOR_TOKENIZER):
        if not (folder / tokenizer).is_dir():
            raise UserError(f"{key}: {folder} has no {tokenizer}/ folder (RagTokenizer.save_pretrained writes "
                            "both tokenizers beside the model)")
    return RagFolder(folder, n_docs=rag_config.n_docs, max_combined_length=rag_config.max_combined_length,
                     label_smoothing=rag_config.label_smoothing)


def load_rag_folder(model_cfg: ModelConfig, generator_tokenizer) -> tuple[RagSequenceForGeneration,
                                                                           PreTrainedTokenizerBase]:
    """The RAG model of model_cfg.init_from as model_cfg.kind (RAG-Sequence or RAG-Token) with model_cfg's values
    on top, and its question tokenizer; generator_tokenizer is the folder's own."""
    folder = read_rag_folder(model_cfg.init_from, "model.init_from")
    rag = RAG_CLASSES[model_cfg.kind].from_pretrained(str(folder.path))
    rag.generator = ready_for_rag(rag.generator, generator_tokenizer)
    return set_model_values(rag, model_cfg), AutoTokenizer.from_pretrained(str(folder.question_tokenizer_dir))
