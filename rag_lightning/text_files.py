"""Reading user text files strictly: UTF-8 and JSON errors name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rag_lightning.errors import UserError


def read_utf8(path: Path) -> str:
    return "".join(line for _, line in utf8_lines(path))


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its line break) of a file, read as they are consumed. Lines end at "\\n" only, not
    at what splitlines() also breaks on: JSON strings may hold U+2028."""
    with open(path, "rb") as f:
        for number, data in enumerate(f, 1):
            try:
                yield number, data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not valid UTF-8 (byte {data[e.start]:#04x})") from None


def jsonl_rows(path: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of (line number, line) pairs, e.g. utf8_lines(path)."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
