"""TextEncoder, the dense encoder of questions and passages, and how passages are embedded with it.

Both sides run this one forward pass: the trainer builds and trains encoders
(rag_lightning/encoders/build.py makes them from a config), the knowledge-base build and
the refresh encoder actors embed passages with `encode_token_ids`. An `EncoderSnapshot` is
what the trainer publishes in the Ray object store for a refresh: the architecture, the
pooling, the weights and the global step.

An encoder is any Hugging Face encoder model: a BERT-style model read through its last
hidden state (mean or [CLS] pooling), or a DPR question or context encoder read through its
pooler output (projection included).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm import tqdm
from transformers import CONFIG_MAPPING, MODEL_MAPPING, PretrainedConfig, PreTrainedModel

POOLER = "pooler"  # the pooling of a DPR encoder: its own pooler output


def encoder_class(config: PretrainedConfig) -> tuple[type[PreTrainedModel], dict]:
    """The transformers class of the encoder with this config, and the options it is built with."""
    model_class = (
        getattr(transformers, config.architectures[0]) if config.model_type == "dpr" else MODEL_MAPPING[type(config)]
    )
    return model_class, _build_options(model_class)


def _build_options(model_class: type[PreTrainedModel]) -> dict:
    """No pooling layer where the class has one: our pooling is our own, and the parameters of an unused pooler
    get no gradient, which DDP refuses."""
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}


class TextEncoder(nn.Module):
    """Maps token ids [B, T] to one vector per text [B, D]: mean or [CLS] pooling over a BERT-style model, or a DPR
    encoder's pooler output, then L2 normalisation when `normalize` (a model trained for cosine similarity, as the
    bundled MiniLM is).

    A text may be a pair, `[CLS] title [SEP] text [SEP]` as passages are stored: the tokens after the first
    separator get segment (token type) 1, as the tokenizer gives them, so the stored ids alone suffice.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pooling: str,
        pad_token_id: int,
        sep_token_id: int | None = None,
        normalize: bool = False,
    ):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.sep_token_id = sep_token_id
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return getattr(self.model.config, "projection_dim", 0) or self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask = (input_ids != self.pad_token_id).long()
        segments = None
        if self.sep_token_id is not None and getattr(self.model.config, "type_vocab_size", 1) > 1:
            is_sep = (input_ids == self.sep_token_id).long()
            segments = ((is_sep.cumsum(1) - is_sep) > 0).long()  # 1 after the first separator
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=segments)
        if self.pooling == POOLER:
            pooled = output.pooler_output
        elif self.pooling == "cls":
            pooled = output.last_hidden_state[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
            pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def snapshot(self, global_step: int) -> EncoderSnapshot:
        """A CPU copy of the architecture and weights, to publish for a refresh."""
        weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()}
        return EncoderSnapshot(
            type(self.model).__name__,
            self.model.config.to_dict(),
            self.pooling,
            self.normalize,
            self.pad_token_id,
            self.sep_token_id,
            weights,
            global_step,
        )


@dataclass
class EncoderSnapshot:
    """A context encoder at one global step, as the refresh encoder actors receive it."""

    architecture: str  # the transformers class, e.g. BertModel, DPRContextEncoder
    model_config: dict
    pooling: str
    normalize: bool
    pad_token_id: int
    sep_token_id: int | None
    weights: dict[str, torch.Tensor]
    global_step: int

    def build(self) -> TextEncoder:
        model_class = getattr(transformers, self.architecture)
        config = CONFIG_MAPPING[self.model_config["model_type"]].from_dict(self.model_config)
        model = model_class(config, **_build_options(model_class))
        model.load_state_dict(self.weights)
        return TextEncoder(model, self.pooling, self.pad_token_id, self.sep_token_id, self.normalize).eval()


def length_sorted_batches(
    values: np.ndarray, offsets: np.ndarray, batch_size: int, pad_token_id: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The texts values[offsets[i]:offsets[i+1]] in batches of similar length (little padding):
    (row numbers, token ids [b, T] right-padded with pad_token_id)."""
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = np.full((len(rows), max(int(lengths[rows].max()), 1)), pad_token_id, dtype=np.int64)
        for j, i in enumerate(rows):
            ids[j, : lengths[i]] = values[offsets[i] : offsets[i + 1]]
        yield rows, torch.from_numpy(ids)


@torch.no_grad()
def encode_token_ids(
    encoder: TextEncoder, values: np.ndarray, offsets: np.ndarray, batch_size: int, desc: str = "encoding passages"
) -> np.ndarray:
    """Embed the texts whose token ids are values[offsets[i]:offsets[i+1]], as float32 [n, D].

    Texts are batched by similar length, with a progress bar; on a GPU the forward pass runs
    in bfloat16.
    """
    device = next(encoder.parameters()).device
    out = np.empty((len(offsets) - 1, encoder.dim), dtype=np.float32)
    batches = length_sorted_batches(values, offsets, batch_size, encoder.pad_token_id)
    for rows, ids in tqdm(batches, total=-(-len(out) // batch_size), desc=desc, unit="batch", mininterval=2.0):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out[rows] = encoder(ids.to(device)).float().cpu().numpy()
    return out
