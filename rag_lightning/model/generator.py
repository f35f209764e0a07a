"""The generator and the Hugging Face RAG model around our question encoder (RAG-Sequence or RAG-Token).

The generator is a BART built from the config's sizes and trained from scratch, or, with
`model.generator.pretrained`, a sequence-to-sequence folder (BART, mBART, T5/mT5: anything
AutoModelForSeq2SeqLM loads, or an EncoderDecoderModel) with its own tokenizer, or `minilm`:
an EncoderDecoderModel warm-started on both sides from the bundled MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    EncoderDecoderModel,
    PreTrainedModel,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag_lightning.config import ModelConfig
from rag_lightning.encoders.folders import bundled_minilm
from rag_lightning.errors import UserError
from retrieval_workers import TextEncoder

RAG_CLASSES = {"rag_sequence": RagSequenceForGeneration, "rag_token": RagTokenForGeneration}


def generator_folder(pretrained: str) -> Path:
    """The folder of a pretrained generator (its tokenizer is there too): the bundled MiniLM for "minilm"."""
    return bundled_minilm() if pretrained == "minilm" else Path(pretrained)


def decoder_prefix(tokenizer, decoder_start_token_id: int) -> list[int]:
    """The tokens before every answer: the decoder start token, then bos where the family has one apart from it
    (BART's "</s> <s>"; T5 starts from <pad>, a BERT decoder from [CLS]).

    With the answer's first token predicted at the third decoder position, a BART trained from
    scratch learns to copy from its passages within a few hundred steps for every seed; after "<s>"
    alone some seeds stayed on the answers' prior for thousands of steps (measured on the demo).
    """
    bos = tokenizer.bos_token_id
    return [decoder_start_token_id] + ([bos] if bos is not None and bos != decoder_start_token_id else [])


def read_model_config(folder: Path, key: str) -> dict:
    """A Hugging Face model folder's config.json; one line naming `key` and the folder when there is none."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{key}: {folder} is not a Hugging Face model folder (no readable config.json)") from None


def check_generator_folder(pretrained: str, key: str) -> str:
    """The model type of the generator `pretrained` names; one line naming the folder if it is no
    sequence-to-sequence model."""
    if pretrained == "minilm":
        return "encoder-decoder"
    folder = Path(pretrained)
    config = read_model_config(folder, key)
    if config.get("model_type") != "encoder-decoder" and not config.get("is_encoder_decoder"):
        raise UserError(
            f"{key}: {folder} is a {config.get('model_type')} model, not a sequence-to-sequence model "
            "(BART, T5, an EncoderDecoderModel, ...)"
        )
    return config["model_type"]


def load_pretrained_generator(pretrained: str, tokenizer) -> PreTrainedModel:
    """The sequence-to-sequence model `model.generator.pretrained` names; tokenizer is its own."""
    model_type = check_generator_folder(pretrained, "model.generator.pretrained")
    if model_type != "encoder-decoder":
        return AutoModelForSeq2SeqLM.from_pretrained(pretrained)
    if pretrained == "minilm":  # encoder and decoder both from the bundled MiniLM, cross-attention new
        folder = str(bundled_minilm())
        return ready_for_rag(EncoderDecoderModel.from_encoder_decoder_pretrained(folder, folder), tokenizer)
    return ready_for_rag(EncoderDecoderModel.from_pretrained(pretrained), tokenizer)


def ready_for_rag(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """The generator as RAG trains it: an EncoderDecoderModel loses its encoder's pooler (unused: its parameters
    would get no gradient, which DDP refuses) and gets the token ids RAG and generate need where it does not set
    them: a BERT-style decoder starts from [CLS] and ends with [SEP] (the tokenizer's eos). Other models as they are."""
    if not isinstance(model, EncoderDecoderModel):
        return model
    if getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler = None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    wanted = {
        "decoder_start_token_id": start,
        "bos_token_id": start,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for config in (model.config, model.generation_config):
        for name, token_id in wanted.items():
            if getattr(config, name, None) is None:
                setattr(config, name, token_id)
    return model


def set_model_values(rag: RagSequenceForGeneration, model_cfg: ModelConfig) -> RagSequenceForGeneration:
    """The RAG model with model_cfg's values in its config (where transformers' RAG and our export read them):
    n_docs, label_smoothing, max_combined_length, and the generator's prefix when model.generator.prefix is set.
    Every model we build or load comes through here, so its generator's bos token is declared here too."""
    rag.config.n_docs, rag.config.label_smoothing = model_cfg.n_docs, model_cfg.label_smoothing
    rag.config.max_combined_length = model_cfg.max_context_tokens
    if model_cfg.generator.prefix is not None:
        rag.generator.config.prefix = model_cfg.generator.prefix
    for config in (rag.config.generator, rag.generator.config):  # one object when loaded from a RAG folder
        declare_bos_token(config)
    return rag


def declare_bos_token(generator_config) -> None:
    """Give a generator config without a bos_token_id one of None (no bos token), as T5's lacks it.

    transformers' RAG-Sequence loss reads config.generator.bos_token_id, which a transformers 5 config has only
    where its family declares one: T5's (and so the hub's t5 and flan-t5 folders) has none, and RAG-Sequence ends
    in an AttributeError at its first step. Set on the generator's own config too, an export writes it into its
    RagConfig (as null), so plain transformers runs RAG-Sequence on the exported folder as well."""
    if not hasattr(generator_config, "bos_token_id"):
        generator_config.bos_token_id = None


def build_rag(model_cfg: ModelConfig, question_encoder: TextEncoder, tokenizer) -> RagSequenceForGeneration:
    """The Hugging Face RAG model: our question encoder and the generator model_cfg.generator describes."""
    generator_cfg = model_cfg.generator
    if generator_cfg.pretrained is not None:
        generator = load_pretrained_generator(generator_cfg.pretrained, tokenizer)
    else:
        generator = BartForConditionalGeneration(
            BartConfig(
                vocab_size=len(tokenizer),
                d_model=generator_cfg.d_model,
                encoder_layers=generator_cfg.layers,
                decoder_layers=generator_cfg.layers,
                encoder_attention_heads=generator_cfg.heads,
                decoder_attention_heads=generator_cfg.heads,
                encoder_ffn_dim=generator_cfg.ffn_dim,
                decoder_ffn_dim=generator_cfg.ffn_dim,
                dropout=generator_cfg.dropout,
                max_position_embeddings=generator_cfg.max_positions,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.eos_token_id,
                forced_eos_token_id=None,
                forced_bos_token_id=None,
            )
        )
    rag_config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.model.config, generator.config, retrieval_vector_size=question_encoder.dim
    )
    rag = RAG_CLASSES[model_cfg.kind](config=rag_config, question_encoder=question_encoder.model, generator=generator)
    return set_model_values(rag, model_cfg)
