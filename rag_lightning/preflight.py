"""The checks a command makes of what its config names, before any work starts: every encoder and generator
folder is read (a folder that is not the model it should be is refused), a RAG folder's values and the score scale
the encoders call for are filled in, the tokenizers of generator and knowledge base are compared, a Ray address
must answer, a folder or file the command reads or writes must be usable. Each refusal is one UserError naming
the key.

config.py checks the settings themselves and reads nothing; command() runs `preflight(checked(cfg))`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, cast

from rag_lightning.config import (
    DataConfig,
    EncoderConfig,
    GenerateConfig,
    GeneratorConfig,
    ModelConfig,
    ServiceConfig,
    TrainConfig,
)
from rag_lightning.data.prepare import check_nq_open_source
from rag_lightning.encoders.folders import resolve_encoder
from rag_lightning.errors import UserError
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, tokenizer_fingerprint
from rag_lightning.model.folder_settings import fill_model_settings, fill_score_scale, own_generator_tokenizer
from rag_lightning.model.generator import (
    CAUSAL,
    causal_lm_skeleton,
    check_generator_folder,
    generator_family,
    generator_folder,
    max_positions,
)
from rag_lightning.model.lora import check_lora_targets
from rag_lightning.model.smollm2 import check_smollm2_available
from retrieval_workers import RayUnreachable, check_reachable


def preflight(config: Any) -> Any:
    """Check (and fill in from the folders) every part of a checked config, the parts before the whole; returns
    the config."""
    _check_parts(config, "")
    return config


def _check_parts(node: Any, prefix: str) -> None:
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            _check_parts(value, f"{prefix}{f.name}.")
    key = prefix.rstrip(".")
    for kind, check in CHECKS:
        if isinstance(node, kind):
            check(node, key)


def check_encoder(encoder: EncoderConfig, key: str) -> None:
    resolve_encoder(encoder, key)  # a folder that is no encoder is refused here


def check_generator(generator: GeneratorConfig, key: str) -> None:
    """The folder is a generator; for a causal LM, the bundled one is installed and the LoRA adapters' layers
    exist (on a skeleton of the model, no weights read); LoRA is for a causal LM alone."""
    if generator.pretrained == "smollm2":
        check_smollm2_available()
    if generator.pretrained is not None:
        check_generator_folder(generator.pretrained, f"{key}.pretrained")
    if generator.lora.rank == 0:
        return
    if generator_family(generator.pretrained) != CAUSAL:
        raise UserError(
            f"{key}.lora.rank: LoRA adapters are for a causal-LM generator; {key}.pretrained is "
            f"{generator.pretrained or 'null (a BART from scratch)'}"
        )
    skeleton = causal_lm_skeleton(generator_folder(cast(str, generator.pretrained)))
    check_lora_targets(skeleton, list(generator.lora.target_modules), f"{key}.lora.target_modules")


def check_model(model: ModelConfig, key: str) -> None:
    """Fill in what the config leaves to its folders; a causal LM's prompt and answer must fit its positions,
    and it is trained without label smoothing."""
    fill_model_settings(model, key)
    if generator_family(model.generator.pretrained) != CAUSAL:
        return
    assert model.max_context_tokens is not None  # filled in above
    positions = max_positions(generator_folder(cast(str, model.generator.pretrained)))
    longest = model.max_context_tokens + model.max_answer_tokens
    if positions is not None and longest > positions:
        raise UserError(
            f"{key}.max_context_tokens: a prompt of {model.max_context_tokens} tokens and an answer of "
            f"{model.max_answer_tokens} ({key}.max_answer_tokens) make {longest}, more than the "
            f"{positions} positions of {model.generator.pretrained}"
        )
    if model.label_smoothing:
        raise UserError(
            f"{key}.label_smoothing: {model.label_smoothing} is for sequence-to-sequence generators; "
            "a causal LM generator trains without it (0)"
        )


def check_service(service: ServiceConfig, key: str) -> None:
    if service.ray_address:  # refused now, not after the data and the knowledge base are built
        try:
            check_reachable(service.ray_address)
        except RayUnreachable as e:
            raise UserError(f"{key}.ray_address: {e}") from None


def check_data(data: DataConfig, key: str) -> None:
    if data.prepare == "nq_open":
        check_nq_open_source(data.source)
    if data.prepare is None and not Path(data.dir).is_dir():
        raise UserError(
            f"{key}.dir: no folder at {data.dir}; data=files needs {key}.dir=DIR, the folder of your "
            "train/val/test files"
        )


def check_training_run(cfg: TrainConfig, key: str) -> None:
    """What depends on several parts: the score scale the encoders call for, the generator's tokenizer against
    the knowledge base's, and the candidates against model.n_docs (both filled in by now)."""
    fill_score_scale(cfg.retriever, cfg.model, cfg.kb.context_encoder)
    own_tokenizer, tokenizer_path = own_generator_tokenizer(cfg.model), cfg.kb.generator_tokenizer.path
    if own_tokenizer is not None and tokenizer_path is not None:
        own, kb = (tokenizer_fingerprint(load_generator_tokenizer(p)) for p in (own_tokenizer, tokenizer_path))
        if own != kb:
            raise UserError(
                f"kb.generator_tokenizer.path: {tokenizer_path} ({kb}) is not the tokenizer of the "
                f"generator ({own_tokenizer}: {own}); leave it unset to use the generator's"
            )
    candidates, n_docs = cfg.retriever.candidates, cfg.model.n_docs
    assert n_docs is not None  # filled in by fill_model_settings, a check of a part
    if candidates is not None and candidates < n_docs:
        raise UserError(
            f"retriever.candidates={candidates} is smaller than model.n_docs={cfg.model.n_docs}: the "
            "reader reads the best n_docs of the candidates"
        )


def check_generate_output(cfg: GenerateConfig, key: str) -> None:
    if cfg.output is not None:
        check_file_writable(cfg.output, "output")


def check_file_writable(path: str, key: str) -> None:
    """Refuse, naming key, a file path a command would write only after its work: a folder, or a path whose
    folder is missing or cannot be written (tried by creating a file there, which root's permissions cannot
    fake)."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{key}: {path} is a folder; give the path of a file")
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise UserError(f"{key}: cannot write {path} ({e.strerror} at {target.parent})") from None


# Which check runs on which part of a config (a part of each kind, wherever it sits in the tree)
CHECKS: tuple[tuple[type, Callable[[Any, str], object]], ...] = (
    (EncoderConfig, check_encoder),
    (GeneratorConfig, check_generator),
    (ModelConfig, check_model),
    (ServiceConfig, check_service),
    (DataConfig, check_data),
    (TrainConfig, check_training_run),
    (GenerateConfig, check_generate_output),
)
