"""The knowledge base on disk: manifest, passage table, index versions, checksums.

Layout of a KB directory:

    manifest.json                 the commit point: everything else is reachable from it
    passages-<hash>.arrow         id, title, text, generator token ids, context-encoder token ids
    generator_tokenizer-<hash>/   the tokenizer that made the generator token ids
    v<N>/shard_<s>.faiss          one FAISS index per shard over its contiguous id range
    v<N>/shard_<s>.embeddings.npy float32 [shard size, dim], the shard's passage embeddings
    v<N>/version.json             the global training step of the encoder weights that made v<N>
    bm25-<hash>/                  with index.sparse=bm25: the BM25 index, one file per shard (sparse_index.py),
                                  shared by every version

<hash> is the start of the build's fingerprint. A build or a refresh writes a new version
folder beside the old ones (atomic_files.py) and then replaces manifest.json in one rename,
so a crash at any point leaves the previous knowledge base whole. The manifest lists the
files (with checksums) of every version kept on disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from retrieval_workers.atomic_files import atomic_output, atomic_write_bytes
from retrieval_workers.types import RetrievalWorkersError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


class KnowledgeBaseError(RetrievalWorkersError):
    """A knowledge base directory that is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Manifest:
    """What manifest.json holds."""

    num_passages: int
    dim: int
    shards: list[tuple[int, int]]  # [start, end) passage ids of each shard
    active_version: int
    index_factory: str
    passages_file: str
    encoder: dict  # how the passages were embedded
    fingerprint: str  # hash of the build inputs, to reuse an identical build
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format_version: int = FORMAT_VERSION
    sparse: dict | None = None  # the BM25 index's folder ("dir") and settings (sparse_index.py); None: none built

    def version_dir(self, version: int | None = None) -> str:
        return f"v{self.active_version if version is None else version}"

    def shard_index_file(self, shard: int, version: int | None = None) -> str:
        return f"{self.version_dir(version)}/{shard_index_name(shard)}"

    def embeddings_file(self, shard: int, version: int | None = None) -> str:
        return f"{self.version_dir(version)}/{shard_embeddings_name(shard)}"

    def sparse_file(self, shard: int) -> str:
        assert self.sparse is not None
        return f"{self.sparse['dir']}/{shard_sparse_name(shard)}"

    def version_info_file(self, version: int | None = None) -> str:
        return f"{self.version_dir(version)}/{VERSION_INFO}"

    def kept_versions(self) -> list[int]:
        """The index versions whose files this manifest lists, oldest first."""
        return sorted(
            {int(relative.split("/")[0][1:]) for relative in self.files if relative.startswith("v") and "/" in relative}
        )

    def next_version(self) -> int:
        """The number a new version gets: above every version this manifest has made."""
        return max([self.active_version, *self.kept_versions()]) + 1


def shard_index_name(shard: int) -> str:
    return f"shard_{shard:03d}.faiss"


def shard_embeddings_name(shard: int) -> str:
    return f"shard_{shard:03d}.embeddings.npy"


def shard_sparse_name(shard: int) -> str:
    return f"shard_{shard:03d}.bm25.npz"


VERSION_INFO = "version.json"


def write_version_info(version_dir: Path, version: int, global_step: int) -> None:
    (version_dir / VERSION_INFO).write_text(json.dumps({"version": version, "global_step": global_step}))


def read_version_step(kb_dir: str | Path, manifest: Manifest, version: int) -> int:
    """The global step of the encoder weights that made a kept version (0 for the initial build)."""
    path = verify_file(kb_dir, manifest, manifest.version_info_file(version))
    return int(json.loads(path.read_text())["global_step"])


def load_embeddings(kb_dir: str | Path, manifest: Manifest, version: int | None = None) -> np.ndarray:
    """All passage embeddings of a version, float32 [num_passages, dim], one row per passage id."""
    return np.concatenate(
        [
            np.load(verify_file(kb_dir, manifest, manifest.embeddings_file(shard, version)))
            for shard in range(len(manifest.shards))
        ]
    )


def commit_version(kb_dir: str | Path, manifest: Manifest, version: int, keep: int) -> list[int]:
    """Make the written folder v<version> the active version; keep the newest `keep` versions.

    Records the checksums of the folder's files, writes the manifest (the commit point), then
    deletes the folders of the versions dropped. Returns the versions dropped.
    """
    kb_dir = Path(kb_dir)
    folder = kb_dir / manifest.version_dir(version)
    for path in sorted(folder.iterdir()):
        manifest.files[f"{folder.name}/{path.name}"] = sha256_file(path)
    manifest.active_version = version
    older = [v for v in manifest.kept_versions() if v != version]
    dropped = older[: max(len(older) + 1 - keep, 0)]
    manifest.files = {
        rel: digest
        for rel, digest in manifest.files.items()
        if rel.split("/")[0] not in {manifest.version_dir(v) for v in dropped}
    }
    write_manifest(kb_dir, manifest)
    for v in dropped:
        shutil.rmtree(kb_dir / manifest.version_dir(v), ignore_errors=True)
    return dropped


def activate_kept_version(kb_dir: str | Path, version: int) -> Manifest:
    """Make an already committed, still kept version the active one again (resuming a checkpoint)."""
    manifest = read_manifest(kb_dir)
    if version not in manifest.kept_versions():
        raise KnowledgeBaseError(
            f"{Path(kb_dir) / MANIFEST}: index version {version} is no longer on disk "
            f"(kept: {manifest.kept_versions()})"
        )
    if manifest.active_version != version:
        manifest.active_version = version
        write_manifest(kb_dir, manifest)
    return manifest


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
        raise KnowledgeBaseError(
            f"{path}: checksum mismatch, the file is truncated or corrupted; rebuild the knowledge base"
        )
    return path


class PassageTable:
    """The passage table, memory-mapped: rows are read on demand, never loaded whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._table = ipc.open_file(pa.memory_map(str(self.path), "r")).read_all()

    def __len__(self) -> int:
        return self._table.num_rows

    def titles_and_texts(self, ids) -> list[tuple[str, str]]:
        rows = self._table.select(["title", "text"]).take(pa.array(np.asarray(ids, dtype=np.int64).ravel()))
        return list(zip(rows.column("title").to_pylist(), rows.column("text").to_pylist()))

    def joined_texts(self, rows: int) -> Iterator[list[str]]:
        """Each passage's title and text joined by a space, in id order, `rows` passages at a time."""
        for batch in self._table.select(["title", "text"]).to_batches(max_chunksize=rows):
            yield [f"{title} {text}" for title, text in zip(*(column.to_pylist() for column in batch.columns))]

    def padded_token_ids(self, column: str, ids, pad_id: int) -> np.ndarray:
        """Token ids of the given rows, right-padded with pad_id to the longest: int64 [len(ids), L]."""
        rows = self._table.column(column).take(pa.array(np.asarray(ids, dtype=np.int64).ravel())).to_pylist()
        out = np.full((len(rows), max(map(len, rows), default=1) or 1), pad_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def token_ids(self, column: str, start: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of rows [start, end) as (flat values, offsets): zero-copy from the mapped file when the rows
        lie in one record batch, else copied into memory once (a shard actor's token ids are resident memory)."""
        chunk = self._table.column(column).slice(start, (end if end is not None else len(self)) - start)
        lists = chunk.combine_chunks()
        offsets = lists.offsets.to_numpy()
        values = lists.values.to_numpy()
        return values[offsets[0] : offsets[-1]], offsets - offsets[0]


PASSAGE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("generator_ids", pa.list_(pa.int32())),
        ("encoder_ids", pa.list_(pa.int32())),
    ]
)
ROWS_PER_RECORD_BATCH = 65536  # the most rows of one record batch in the file


@contextmanager
def passage_table_writer(path: str | Path) -> Iterator[Callable[[dict[str, Sequence]], None]]:
    """Write the passage table (an Arrow IPC file) atomically, rows appended in order by the function this yields:
    each call takes a chunk of rows as columns (id, title, text, generator_ids, encoder_ids). The file appears
    under its name (temp name, fsync, rename) when the block ends without an exception."""
    with atomic_output(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, PASSAGE_SCHEMA) as writer:

        def append(columns: dict[str, Sequence]) -> None:
            chunk = pa.table(
                {name: pa.array(columns[name], PASSAGE_SCHEMA.field(name).type) for name in PASSAGE_SCHEMA.names},
                schema=PASSAGE_SCHEMA,
            )
            writer.write_table(chunk, max_chunksize=ROWS_PER_RECORD_BATCH)

        yield append


def write_passage_table(path: str | Path, columns: dict[str, Sequence]) -> None:
    """Write a whole passage table at once (passage_table_writer with one chunk)."""
    with passage_table_writer(path) as append:
        append(columns)


def shard_ranges(num_passages: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ids [0, n) into num_shards contiguous ranges whose sizes differ by at most one."""
    bounds = np.linspace(0, num_passages, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
