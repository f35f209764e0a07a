"""The knowledge-base build: passages + token ids (Arrow), embeddings, sharded FAISS indexes.

`kb.source` may also be a knowledge base in transformers' RAG format (a `datasets` folder
with title, text and embeddings, e.g. from its use_own_knowledge_dataset.py, with
`kb.source_index` its FAISS index file): its passages and embeddings are imported as they
are and re-indexed into shards; kb.context_encoder must be the encoder that made them.

No stage holds the whole corpus: the passages stream from the source twice. The first pass
checks every row, counts the passages and trains the generator tokenizer on them (unless one
is given); the second tokenizes them CHUNK_PASSAGES at a time and appends each chunk to the
passage table. Each shard is then encoded from the memory-mapped table and indexed. So
nothing is encoded before the source file and the config have been checked.

The build writes new files beside any existing ones and commits by replacing manifest.json, so
an interrupted build leaves the previous knowledge base whole; a build that stops with an
exception (a stop signal arrives as one) also removes what it wrote that no committed manifest
references. An identical earlier build (same source bytes and settings) is reused. The seconds
of each stage are logged at the end (BuildStages).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path

import faiss
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from rag_lightning.config import IndexConfig, KBConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.encoders.folders import resolve_encoder
from rag_lightning.errors import UserError
from rag_lightning.kb.generator_tokenizer import extra_texts, load_generator_tokenizer, train_tokenizer
from rag_lightning.kb.hf_format import HFPassages, is_hf_passages_folder, read_hf_passages
from rag_lightning.kb.passage_text import PASSAGE_FORMAT, passage_text
from rag_lightning.kb.source import Passage, read_documents, split_into_passages
from retrieval_workers import (
    LOCK_NAME,
    KnowledgeBaseError,
    Manifest,
    PassageTable,
    ShardTimes,
    TextEncoder,
    build_shard,
    build_sparse_index,
    commit_version,
    passage_table_writer,
    read_manifest,
    sha256_file,
    shard_ranges,
    staged_directory,
    write_shard,
    write_version_info,
)

log = logging.getLogger(__name__)

CHUNK_PASSAGES = 10_000  # passages tokenized and appended to the passage table at a time
IDS_ONLY = {"return_attention_mask": False, "return_token_type_ids": False}  # the masks would be made as Python
#                                                                              lists, for nothing


@dataclass
class BuildStages(ShardTimes):
    """The passages of a build and the seconds of each stage; the shard stages (encode, index train, index add,
    write of the index and embeddings files) are summed over the shards."""

    passages: int = 0
    split_s: float = 0.0  # reading the source and splitting it into passages, both passes
    tokenizer_train_s: float = 0.0  # training the generator tokenizer, reading excluded
    tokenize_s: float = 0.0  # both tokenizers over every passage
    table_write_s: float = 0.0  # appending the tokenized chunks to the passage table
    sparse_s: float = 0.0  # the BM25 index (index.sparse=bm25): tokenizing, weighing, writing its files
    commit_s: float = 0.0  # checksums of the files and the manifest
    total_s: float = 0.0  # the whole build

    def seconds(self) -> dict[str, float]:
        """Seconds of each stage, in build order."""
        return {
            "split": self.split_s,
            "tokenizer_train": self.tokenizer_train_s,
            "tokenize": self.tokenize_s,
            "table_write": self.table_write_s,
            "sparse": self.sparse_s,
            "encode": self.encode_s,
            "index_train": self.index_train_s,
            "index_add": self.index_add_s,
            "write": self.write_s,
            "commit": self.commit_s,
        }

    def describe(self) -> str:
        stages = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds().items())
        return f"{self.passages} passages in {self.total_s:.1f} s: {stages}"


def check_index_config(index: IndexConfig, dim: int, num_passages: int | None) -> None:
    """Refuse a bad index config before any encoding, naming the key; with num_passages None, only what needs no
    passage count (before the source is read)."""
    if index.shards < 1 or index.replicas < 1:
        raise UserError(f"index.shards and index.replicas must be >= 1 (got {index.shards}, {index.replicas})")
    try:
        probe = faiss.index_factory(dim, index.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[-1]
        raise UserError(
            f"index.factory: {index.factory!r} is not a FAISS index factory string ({first_line})"
        ) from None
    if num_passages is None:
        return
    shard_size = num_passages // index.shards
    if shard_size < 1:
        raise UserError(f"index.shards={index.shards} is more than the {num_passages} passages")
    ivf = faiss.try_extract_index_ivf(probe)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else probe), "pq", None)
    needed = max(ivf.nlist if ivf is not None else 0, pq.ksub if pq is not None else 0)
    if needed and shard_size < needed:
        raise UserError(
            f"index.factory: {index.factory!r} needs at least {needed} passages per shard to train, "
            f"the smallest shard has {shard_size}; use a smaller index or fewer index.shards"
        )


def build_knowledge_base(kb: KBConfig, index: IndexConfig, stages: BuildStages | None = None) -> Manifest:
    """Build (or reuse) the knowledge base described by kb and index; returns its manifest. The passage count and
    the seconds of each stage go into `stages` when one is given (a reused build has no stages)."""
    started = time.perf_counter()
    stages = stages if stages is not None else BuildStages()
    if kb.source is None:
        raise UserError("kb.source: no source file given (a .tsv, .csv or .jsonl with title and text)")
    if kb.words_per_passage < 1:
        raise UserError(f"kb.words_per_passage must be >= 1 (got {kb.words_per_passage})")
    kb_dir = Path(kb.dir)
    _check_writable(kb_dir)
    imported = read_hf_passages(kb.source, kb.source_index) if is_hf_passages_folder(kb.source) else None
    if imported is None and kb.source_index is not None:
        raise UserError("kb.source_index: only for a kb.source that is a datasets folder (transformers' RAG format)")
    encoder_tokenizer = load_encoder_tokenizer(kb.context_encoder, "kb.context_encoder")
    encoder = build_encoder(kb.context_encoder, encoder_tokenizer, "kb.context_encoder").eval()
    if imported is not None and imported.embeddings.shape[1] != encoder.dim:
        raise UserError(
            f"kb.context_encoder: its dimension {encoder.dim} differs from the "
            f"{imported.embeddings.shape[1]} of the embeddings in {kb.source}; give the encoder that "
            "made them"
        )
    check_index_config(index, encoder.dim, None)

    fingerprint = _fingerprint(kb, index)
    previous = _existing_manifest(kb_dir)
    if previous is not None and previous.fingerprint == fingerprint and not kb.rebuild:
        log.info("knowledge base in %s is up to date (%d passages), reusing it", kb_dir, previous.num_passages)
        stages.passages = previous.num_passages
        return previous

    def passages() -> Iterator[Passage]:
        """A new pass over the passages, read as they are consumed; the reading time goes to stages.split_s."""
        return _timed(_source_passages(kb, imported), stages)

    log.info(
        "reading and checking %s%s",
        kb.source,
        "" if kb.generator_tokenizer.path else ", training the generator tokenizer on its passages",
    )
    generator_tokenizer, num_passages = _first_pass(kb, passages(), stages)
    check_index_config(index, encoder.dim, num_passages)
    stages.passages = num_passages
    tag = fingerprint[:12]
    version = previous.next_version() if previous is not None else 0
    tokenizer_dir, passages_file = f"generator_tokenizer-{tag}", f"passages-{tag}.arrow"
    sparse_dir = f"bm25-{tag}" if index.sparse else None
    try:
        with staged_directory(kb_dir / tokenizer_dir) as staging:
            generator_tokenizer.save_pretrained(str(staging))
        _write_passage_table(
            kb, kb_dir / passages_file, passages(), num_passages, generator_tokenizer, encoder_tokenizer, stages
        )
        manifest = _index_and_commit(
            kb,
            index,
            kb_dir,
            num_passages,
            imported,
            encoder,
            fingerprint,
            version,
            tokenizer_dir,
            passages_file,
            sparse_dir,
            stages,
        )
    except BaseException:
        # interrupted (a signal arrives as an exception) or failed: what the committed manifest does not reference
        # is this build's and goes; an earlier knowledge base in kb_dir stays whole
        _remove_uncommitted(
            kb_dir, [tokenizer_dir, passages_file, f"v{version}", *([sparse_dir] if sparse_dir else [])]
        )
        raise
    if previous is not None:
        try:
            _remove_unreferenced(kb_dir, previous, manifest)
        except BaseException:
            _remove_unreferenced(kb_dir, previous, manifest)  # stopped half way (a second signal is ignored)
            raise
    stages.total_s = time.perf_counter() - started
    log.info(
        "knowledge base ready in %s: %d passages, %d shards, index %s, version %d",
        kb_dir,
        num_passages,
        index.shards,
        index.factory,
        version,
    )
    log.info("build stages: %s", stages.describe())
    return manifest


def _source_passages(kb: KBConfig, imported: HFPassages | None) -> Iterator[Passage]:
    if imported is not None:
        return (Passage(title, text) for title, text in zip(imported.titles, imported.texts))
    assert kb.source is not None  # build_knowledge_base refused a missing one
    return split_into_passages(read_documents(kb.source), kb.words_per_passage)


def _timed(items: Iterable, stages: BuildStages) -> Iterator:
    """The items, with the time spent making each added to stages.split_s."""
    items = iter(items)
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            stages.split_s += time.perf_counter() - started
        yield item


def _first_pass(kb: KBConfig, passages: Iterator[Passage], stages: BuildStages) -> tuple[PreTrainedTokenizerBase, int]:
    """Read every passage once (every row checked): the generator tokenizer, trained on them as they stream by
    unless kb.generator_tokenizer.path gives one, and the number of passages."""
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for passage in passages:
            count += 1
            yield passage_text(passage.title, passage.text)

    if kb.generator_tokenizer.path:
        tokenizer = load_generator_tokenizer(kb.generator_tokenizer.path)
        deque(texts(), maxlen=0)
    else:
        started, reading_before = time.perf_counter(), stages.split_s
        tokenizer = train_tokenizer(
            kb.generator_tokenizer, chain(texts(), extra_texts(kb.generator_tokenizer.extra_texts))
        )
        stages.tokenizer_train_s = time.perf_counter() - started - (stages.split_s - reading_before)
    return tokenizer, count


def _write_passage_table(
    kb: KBConfig,
    path: Path,
    passages: Iterator[Passage],
    num_passages: int,
    generator_tokenizer: PreTrainedTokenizerBase,
    encoder_tokenizer: PreTrainedTokenizerBase,
    stages: BuildStages,
) -> None:
    """Tokenize the passages CHUNK_PASSAGES at a time and append each chunk to the passage table at path."""
    max_encoder_tokens = resolve_encoder(kb.context_encoder, "kb.context_encoder").max_length
    first_id = 0
    with passage_table_writer(path) as append:
        chunks = iter(lambda: list(islice(passages, CHUNK_PASSAGES)), [])
        for chunk in tqdm(
            chunks, total=-(-num_passages // CHUNK_PASSAGES), desc="tokenizing passages", unit="chunk", mininterval=2.0
        ):
            started = time.perf_counter()
            titles, texts = [p.title for p in chunk], [p.text for p in chunk]
            generator_ids = generator_tokenizer(
                [passage_text(p.title, p.text) for p in chunk],
                add_special_tokens=False,
                truncation=True,
                max_length=kb.max_passage_tokens,
                **IDS_ONLY,
            )["input_ids"]
            encoder_ids = encoder_tokenizer(titles, texts, truncation=True, max_length=max_encoder_tokens, **IDS_ONLY)[
                "input_ids"
            ]
            tokenized = time.perf_counter()
            append(
                {
                    "id": range(first_id, first_id + len(chunk)),
                    "title": titles,
                    "text": texts,
                    "generator_ids": generator_ids,
                    "encoder_ids": encoder_ids,
                }
            )
            stages.tokenize_s += tokenized - started
            stages.table_write_s += time.perf_counter() - tokenized
            first_id += len(chunk)
        closing = time.perf_counter()
    stages.table_write_s += time.perf_counter() - closing  # the file's end, fsync and rename


def _index_and_commit(
    kb: KBConfig,
    index: IndexConfig,
    kb_dir: Path,
    num_passages: int,
    imported: HFPassages | None,
    encoder: TextEncoder,
    fingerprint: str,
    version: int,
    tokenizer_dir: str,
    passages_file: str,
    sparse_dir: str | None,
    stages: BuildStages,
) -> Manifest:
    """Write index version `version` (every shard encoded from the passage table, or the imported embeddings
    indexed) and, with a sparse_dir, the BM25 index there; then commit the manifest."""
    manifest = Manifest(
        num_passages=num_passages,
        dim=encoder.dim,
        shards=shard_ranges(num_passages, index.shards),
        active_version=version,
        index_factory=index.factory,
        passages_file=passages_file,
        encoder={**asdict(kb.context_encoder), "generator_tokenizer": tokenizer_dir},
        fingerprint=fingerprint,
    )
    table = PassageTable(kb_dir / passages_file)
    if sparse_dir is not None:
        started = time.perf_counter()
        with staged_directory(kb_dir / sparse_dir) as staging:
            manifest.sparse = {**build_sparse_index(table, manifest.shards, staging), "dir": sparse_dir}
        for path in sorted((kb_dir / sparse_dir).iterdir()):
            manifest.files[f"{sparse_dir}/{path.name}"] = sha256_file(path)
        stages.sparse_s = time.perf_counter() - started
    with staged_directory(kb_dir / manifest.version_dir(version)) as staging:
        for shard, (start, end) in enumerate(manifest.shards):
            if imported is not None:
                stages.add(write_shard(staging, shard, imported.embeddings[start:end], index.factory))
            else:
                stages.add(build_shard(encoder, table, shard, start, end, index.factory, staging, kb.encode_batch_size))
        write_version_info(staging, version, global_step=0)
    started = time.perf_counter()
    manifest.files[passages_file] = sha256_file(kb_dir / passages_file)
    commit_version(kb_dir, manifest, version, keep=1)
    stages.commit_s = time.perf_counter() - started
    return manifest


def _remove_uncommitted(kb_dir: Path, names: list[str]) -> None:
    """Remove the entries of kb_dir with these names that the manifest on disk does not reference.

    Called when a build stops before or while committing: the manifest is read again, so what a commit that did
    happen references is kept, and so is everything of an earlier knowledge base.
    """
    committed = _existing_manifest(kb_dir)
    referenced = (
        set()
        if committed is None
        else ({relative.split("/")[0] for relative in committed.files} | {committed.encoder.get("generator_tokenizer")})
    )
    for name in set(names) - referenced:
        path = kb_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def _fingerprint(kb: KBConfig, index: IndexConfig) -> str:
    settings = {k: v for k, v in asdict(kb).items() if k not in ("dir", "rebuild", "encode_batch_size")}
    settings["index"] = {"factory": index.factory, "shards": index.shards, "sparse": index.sparse}
    settings["passage_format"] = PASSAGE_FORMAT
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in [kb.source, kb.source_index, *kb.generator_tokenizer.extra_texts]:
        if path is not None:  # a file, or every file of a datasets folder
            files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
            for file in files:
                digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def _existing_manifest(kb_dir: Path) -> Manifest | None:
    try:
        return read_manifest(kb_dir)
    except KnowledgeBaseError:
        return None


def _check_writable(kb_dir: Path) -> None:
    """Refuse a kb.dir that cannot be written, or a folder of other files that is no knowledge base.

    A build writes names of its own (v0/, passages-<hash>.arrow, ...) and replaces a folder of such a name, so
    a folder without a readable manifest.json may hold nothing but what an interrupted build left.
    """

    def foreign(entry: Path) -> bool:
        """Whether an entry of a folder without a manifest is not a leftover of an interrupted build."""
        if re.fullmatch(r"v\d+", entry.name):
            return not entry.is_dir() or not all(
                re.fullmatch(r"shard_\d+\.(faiss|embeddings\.npy)|version\.json", file.name) for file in entry.iterdir()
            )
        return not re.fullmatch(
            r"manifest\.json|passages-\w+\.arrow|generator_tokenizer-\w+|bm25-\w+|\..+\.(staging|tmp)"
            rf"|{re.escape(LOCK_NAME)}",
            entry.name,
        )

    try:
        kb_dir.mkdir(parents=True, exist_ok=True)
        others = [] if _existing_manifest(kb_dir) else sorted(e.name for e in kb_dir.iterdir() if foreign(e))
        if not others:
            with tempfile.NamedTemporaryFile(dir=kb_dir, prefix=".write_probe.", suffix=".tmp"):
                pass
    except OSError as e:
        raise UserError(f"kb.dir: {kb_dir} is not writable ({e.strerror})") from None
    if others:
        raise UserError(
            f"kb.dir: {kb_dir} is a folder of other files, not a knowledge base (no manifest.json; "
            f"found {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); give a new or empty "
            "folder"
        )


def _remove_unreferenced(kb_dir: Path, old: Manifest, new: Manifest) -> None:
    """Delete what the previous manifest listed and the new one does not (only our own files).

    The manifest is data on disk: a listed path that is absolute, leads out of kb_dir (through .. or a
    symlinked folder), is kb_dir itself or is a symlink is never deleted; it is logged and left as it is.
    """
    root = kb_dir.resolve()

    def inside(relative: str) -> Path | None:
        path = root / relative
        folder = path.parent.resolve()
        if path.name != ".." and folder.is_relative_to(root) and path != root and not path.is_symlink():
            return folder / path.name
        log.warning("not deleting %r listed in the previous manifest: not a file or folder inside %s", relative, kb_dir)
        return None

    keep = set(new.files) | {new.encoder["generator_tokenizer"]}
    folders = set()
    for relative in list(old.files) + [old.encoder.get("generator_tokenizer", "")]:
        if relative and relative not in keep and (path := inside(relative)) is not None:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            folders.add(path.parent)
    for folder in folders - {root}:  # the version folders emptied above
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
