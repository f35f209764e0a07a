"""Build a knowledge base: `python -m rag_lightning.build_kb kb.source=passages.tsv kb.dir=my_kb [index=hnsw]`.

`kb.source` is a TSV, CSV or JSONL file of documents, or a knowledge base in transformers' RAG
format (a `datasets` folder, with `kb.source_index` its FAISS index file). The steps are in
rag_lightning/kb/build.py.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rag_lightning.config import CONF_DIR, checked, register_configs
from rag_lightning.errors import exit_on_user_error
from rag_lightning.kb.build import build_knowledge_base


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="build_kb")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cfg = checked(cfg)
    build_knowledge_base(cfg.kb, cfg.index)


register_configs()

if __name__ == "__main__":
    main()
