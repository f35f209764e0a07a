"""Reading a knowledge base source file and splitting its documents into passages, as a stream.

Formats: TSV or CSV with `title` and `text` columns (a header line, or none for two-column
TSV as in transformers' RAG example; a field holding a tab, comma, line break or leading
quote is quoted, "...", with "" for a quote inside), and JSONL with `title` and `text` keys.
Documents are read as they are consumed, never held all at once. Every problem is reported
with the file and line number; the build reads the whole file once before any encoding.
"""

from __future__ import annotations

import csv
import hashlib
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rag_lightning.errors import UserError
from rag_lightning.text_files import jsonl_rows, utf8_lines


@dataclass
class Passage:
    title: str
    text: str


def read_documents(path: str | Path) -> Iterator[tuple[str, str]]:
    """The (title, text) documents of a source file, in order, read as they are consumed; raises UserError naming
    the file and line.

    Every document needs a text; its title may be empty. The same title and text twice is refused (the
    passages would be indexed twice); the same title with other texts, e.g. an article split into parts, is not.
    A repeated document is found from digests, so it is reported once the whole file has been read.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"kb.source: file not found: {path}")
    lines = utf8_lines(path)
    rows: Iterator[tuple[int, str, str]]
    if path.suffix == ".jsonl":
        rows = ((number, *_title_and_text(row)) for number, row in jsonl_rows(path, lines))
    elif path.suffix in (".tsv", ".csv"):
        rows = _read_delimited(path, lines, "\t" if path.suffix == ".tsv" else ",")
    else:
        raise UserError(f"kb.source: {path}: unknown format {path.suffix!r} (use .tsv, .csv or .jsonl)")
    seen = _DocumentDigests()
    with _csv_field_size_limit(path.stat().st_size):
        for line, title, text in rows:
            document = _checked(path, line, title, text)
            seen.add(line, *document)
            yield document
    if not len(seen):
        raise UserError(f"{path}: the knowledge base has no documents")
    duplicate = seen.first_repeat()
    if duplicate is not None:
        line, first = duplicate
        raise UserError(f"{path}:{line}: duplicate document: the same title and text as line {first}")


class _DocumentDigests:
    """A 16-byte digest and the line of every document read, to find one read twice without keeping the texts
    (24 bytes a document)."""

    def __init__(self):
        self.digests = bytearray()
        self.lines = array("q")

    def __len__(self) -> int:
        return len(self.lines)

    def add(self, line: int, title: str, text: str) -> None:
        self.digests += hashlib.blake2b(f"{len(title)}:{title}{text}".encode(), digest_size=16).digest()
        self.lines.append(line)

    def first_repeat(self) -> tuple[int, int] | None:
        """(line, line of its first occurrence) of the earliest document that repeats an earlier one, or None."""
        keys = np.frombuffer(self.digests, dtype=np.uint64).reshape(-1, 2)
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal documents stay in file order
        ordered = keys[order]
        repeats = np.all(ordered[1:] == ordered[:-1], axis=1)
        if not repeats.any():
            return None
        positions = np.arange(len(order))
        group_start = np.maximum.accumulate(np.where(np.r_[True, ~repeats], positions, 0))
        lines = np.frombuffer(self.lines, dtype=np.int64)[order]
        later = np.flatnonzero(repeats) + 1
        earliest = later[np.argmin(lines[later])]
        return int(lines[earliest]), int(lines[group_start[earliest]])


def _title_and_text(row) -> tuple:
    return (row.get("title"), row.get("text")) if isinstance(row, dict) else (None, None)


def _read_delimited(path: Path, lines: Iterable[tuple[int, str]], delimiter: str) -> Iterator[tuple[int, str, str]]:
    """(line, title, text) of each row: columns named by a header, or title<TAB>text in a TSV without one."""
    records = _records(path, lines, delimiter)
    first = next(records, None)
    if first is None:
        return
    line, header = first
    columns = [c.strip().lower() for c in header]
    if "title" in columns and "text" in columns:
        title_col, text_col, width = columns.index("title"), columns.index("text"), len(columns)
    elif delimiter == "\t" and len(header) == 2:  # transformers' example: no header, title<TAB>text
        title_col, text_col, width = 0, 1, 2
        yield line, header[0], header[1]
    else:
        raise UserError(f"{path}:{line}: missing columns: the header needs 'title' and 'text', found {header}")
    for line, fields in records:
        if len(fields) != width:
            cause = (
                f"a stray {'tab' if delimiter == chr(9) else 'comma'} in a field"
                if len(fields) > width
                else "a line break in a field of the row above"
            )
            raise UserError(
                f"{path}:{line}: expected {width} fields, found {len(fields)} ({cause}? a field "
                'holding one must be quoted: "...")'
            )
        yield line, fields[title_col], fields[text_col]


@contextmanager
def _csv_field_size_limit(limit: int) -> Iterator[None]:
    """Let csv read fields of up to `limit` characters (a document of any length), restoring the limit after.

    Python's csv refuses a field longer than csv.field_size_limit() (131,072 characters by default) with
    "field larger than field limit". The limit is process-wide, so it is raised only while a source file is
    read, to the file's size in bytes (no field is longer; sys.maxsize overflows a C long on some platforms),
    and put back afterwards; another thread reading CSV meanwhile would accept longer fields too, nothing else.
    """
    saved = csv.field_size_limit()
    csv.field_size_limit(max(saved, limit))
    try:
        yield
    finally:
        csv.field_size_limit(saved)


def _records(path: Path, lines: Iterable[tuple[int, str]], delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank record, with CSV quoting; a quote never closed is an error."""
    # strict: an unclosed quote is refused instead of swallowing every line after it into one field
    reader = csv.reader((line for _, line in lines), delimiter=delimiter, strict=True)
    start = 1
    try:
        for fields in reader:
            if len(fields) > 1 or "".join(fields).strip():
                yield start, fields
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(
            f'{path}:{start}: bad quoting ({e}); a field that starts with " must end with ", '
            'with "" for each " inside it'
        ) from None


def _checked(path: Path, line: int, title, text) -> tuple[str, str]:
    if not isinstance(title, str) or not isinstance(text, str):
        raise UserError(f"{path}:{line}: a document needs string 'title' and 'text' fields")
    if not text.strip():
        raise UserError(f"{path}:{line}: empty text")
    return title.strip(), text.strip()


def split_into_passages(documents: Iterable[tuple[str, str]], words_per_passage: int) -> Iterator[Passage]:
    """Split each document's text into passages of at most words_per_passage words, keeping its title."""
    for title, text in documents:
        words = text.split()
        for start in range(0, len(words), words_per_passage):
            yield Passage(title, " ".join(words[start : start + words_per_passage]))
