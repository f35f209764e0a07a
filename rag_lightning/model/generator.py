"""The generator and the RAG model around our question encoder (RAG-Sequence or RAG-Token).

The generator is a BART built from the config's sizes and trained from scratch, or, with
`model.generator.pretrained`, a sequence-to-sequence folder (BART, mBART, T5/mT5: anything
AutoModelForSeq2SeqLM loads, or an EncoderDecoderModel) with its own tokenizer, or `minilm`:
an EncoderDecoderModel warm-started on both sides from the bundled MiniLM. A sequence-to-sequence
generator sits in transformers' RagSequenceForGeneration / RagTokenForGeneration.

It may also be a causal language model (anything AutoModelForCausalLM loads: Llama, SmolLM, Qwen,
GPT-2, ...), or `smollm2`, the bundled SmolLM2-135M-Instruct, with LoRA adapters where
model.generator.lora asks. transformers' RAG classes cannot hold one: CausalRag holds it beside the
question encoder, and rag_lightning/model/causal_reader.py computes its RAG losses and generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
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
from rag_lightning.model.lora import with_lora
from rag_lightning.model.smollm2 import smollm2_folder
from retrieval_workers import TextEncoder

RAG_CLASSES = {"rag_sequence": RagSequenceForGeneration, "rag_token": RagTokenForGeneration}
SEQ2SEQ, CAUSAL = "seq2seq", "causal"  # the generator families


def generator_folder(pretrained: str) -> Path:
    """The folder of a pretrained generator (its tokenizer is there too): the bundled MiniLM for "minilm", the
    bundled SmolLM2 for "smollm2" (made a plain folder on first use)."""
    if pretrained == "minilm":
        return bundled_minilm()
    return smollm2_folder() if pretrained == "smollm2" else Path(pretrained)


def generator_family(pretrained: str | None) -> str:
    """SEQ2SEQ or CAUSAL: what model.generator.pretrained names (checked by check_generator_folder)."""
    if pretrained is None or pretrained == "minilm":
        return SEQ2SEQ
    if pretrained == "smollm2":
        return CAUSAL
    config = json.loads((Path(pretrained) / "config.json").read_text())
    return SEQ2SEQ if is_seq2seq(config) else CAUSAL


def is_seq2seq(config: dict) -> bool:
    return config.get("model_type") == "encoder-decoder" or bool(config.get("is_encoder_decoder"))


def is_causal_lm(config: dict) -> bool:
    """A folder's config.json says it holds a causal LM: an architecture with a language-modelling head."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in config.get("architectures") or [])


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


def check_generator_folder(pretrained: str, key: str) -> dict:
    """The config.json of the generator folder `pretrained` names ({} for the bundled ones); one line naming the
    folder if it is neither a sequence-to-sequence model nor a causal LM."""
    if pretrained in ("minilm", "smollm2"):
        return {}
    folder = Path(pretrained)
    config = read_model_config(folder, key)
    if not (is_seq2seq(config) or is_causal_lm(config)):
        architectures = ", ".join(config.get("architectures") or []) or "no architectures"
        raise UserError(
            f"{key}: {folder} is a {config.get('model_type')} model ({architectures}), neither a "
            "sequence-to-sequence model (BART, T5, an EncoderDecoderModel, ...) nor a causal language model "
            "(Llama, Qwen, GPT-2, ...)"
        )
    return config


def causal_lm_skeleton(folder: Path) -> nn.Module:
    """The causal LM of a folder built from its config on the meta device: its layers' names, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))


def max_positions(folder: Path) -> int | None:
    """The positions a causal LM folder's model reads (Llama's max_position_embeddings, GPT-2's n_positions)."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("max_position_embeddings") or config.get("n_positions")


def load_pretrained_generator(pretrained: str, tokenizer) -> PreTrainedModel:
    """The sequence-to-sequence model `model.generator.pretrained` names; tokenizer is its own."""
    config = check_generator_folder(pretrained, "model.generator.pretrained")
    if config and config.get("model_type") != "encoder-decoder":
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


class CausalRag(nn.Module):
    """A question encoder and a causal-LM generator (with its LoRA adapters where asked): what RagModule holds as
    `rag` for such a generator, as transformers' RAG model holds the two for a sequence-to-sequence one."""

    def __init__(self, question_encoder: PreTrainedModel, generator: nn.Module):
        super().__init__()
        self.question_encoder, self.generator = question_encoder, generator


def build_causal_rag(model_cfg: ModelConfig, question_encoder: TextEncoder, tokenizer) -> CausalRag:
    """Our question encoder and the causal LM model.generator.pretrained names, in float32, its pad id the
    tokenizer's, with LoRA adapters where model.generator.lora.rank > 0."""
    generator_cfg = model_cfg.generator
    assert generator_cfg.pretrained is not None  # a causal generator is always pretrained
    lm = AutoModelForCausalLM.from_pretrained(str(generator_folder(generator_cfg.pretrained)), dtype="float32")
    lm.config.pad_token_id = lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = generator_cfg.lora
    if lora.rank > 0:
        lm = with_lora(lm, lora.rank, lora.alpha, lora.dropout, list(lora.target_modules))
    return CausalRag(question_encoder.model, lm)


def build_rag(model_cfg: ModelConfig, question_encoder: TextEncoder, tokenizer) -> RagSequenceForGeneration:
    """transformers' RAG model: our question encoder and the sequence-to-sequence generator model_cfg.generator
    describes."""
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
