"""Reading a knowledge base source file and splitting its documents into passages.

Formats: TSV or CSV with `title` and `text` columns (a header line, or none for two-column
TSV as in transformers' RAG example), and JSONL with `title` and `text` keys. Every
problem is reported with the file and line number before any encoding starts.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rag_lightning.errors import UserError
from rag_lightning.text_files import jsonl_rows, read_utf8


@dataclass
class Passage:
    title: str
    text: str


def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """All (title, text) documents of a source file; raises UserError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"kb.source: file not found: {path}")
    raw = read_utf8(path)
    if path.suffix == ".jsonl":
        documents = [_checked(path, number, *_title_and_text(row)) for number, row in jsonl_rows(path, raw)]
    elif path.suffix in (".tsv", ".csv"):
        documents = list(_read_delimited(path, raw, "\t" if path.suffix == ".tsv" else ","))
    else:
        raise UserError(f"kb.source: {path}: unknown format {path.suffix!r} (use .tsv, .csv or .jsonl)")
    if not documents:
        raise UserError(f"{path}: the knowledge base has no documents")
    return documents


def _title_and_text(row) -> tuple:
    return (row.get("title"), row.get("text")) if isinstance(row, dict) else (None, None)


def _read_delimited(path: Path, raw: str, delimiter: str) -> Iterator[tuple[str, str]]:
    reader = csv.reader(raw.splitlines(keepends=True), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    columns = [c.strip().lower() for c in header]
    if "title" in columns and "text" in columns:
        title_col, text_col, width = columns.index("title"), columns.index("text"), len(columns)
    elif delimiter == "\t" and len(header) == 2:      # transformers' example: no header, title<TAB>text
        title_col, text_col, width = 0, 1, 2
        yield _checked(path, 1, header[0], header[1])
    else:
        raise UserError(f"{path}:1: missing columns: the header needs 'title' and 'text', found {header}")
    for row in reader:
        if not row:
            continue
        if len(row) != width:
            raise UserError(f"{path}:{reader.line_num}: expected {width} fields, found {len(row)} "
                            f"(a stray {'tab' if delimiter == chr(9) else 'comma'} or newline?)")
        yield _checked(path, reader.line_num, row[title_col], row[text_col])


def _checked(path: Path, line: int, title, text) -> tuple[str, str]:
    if not isinstance(title, str) or not isinstance(text, str):
        raise UserError(f"{path}:{line}: a document needs string 'title' and 'text' fields")
    if not text.strip():
        raise UserError(f"{path}:{line}: empty text")
    return title.strip(), text.strip()


def split_into_passages(documents: list[tuple[str, str]], words_per_passage: int) -> list[Passage]:
    """Split each document's text into passages of at most words_per_passage words, keeping its title."""
    passages = []
    for title, text in documents:
        words = text.split()
        for start in range(0, len(words), words_per_passage):
            passages.append(Passage(title, " ".join(words[start:start + words_per_passage])))
    return passages
