"""Shared fixtures: one real Ray for the whole session, a tiny knowledge base built with the real code, a command
run in this process (`run`) or as a real command line (`cli`), and training runs shared by the whole session
(`trained_run`); and the order the test files run in.

Plain helpers (tiny configs, made-up documents, actor names, running a command) are in helpers.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from rag_lightning.config import IndexConfig
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers.ray_runtime import RAY_ADDRESS_ENV, connect

from helpers import DDP_COMPARISON, TEST_NAMESPACE, call_main, cli_env, run_cli, tiny_kb_config, write_documents

# The test files that take longest, longest first (about 6 to 1 minutes each on 2 cores; the others take less).
# With `-n 3 --dist loadfile` (CI) each file runs whole on one worker and the workers take the files in this order,
# the others after them: a long file taken last would run alone at the end while the other workers idle.
LONGEST_FIRST = [
    "test_user_tools.py",
    "test_multinode.py",
    "test_train_cli.py",
    "test_slurm.py",
    "test_causal_generator.py",
    "test_bad_input.py",
    "test_refresh.py",
    "test_wheel.py",
    "test_training.py",
    "test_wandb.py",
    "test_smollm2.py",
]


def pytest_configure(config):
    # pytest-xdist orders the files by their number of tests unless told not to, which puts the end-to-end files
    # (few tests, each long) last: keep the order pytest_collection_modifyitems makes
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(scope="module")
def two_shard_kb(tmp_path_factory) -> Path:
    """A Flat knowledge base of 30 passages (10 made-up documents) in 2 shards, built once per test module."""
    source = tmp_path_factory.mktemp("source") / "kb.jsonl"
    write_documents(source, 10)
    kb_dir = tmp_path_factory.mktemp("kb")
    build_knowledge_base(tiny_kb_config(source, kb_dir), IndexConfig(factory="Flat", shards=2))
    return kb_dir


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory, request) -> Path:
    """The cache of converted models (the bundled SmolLM2's plain folder) for the whole session, shared by the
    xdist workers (the conversion locks it), so that no test writes to ~/.cache and the conversion runs once."""
    from rag_lightning.model.smollm2 import CACHE_ENV

    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: the session's folder is above each worker's
        shared = shared.parent
    os.environ[CACHE_ENV] = str(shared / "model_cache")  # the commands the tests run see it too (cli_env)
    return shared / "model_cache"


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, request) -> Callable[[str, list[str]], Path]:
    """trained_run(name, overrides) -> the run dir of `python -m rag_lightning.train overrides...` (a subprocess),
    trained once for the whole session: by the first test to ask, in whichever module and xdist worker; every other
    test asking for the same name reuses it (waiting while it trains). For runs whose files tests only read."""
    shared = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: the session's folder is above each worker's
        shared = shared.parent
    shared = shared / "trained_runs"

    def trained(name: str, overrides: list[str]) -> Path:
        folder = shared / name
        folder.mkdir(parents=True, exist_ok=True)
        run_dir = folder / "run"
        with open(folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            asked = folder / "overrides.json"
            if asked.exists():
                assert json.loads(asked.read_text()) == overrides, f"{name!r} asked for with other overrides"
            asked.write_text(json.dumps(overrides))
            if not (run_dir / "results.json").is_file():  # written last, by a run that succeeded
                shutil.rmtree(run_dir, ignore_errors=True)  # what a failed try left
                proc = run_cli("rag_lightning.train", overrides, folder, run_dir)
                (folder / "output.txt").write_text(proc.stdout + proc.stderr)
                assert proc.returncode == 0, proc.stderr[-3000:]
        return run_dir

    return trained


@pytest.fixture(scope="session")
def tiny_run(trained_run) -> Path:
    """The run dir of `python -m rag_lightning.train experiment=tiny` (the default model, rag_sequence, on a Flat
    index of 2 shards; 4 test questions with their gold titles), trained once for the session."""
    return trained_run("tiny", ["experiment=tiny"])


@pytest.fixture(scope="session")
def one_process_reference(trained_run) -> dict:
    """results.json of the run the DDP tests compare theirs with (helpers.assert_trained_alike): DDP_COMPARISON in
    one process, with Lightning's DDP strategy on one device and batch 8, trained once for the session."""
    overrides = [*DDP_COMPARISON, "trainer.strategy=ddp", "data.batch_size=8"]
    return json.loads((trained_run("one_process_reference", overrides) / "results.json").read_text())
