"""The configuration reference, generated from the schema (rag_lightning/config.py): every setting of every command
with its type, default, choices or range, and help.

    python -m rag_lightning.config_reference > docs/reference/configuration.md

tests/test_docs.py fails when the file in docs/ is not what this prints.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING as REQUIRED

from rag_lightning.config import COMMAND_SCHEMAS, DataConfig

HEADER = """# Configuration reference

Every setting of every command, as `key=value` on its command line (`python -m rag_lightning.train
model.n_docs=5`), or in a YAML file under `conf/`. Generated from `rag_lightning/config.py` by
`python -m rag_lightning.config_reference`; do not edit by hand. A part that several commands share is described
once, where it first appears.
"""
# Fields whose type is a dataclass but whose default is null (evaluate's data: the checkpoint's by default)
OPTIONAL_PARTS = {"data": DataConfig}


def reference() -> str:
    """The whole reference, as Markdown."""
    described: dict[type, str] = {}
    sections = [HEADER]
    for command, schema in COMMAND_SCHEMAS.items():
        sections.append(f"## {command}\n\n{_docstring(schema)}\n")
        sections += _part(schema, "", command, described)
    return "\n".join(sections)


def _part(schema: type, prefix: str, command: str, described: dict[type, str]) -> list[str]:
    """The table of a part's own settings, then a section for each part inside it not described before."""
    rows, inner = [], []
    for f in fields(schema):
        part = _part_type(f)
        key = f"{prefix}{f.name}"
        if part is None:
            rows.append(_row(key, f))
        elif part in described:
            rows.append(f"| `{key}` | | | the settings of {described[part]} |")
        else:
            described[part] = f"`{key}` ({command})"
            inner.append(f"### `{key}` ({command})\n\n{_docstring(part)}\n")
            inner += _part(part, f"{key}.", command, described)
    table = ["| key | default | values | help |", "|---|---|---|---|", *rows] if rows else []
    return ["\n".join(table) + "\n"] * bool(table) + inner


def _part_type(f: Field) -> type | None:
    if f.default_factory is not MISSING and is_dataclass(f.default_factory):
        return f.default_factory  # type: ignore[return-value]
    return OPTIONAL_PARTS.get(f.name) if f.default is None else None


def _row(key: str, f: Field) -> str:
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    values = ""
    if "choices" in f.metadata:
        values = ", ".join(_value(c) for c in f.metadata["choices"])
    elif "min" in f.metadata:
        values = f">= {f.metadata['min']:g}"
    shown = "required" if default == REQUIRED else f"`{_value(default)}`"
    return f"| `{key}` | {shown} | {values} | {_escape(f.metadata.get('help', ''))} |"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, bool)) or value == "" else str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def _docstring(schema: type) -> str:
    return " ".join(inspect.cleandoc(schema.__doc__ or "").split())


if __name__ == "__main__":
    print(reference(), end="")
