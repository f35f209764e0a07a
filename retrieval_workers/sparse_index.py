"""The BM25 index beside the dense one: built once over the whole knowledge base, stored one file per shard.

bm25s tokenizes (lower-case, its English stop words, PyStemmer's English Snowball stemmer) and computes the BM25
weight of every (term, passage) pair with corpus-wide statistics: document frequencies and the average length over
every passage of the knowledge base. The weights are then cut by shard: a shard's file holds its passages' columns
of the term-major (CSC) weight matrix. A passage's score is the sum of its weights over the question's terms, added
in the question's term order, so a shard scores its passages exactly as one index over the whole knowledge base
does, and the merged top-k over the shards is that index's top-k (ties broken by passage id).

The index depends on the passages' text alone: a refresh re-encodes the dense side and leaves these files as
they are. They live in a folder of their own (bm25-<hash>/), listed with checksums in the manifest, whose
`sparse` entry records the tokenization and BM25 settings the files were built with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer
from tqdm import tqdm

from retrieval_workers.kb_store import KnowledgeBaseError, Manifest, PassageTable, shard_sparse_name, verify_file

VOCABULARY = "vocabulary.json"
CHUNK_PASSAGES = 10_000  # passages tokenized at a time


@dataclass(frozen=True)
class Bm25Settings:
    """How the BM25 index tokenizes and scores; recorded in the manifest's `sparse` entry."""

    kind: str = "bm25"
    library: str = f"bm25s {bm25s.__version__}"
    method: str = "lucene"  # bm25s' scoring variant (Lucene's idf, never negative)
    k1: float = 1.5
    b: float = 0.75
    lower: bool = True
    stopwords: str = "en"  # bm25s' English stop-word list
    stemmer: str = "english"  # PyStemmer's Snowball stemmer


def new_tokenizer(settings: dict) -> bm25s.tokenization.Tokenizer:
    """The tokenizer the settings (a manifest's `sparse` entry) describe, with an empty vocabulary."""
    return bm25s.tokenization.Tokenizer(
        lower=settings["lower"], stopwords=settings["stopwords"], stemmer=Stemmer.Stemmer(settings["stemmer"])
    )


def build_sparse_index(passages: PassageTable, shards: list[tuple[int, int]], folder: Path) -> dict:
    """Write the BM25 index of the passages (title and text) into `folder`: the vocabulary and one weight file per
    shard. Returns the manifest's `sparse` entry (without the folder's name)."""
    settings = asdict(Bm25Settings())
    tokenizer = new_tokenizer(settings)
    corpus: list[list[int]] = []
    chunks = passages.joined_texts(CHUNK_PASSAGES)
    total = -(-len(passages) // CHUNK_PASSAGES)
    for chunk in tqdm(chunks, total=total, desc="BM25 tokenizing", unit="chunk", mininterval=2.0):
        corpus += tokenizer.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False, allow_empty=False)
    vocabulary = tokenizer.get_vocab_dict()
    weights = bm25s.BM25(k1=settings["k1"], b=settings["b"], method=settings["method"]).build_index_from_ids(
        unique_token_ids=list(range(len(vocabulary))), corpus_token_ids=corpus, show_progress=False
    )
    data, weighted, term_starts = weights["data"], weights["indices"], weights["indptr"]  # weighted: passage ids
    terms = np.repeat(np.arange(len(vocabulary), dtype=np.int32), np.diff(term_starts))
    for shard, (start, end) in enumerate(shards):
        mine = (weighted >= start) & (weighted < end)
        counts = np.bincount(terms[mine], minlength=len(vocabulary))
        np.savez(
            folder / shard_sparse_name(shard),
            data=data[mine].astype(np.float32),
            passages=(weighted[mine] - start).astype(np.int32),
            term_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            num_passages=np.int64(end - start),
        )
    (folder / VOCABULARY).write_text(json.dumps(vocabulary))
    lengths = np.fromiter(map(len, corpus), dtype=np.int64, count=len(corpus))
    return {**settings, "vocabulary": len(vocabulary), "num_passages": len(corpus), "avg_length": float(lengths.mean())}


def check_sparse_files(kb_dir: str | Path, manifest: Manifest) -> None:
    """Refuse a sparse index whose shard files do not hold the passages the manifest gives their shards (reads only
    each file's passage count, not its weights); a knowledge base without one passes."""
    if manifest.sparse is None:
        return
    for shard in range(len(manifest.shards)):
        check_sparse_file(kb_dir, manifest, shard)


def check_sparse_file(kb_dir: str | Path, manifest: Manifest, shard: int) -> Path:
    """The path of the shard's BM25 file, refused (KnowledgeBaseError naming it) where it is missing or holds
    another number of passages than the manifest gives the shard."""
    path = Path(kb_dir) / manifest.sparse_file(shard)
    if not path.is_file():
        raise KnowledgeBaseError(f"{path}: missing (listed in the manifest's sparse index)")
    with np.load(path) as arrays:
        found = int(arrays["num_passages"])
    start, end = manifest.shards[shard]
    if found != end - start:
        raise KnowledgeBaseError(
            f"{path}: a BM25 index of {found} passages, but the manifest gives shard {shard} {end - start} "
            f"(ids {start}..{end - 1}); rebuild the knowledge base with index.sparse=bm25"
        )
    return path


class SparseShard:
    """The BM25 scores of one shard's passages for a batch of questions: a term's passages and weights are a slice
    of the shard's file (term_starts gives where), and a question reads only its terms' slices."""

    def __init__(self, kb_dir: str | Path, manifest: Manifest, shard: int):
        assert manifest.sparse is not None
        check_sparse_file(kb_dir, manifest, shard)
        self.tokenizer = new_tokenizer(manifest.sparse)
        vocabulary_file = verify_file(kb_dir, manifest, f"{manifest.sparse['dir']}/{VOCABULARY}")
        self.tokenizer.stem_to_sid = json.loads(vocabulary_file.read_text())
        with np.load(verify_file(kb_dir, manifest, manifest.sparse_file(shard))) as arrays:
            self.data, self.passages, self.term_starts = arrays["data"], arrays["passages"], arrays["term_starts"]
            self.num_passages = int(arrays["num_passages"])

    def matches(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each text, the positions in the shard of the passages holding any of its terms, ascending, and their
        BM25 scores (float32): only the postings of the text's terms are read, whatever the shard's size."""
        found = []
        for terms in self.tokenizer.tokenize(
            texts, update_vocab=False, return_as="ids", show_progress=False, allow_empty=False
        ):
            spans = [slice(self.term_starts[term], self.term_starts[term + 1]) for term in terms]
            positions = np.concatenate([self.passages[span] for span in spans] or [np.zeros(0, np.int32)])
            weights = np.concatenate([self.data[span] for span in spans] or [np.zeros(0, np.float32)])
            passages, slot = np.unique(positions, return_inverse=True)
            scores = np.zeros(len(passages), dtype=np.float32)
            np.add.at(scores, slot, weights)  # in order, so each passage's weights add up in the text's term order
            found.append((passages.astype(np.int64), scores))
        return found

    @staticmethod
    def top_k(matches: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
        """The positions of each text's k best passages (matches' order), best first and ties by position:
        int64 [B, k], -1 where fewer match."""
        best = np.full((len(matches), k), -1, dtype=np.int64)
        for row, (passages, scores) in zip(best, matches):
            chosen = passages[np.lexsort((passages, -scores))[:k]]
            row[: len(chosen)] = chosen
        return best

    @staticmethod
    def scores_of(matches: list[tuple[np.ndarray, np.ndarray]], positions: np.ndarray) -> np.ndarray:
        """The BM25 score of the passages at positions [B, k] for each text (0 where it holds none of the text's
        terms, -inf at position -1): float32 [B, k]."""
        out = np.zeros(positions.shape, dtype=np.float32)
        for row, wanted, (passages, scores) in zip(out, positions, matches):
            at = np.searchsorted(passages, wanted)
            held = at < len(passages)
            held[held] = passages[at[held]] == wanted[held]
            row[held] = scores[at[held]]
        return np.where(positions >= 0, out, -np.inf).astype(np.float32)
