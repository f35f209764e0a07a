"""A training checkpoint read back: its contents (loaded without running code), whether its weights fit the
configured model, and the key under which it records the index version its training searched."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from rag_lightning.errors import UserError

INDEX_VERSION_KEY = "index_version"


def read_checkpoint(ckpt_path: str) -> dict:
    """A checkpoint's contents, loaded with torch's weights_only (no arbitrary code); a file that is not a
    readable checkpoint is refused naming it."""
    try:
        return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"ckpt_path: {ckpt_path} is not a readable checkpoint, truncated or corrupted? ({reason})"
        ) from None


def check_checkpoint_fits(ckpt_path: str, module: nn.Module, model_config: dict) -> None:
    """Refuse a checkpoint whose weights do not fit the configured model, naming the config keys that differ."""
    checkpoint = read_checkpoint(ckpt_path)
    saved, expected = checkpoint.get("state_dict", {}), module.state_dict()
    misfits = sorted(set(saved) ^ set(expected)) + [
        name for name in expected if name in saved and saved[name].shape != expected[name].shape
    ]
    if misfits:
        trained_with = checkpoint.get("hyper_parameters", {}).get("model", {})
        keys = [
            f"model.{key} ({old} there, {new} here)" for key, old, new in _differences(trained_with, model_config)
        ] or ["the model config"]
        raise UserError(
            f"ckpt_path: {ckpt_path} was trained with another model: {', '.join(keys[:4])}; "
            f"{len(misfits)} weights do not fit, e.g. {misfits[0]}"
        )


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf of two nested config dicts that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
