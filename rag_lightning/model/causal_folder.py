"""The export of a model whose generator is a causal LM, and reading it back (`model.init_from`).

transformers' RAG format cannot hold a causal LM, so such a model exports as folders the ecosystem loads one by
one, beside the passages and index every export has:

    generator/            the LM (LoRA adapters merged in) and its tokenizer: AutoModelForCausalLM, AutoTokenizer
    question_encoder/     the question encoder: a sentence-transformers folder (a DPR folder for a DPR encoder)
    passages/, index.faiss
    rag_lightning.json    how the parts go together: kind, n_docs, prompt, chat_template, score_scale, lengths

model.init_from=FOLDER reads rag_lightning.json and becomes the settings that build the same model again
(fill_from_causal_export): the generator and question encoder from their folders, the prompt and the rest where
the config leaves them null.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rag_lightning.config import ModelConfig
from rag_lightning.errors import UserError

SETTINGS_FILE, GENERATOR_DIR, QUESTION_ENCODER_DIR = "rag_lightning.json", "generator", "question_encoder"


@dataclass(frozen=True)
class CausalExport:
    """What rag_lightning.json says: the model's settings, and the score scale its retriever was trained with."""

    kind: str
    n_docs: int
    prompt: str
    chat_template: bool
    score_scale: float
    max_context_tokens: int
    max_question_tokens: int
    max_answer_tokens: int
    num_beams: int


def is_causal_export(path: str | Path) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


def write_causal_settings(folder: Path, export: CausalExport) -> None:
    (folder / SETTINGS_FILE).write_text(json.dumps(export.__dict__, indent=2) + "\n")


def read_causal_export(path: str | Path, key: str) -> CausalExport:
    """The settings of the causal export at path; one line naming key and the file when they cannot be read."""
    settings = Path(path) / SETTINGS_FILE
    try:
        return CausalExport(**json.loads(settings.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{key}: {settings} is not the settings of an export of rag_lightning ({e})") from None


def fill_from_causal_export(model: ModelConfig, key: str) -> ModelConfig:
    """model with init_from, an export of a causal-LM model, made into the settings that build it again: the
    generator and question encoder from the export's folders, its prompt and chat template, and its n_docs and
    context length where the config leaves them null (model.kind chooses freely: the weights are the same).
    Returns model."""
    assert model.init_from is not None  # called for a model with init_from
    folder = Path(model.init_from)
    export = read_causal_export(folder, f"{key}.init_from")
    model.init_from = None
    model.generator.pretrained = str(folder / GENERATOR_DIR)
    model.question_encoder.pretrained = str(folder / QUESTION_ENCODER_DIR)
    model.prompt, model.chat_template = export.prompt, export.chat_template
    for name in ("n_docs", "max_context_tokens"):
        if getattr(model, name) is None:
            setattr(model, name, getattr(export, name))
    return model
