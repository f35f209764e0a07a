"""The Hugging Face RAG model around our question encoder: RAG-Sequence or RAG-Token with a BART generator."""
from __future__ import annotations

from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag_lightning.config import ModelConfig
from retrieval_workers.encoding import TextEncoder

RAG_CLASSES = {"rag_sequence": RagSequenceForGeneration, "rag_token": RagTokenForGeneration}


def decoder_prefix(tokenizer) -> list[int]:
    """The tokens before every answer, BART's own "</s> <s>": decoder_start_token_id, then bos.

    With the answer's first token predicted at the third decoder position, a generator trained from
    scratch learns to copy from its passages within a few hundred steps for every seed; after "<s>"
    alone some seeds stayed on the answers' prior for thousands of steps (measured on the demo).
    """
    return [tokenizer.eos_token_id, tokenizer.bos_token_id]


def build_rag(model_cfg: ModelConfig, question_encoder: TextEncoder, tokenizer) -> RagSequenceForGeneration:
    """The Hugging Face RAG model: our question encoder and a BART generator built from the config's sizes."""
    generator_cfg = model_cfg.generator
    bart_config = BartConfig(
        vocab_size=len(tokenizer), d_model=generator_cfg.d_model, encoder_layers=generator_cfg.layers,
        decoder_layers=generator_cfg.layers, encoder_attention_heads=generator_cfg.heads,
        decoder_attention_heads=generator_cfg.heads, encoder_ffn_dim=generator_cfg.ffn_dim,
        decoder_ffn_dim=generator_cfg.ffn_dim, dropout=generator_cfg.dropout,
        max_position_embeddings=generator_cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=decoder_prefix(tokenizer)[0], forced_eos_token_id=None,
        forced_bos_token_id=None)
    generator = BartForConditionalGeneration(bart_config)
    rag_config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.model.config, bart_config, n_docs=model_cfg.n_docs,
        label_smoothing=model_cfg.label_smoothing, retrieval_vector_size=question_encoder.dim,
        max_combined_length=model_cfg.max_context_tokens)
    return RAG_CLASSES[model_cfg.kind](config=rag_config, question_encoder=question_encoder.model, generator=generator)
