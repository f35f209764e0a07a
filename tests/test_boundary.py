"""The boundary between the two sides: retrieval_workers (the Ray side and the on-disk format) imports neither
Lightning, Hydra nor rag_lightning, and names the API the training side uses."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import retrieval_workers


def test_retrieval_workers_imports_no_training_side_module():
    modules = [f"retrieval_workers.{m.name}" for m in pkgutil.iter_modules(retrieval_workers.__path__)]
    assert len(modules) >= 9, modules
    check = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'hydra', 'omegaconf', 'rag_lightning'))\n"
        "print(','.join(loaded))\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"retrieval_workers loaded {proc.stdout.strip()}"


def test_the_api_names_every_name_the_training_side_imports_and_each_resolves():
    """retrieval_workers/__init__.py's __all__ is the typed API: each name imports from its module, and
    rag_lightning imports nothing else of retrieval_workers (the import-linter contract in pyproject.toml)."""
    missing = [name for name in retrieval_workers.__all__ if not hasattr(retrieval_workers, name)]
    assert not missing, f"retrieval_workers.__all__ names what it does not define: {missing}"
    assert "KnowledgeBaseError" in retrieval_workers.__all__ and "ServiceSpec" in retrieval_workers.__all__
    assert issubclass(retrieval_workers.KnowledgeBaseBusy, retrieval_workers.RetrievalWorkersError)
    assert issubclass(retrieval_workers.RayUnreachable, retrieval_workers.RetrievalWorkersError)
    assert issubclass(retrieval_workers.ShardUnavailable, retrieval_workers.RetrievalWorkersError)
