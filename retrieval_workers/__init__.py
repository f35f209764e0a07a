"""The retrieval side: the knowledge base's on-disk format, the Ray actors that serve its index shards and re-encode
it, and the Ray runtime they run on. It imports nothing of Lightning, Hydra or rag_lightning.

The names below are the typed API the training side (rag_lightning) uses, and the only names it imports from
here. Each is imported from its module on first use, so that a shard actor, which needs only its own module, does
not import Ray's driver side, torch and transformers with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval_workers.atomic_files import DISK_FULL, atomic_write_bytes, staged_directory
    from retrieval_workers.encoding import POOLER, TextEncoder, encoder_class
    from retrieval_workers.kb_lock import LOCK_NAME, KnowledgeBaseBusy, writer_lock
    from retrieval_workers.kb_store import (
        KnowledgeBaseError,
        Manifest,
        PassageTable,
        activate_kept_version,
        commit_version,
        load_embeddings,
        passage_table_writer,
        read_manifest,
        read_version_step,
        sha256_file,
        shard_ranges,
        write_version_info,
    )
    from retrieval_workers.ray_runtime import (
        RAY_ADDRESS_ENV,
        RayUnreachable,
        check_reachable,
        connect,
        local_ray_answers,
    )
    from retrieval_workers.refresh import coordinator_name, launch_refresher, shutdown_refresher
    from retrieval_workers.service import (
        RetrievalClient,
        ShardUnavailable,
        launch_service,
        shutdown_service,
        switch_version,
        union_columns,
    )
    from retrieval_workers.shard_build import ShardTimes, build_index, build_shard, write_shard
    from retrieval_workers.sparse_index import build_sparse_index, check_sparse_files
    from retrieval_workers.types import RefreshReport, RefreshSpec, RetrievalWorkersError, SearchResult, ServiceSpec

_MODULES = {
    "atomic_files": ("DISK_FULL", "atomic_write_bytes", "staged_directory"),
    "encoding": ("POOLER", "TextEncoder", "encoder_class"),
    "kb_lock": ("LOCK_NAME", "KnowledgeBaseBusy", "writer_lock"),
    "kb_store": (
        "KnowledgeBaseError",
        "Manifest",
        "PassageTable",
        "activate_kept_version",
        "commit_version",
        "load_embeddings",
        "passage_table_writer",
        "read_manifest",
        "read_version_step",
        "sha256_file",
        "shard_ranges",
        "write_version_info",
    ),
    "ray_runtime": ("RAY_ADDRESS_ENV", "RayUnreachable", "check_reachable", "connect", "local_ray_answers"),
    "refresh": ("coordinator_name", "launch_refresher", "shutdown_refresher"),
    "service": (
        "RetrievalClient",
        "ShardUnavailable",
        "launch_service",
        "shutdown_service",
        "switch_version",
        "union_columns",
    ),
    "shard_build": ("ShardTimes", "build_index", "build_shard", "write_shard"),
    "sparse_index": ("build_sparse_index", "check_sparse_files"),
    "types": ("RefreshReport", "RefreshSpec", "RetrievalWorkersError", "SearchResult", "ServiceSpec"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
