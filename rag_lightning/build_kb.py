"""Build a knowledge base: `python -m rag_lightning.build_kb kb.source=passages.tsv kb.dir=my_kb [index=hnsw]`.

`kb.source` is a TSV, CSV or JSONL file of documents, or a knowledge base in transformers' RAG
format (a `datasets` folder, with `kb.source_index` its FAISS index file). The steps are in
rag_lightning/kb/build.py.
"""

from __future__ import annotations

from rag_lightning.command import command
from rag_lightning.config import BuildKBConfig
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers import writer_lock


def build_kb(cfg: BuildKBConfig) -> None:
    """Build the knowledge base cfg.kb names, holding its folder's writer lock."""
    with writer_lock(cfg.kb.dir, "kb.dir"):  # refused while a job writes there (retrieval_workers/kb_lock.py)
        build_knowledge_base(cfg.kb, cfg.index)


main = command("build_kb")(build_kb)  # python -m rag_lightning.build_kb, or rag-build-kb


if __name__ == "__main__":
    main()
