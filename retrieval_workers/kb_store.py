"""The knowledge base on disk: manifest, passage table, index versions, atomic writes.

Layout of a KB directory:

    manifest.json                 the commit point: everything else is reachable from it
    passages-<hash>.arrow         id, title, text, generator token ids, context-encoder token ids
    generator_tokenizer/          the tokenizer that made the generator token ids
    v<N>/embeddings.npy           float32 [num_passages, dim], one row per passage id
    v<N>/shard_<s>.faiss          one FAISS index per shard over its contiguous id range

A build writes new files beside the old ones and then replaces manifest.json in one
rename, so a crash at any point leaves the previous knowledge base whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class KnowledgeBaseError(Exception):
    """A knowledge base directory that is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Manifest:
    """What manifest.json holds."""

    num_passages: int
    dim: int
    shards: list[tuple[int, int]]          # [start, end) passage ids of each shard
    active_version: int
    index_factory: str
    passages_file: str
    encoder: dict                          # how the passages were embedded
    fingerprint: str                       # hash of the build inputs, to reuse an identical build
    files: dict[str, str] = field(default_factory=dict)   # relative path -> sha256
    format_version: int = FORMAT_VERSION

    def version_dir(self, version: int | None = None) -> str:
        return f"v{self.active_version if version is None else version}"

    def shard_index_file(self, shard: int, version: int | None = None) -> str:
        return f"{self.version_dir(version)}/shard_{shard:03d}.faiss"

    def embeddings_file(self, version: int | None = None) -> str:
        return f"{self.version_dir(version)}/embeddings.npy"


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the caller has written it, fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; once filled, it replaces `final` in one rename.

    Only for folders this package owns (a KB's version or tokenizer folder), never a user's path.
    """
    final = Path(final)
    staging = final.with_name(f".{final.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)       # our own leftover from an interrupted build
    staging.mkdir(parents=True)
    yield staging
    if final.exists():
        shutil.rmtree(final)         # an uncommitted folder of ours, never one the manifest points to
    staging.rename(final)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(kb_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_bytes(Path(kb_dir) / MANIFEST, json.dumps(asdict(manifest), indent=2).encode())


def read_manifest(kb_dir: str | Path) -> Manifest:
    path = Path(kb_dir) / MANIFEST
    if not path.is_file():
        raise KnowledgeBaseError(f"{path}: no knowledge base manifest here (build one with rag_lightning.build_kb)")
    try:
        raw = json.loads(path.read_text())
        raw["shards"] = [tuple(s) for s in raw["shards"]]
        manifest = Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise KnowledgeBaseError(f"{path}: not a valid manifest ({e})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise KnowledgeBaseError(f"{path}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    return manifest


def verify_file(kb_dir: str | Path, manifest: Manifest, relative: str) -> Path:
    """Return the path of a manifest-listed file after checking its sha256 (a truncated file is refused)."""
    path = Path(kb_dir) / relative
    expected = manifest.files.get(relative)
    if expected is None:
        raise KnowledgeBaseError(f"{path}: not listed in {Path(kb_dir) / MANIFEST}")
    if not path.is_file():
        raise KnowledgeBaseError(f"{path}: missing (listed in {Path(kb_dir) / MANIFEST})")
    if sha256_file(path) != expected:
        raise KnowledgeBaseError(f"{path}: checksum mismatch, the file is truncated or corrupted; rebuild the knowledge base")
    return path


class PassageTable:
    """The passage table, memory-mapped: rows are read on demand, never loaded whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._table = ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()

    def __len__(self) -> int:
        return self._table.num_rows

    def titles_and_texts(self, ids) -> list[tuple[str, str]]:
        rows = self._table.take(pa.array(np.asarray(ids, dtype=np.int64).ravel()))
        return list(zip(rows.column("title").to_pylist(), rows.column("text").to_pylist()))

    def token_ids(self, column: str, start: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of rows [start, end) as (flat values, offsets), zero-copy from the mapped file."""
        chunk = self._table.column(column).slice(start, (end if end is not None else len(self)) - start)
        lists = chunk.combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy()
        return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def write_passage_table(path: str | Path, columns: dict[str, list]) -> None:
    """Write an Arrow IPC file atomically (temp name, fsync, rename)."""
    path = Path(path)
    table = pa.table({
        "id": pa.array(columns["id"], pa.int64()),
        "title": pa.array(columns["title"], pa.string()),
        "text": pa.array(columns["text"], pa.string()),
        "generator_ids": pa.array(columns["generator_ids"], pa.list_(pa.int32())),
        "encoder_ids": pa.array(columns["encoder_ids"], pa.list_(pa.int32())),
    })
    with atomic_output(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)


def shard_ranges(num_passages: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ids [0, n) into num_shards contiguous ranges whose sizes differ by at most one."""
    bounds = np.linspace(0, num_passages, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
