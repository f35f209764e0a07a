"""Knowledge bases in transformers' own RAG format: a `datasets` folder of passages plus a FAISS index file.

That is what transformers' `use_own_knowledge_dataset.py` writes and what
`RagRetriever.from_pretrained(..., index_name="custom", passages_path=..., index_path=...)`
reads: a dataset saved with `save_to_disk` whose rows hold `title`, `text` and `embeddings`
(one vector per passage), and a FAISS inner-product index over those vectors, row i being
passage i. The export command writes one; build_kb imports one (`kb.source=FOLDER`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from rag_lightning.errors import UserError
from retrieval_workers import build_index

COLUMNS = ("title", "text", "embeddings")


@dataclass
class HFPassages:
    titles: Sequence[str]  # read from the folder, the dataset's columns: rows are read as they are iterated
    texts: Sequence[str]
    embeddings: np.ndarray  # float32 [n, D]


def is_hf_passages_folder(path: str | Path) -> bool:
    """Whether path is a folder written by `datasets.Dataset.save_to_disk`."""
    return Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file()


def read_hf_passages(folder: str | Path, index_file: str | None = None) -> HFPassages:
    """The passages of a `datasets` folder, checked; with index_file, also check that index matches them."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"kb.source: {folder} is not a readable datasets folder ({e})") from None
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"kb.source: {folder} lacks the column(s) {', '.join(missing)} (found {', '.join(dataset.column_names)})"
        )
    if len(dataset) == 0:
        raise UserError(f"kb.source: {folder}: the knowledge base has no passages")
    titles, texts = dataset["title"], dataset["text"]
    for row, (title, text) in enumerate(zip(titles, texts)):
        if not isinstance(title, str) or not isinstance(text, str) or not text.strip():
            raise UserError(f"kb.source: {folder}: row {row} needs a string title and a non-empty text")
    embeddings = np.asarray(dataset.with_format("numpy")["embeddings"], dtype=np.float32)
    if embeddings.ndim != 2:
        raise UserError(f"kb.source: {folder}: 'embeddings' must hold one vector of one size per row")
    if index_file is not None:
        _check_index(index_file, *embeddings.shape)
    return HFPassages(titles, texts, embeddings)


def _check_index(index_file: str, rows: int, dim: int) -> None:
    if not Path(index_file).is_file():
        raise UserError(f"kb.source_index: file not found: {index_file}")
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError:
        raise UserError(f"kb.source_index: {index_file} is not a FAISS index file") from None
    if index.d != dim:
        raise UserError(
            f"kb.source_index: {index_file} indexes vectors of dimension {index.d}, "
            f"but the passages' embeddings have dimension {dim}"
        )
    if index.ntotal != rows:
        raise UserError(f"kb.source_index: {index_file} holds {index.ntotal} vectors for {rows} passages")


def write_hf_passages(folder: Path, index_file: Path, passages: HFPassages, factory: str) -> None:
    """Save the passages as a `datasets` folder and a FAISS inner-product index of type `factory` over them."""
    import datasets

    datasets.Dataset.from_dict(
        {"title": passages.titles, "text": passages.texts, "embeddings": passages.embeddings}
    ).save_to_disk(str(folder))
    vectors = np.ascontiguousarray(passages.embeddings, dtype=np.float32)
    faiss.write_index(build_index(vectors, factory), str(index_file))
