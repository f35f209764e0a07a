"""Shared fixtures: one real Ray for the whole session, a tiny knowledge base built with the real code, and a
command run in this process (`run`) or as a real command line (`cli`).

Plain helpers (tiny configs, made-up documents, actor names, running a command) are in helpers.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import ray

from rag_lightning.config import IndexConfig
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers.ray_runtime import RAY_ADDRESS_ENV, connect

from helpers import TEST_NAMESPACE, call_main, cli_env, run_cli, tiny_kb_config, write_documents


@pytest.fixture(scope="module")
def two_shard_kb(tmp_path_factory) -> Path:
    """A Flat knowledge base of 30 passages (10 made-up documents) in 2 shards, built once per test module."""
    source = tmp_path_factory.mktemp("source") / "kb.jsonl"
    write_documents(source, 10)
    kb_dir = tmp_path_factory.mktemp("kb")
    build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(factory="Flat", shards=2))
    return kb_dir


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray started once for the session (2 CPUs, dashboard off), through the project's connect()."""
    os.environ.pop(RAY_ADDRESS_ENV, None)  # never attach to a job that happens to run beside the tests
    address = connect(namespace=TEST_NAMESPACE, num_cpus=2)
    yield address
    ray.shutdown()
    os.environ.pop(RAY_ADDRESS_ENV, None)


@pytest.fixture
def subprocess_env():
    return cli_env()


@pytest.fixture
def run(capfd):
    """run(module, overrides, cwd, run_dir=None): the command's main() in this process (helpers.call_main: for
    what does not start Ray), as a CompletedProcess with its exit code and what it wrote to stdout and stderr."""

    def run(module: str, overrides: list[str], cwd: Path, run_dir: Path | None = None) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = call_main(module, overrides, cwd, run_dir)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess([module, *overrides], code, out, err)

    return run


@pytest.fixture
def cli():
    """cli(module, overrides, cwd, run_dir=None): the real command line, in a subprocess (helpers.run_cli)."""
    return run_cli
