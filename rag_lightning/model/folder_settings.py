"""The settings a config leaves null for the folders it names to decide, read from those folders: a model's
n_docs, label smoothing and context length (model.init_from's RAG folder, else MODEL_DEFAULTS), the folder of
the generator's own tokenizer, how the question encoder makes its vectors, and the score scale they call for."""

from __future__ import annotations

from pathlib import Path

from rag_lightning.config import MODEL_DEFAULTS, EncoderConfig, ModelConfig, RetrieverConfig
from rag_lightning.encoders.folders import default_score_scale, resolve_encoder
from rag_lightning.model.causal_folder import fill_from_causal_export, is_causal_export
from rag_lightning.model.generator import generator_folder
from rag_lightning.model.rag_folder import GENERATOR_TOKENIZER, read_rag_folder
from retrieval_workers import POOLER


def fill_model_settings(model: ModelConfig, key: str = "model") -> ModelConfig:
    """Set n_docs, label_smoothing and max_context_tokens where null: from init_from's RAG folder, else
    MODEL_DEFAULTS. An init_from that is our export of a causal-LM model becomes the settings that build it
    (fill_from_causal_export). Returns model."""
    if model.init_from is not None and is_causal_export(model.init_from):
        fill_from_causal_export(model, key)
    values = MODEL_DEFAULTS
    if model.init_from is not None:
        folder = read_rag_folder(model.init_from, f"{key}.init_from")
        values = {
            "n_docs": folder.n_docs,
            "label_smoothing": folder.label_smoothing,
            "max_context_tokens": folder.max_combined_length,
        }
    for name, value in values.items():
        if getattr(model, name) is None:
            setattr(model, name, value)
    return model


def own_generator_tokenizer(model: ModelConfig) -> Path | None:
    """The folder of the tokenizer the generator brings (init_from's generator_tokenizer/, a pretrained generator's
    folder); None for a generator trained from scratch on the knowledge base's tokenizer."""
    if model.init_from is not None:
        return Path(model.init_from) / GENERATOR_TOKENIZER
    return generator_folder(model.generator.pretrained) if model.generator.pretrained is not None else None


def question_vectors(model: ModelConfig) -> tuple[str, bool]:
    """How the question encoder makes its vectors: (pooling, normalised). init_from's is a DPR encoder: its pooler
    output, not normalised."""
    if model.init_from is not None:
        return POOLER, False
    folder = resolve_encoder(model.question_encoder, "model.question_encoder")
    return folder.pooling, folder.normalize


def fill_score_scale(retriever: RetrieverConfig, model: ModelConfig, context_encoder: EncoderConfig) -> RetrieverConfig:
    """Set retriever.score_scale where null: as model's question encoder and the knowledge base's context encoder
    make their vectors (default_score_scale). Returns retriever."""
    if retriever.score_scale is None:
        passages_normalized = resolve_encoder(context_encoder, "kb.context_encoder").normalize
        retriever.score_scale = default_score_scale(question_vectors(model)[1], passages_normalized)
    return retriever
