"""The package as a user installs it: a wheel (not an editable install) holds every module and every config, and
its commands run from a folder outside the checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO_ROOT, TINY, cli_env

COMMANDS = ("rag-train", "rag-build-kb", "rag-evaluate", "rag-generate", "rag-export", "rag-plan")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("rag_lightning-*.whl")
    return built


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        str(p.relative_to(REPO_ROOT))
        for package in ("rag_lightning", "retrieval_workers")
        for p in (REPO_ROOT / package).rglob("*.py")
    }
    expected |= {f"rag_lightning/{p.relative_to(REPO_ROOT)}" for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    expected |= {"rag_lightning/py.typed", "retrieval_workers/py.typed"}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"


@pytest.mark.slow
def test_an_installed_wheel_trains_from_any_folder(wheel, tmp_path):
    """A fresh virtual environment with the wheel installed (without -e; the dependencies are this environment's,
    seen through a path entry) runs `rag-train experiment=tiny` from an empty folder to results.json, and every
    other command finds its config there. Its commands run without PYTHONPATH, which may name a checkout (one
    whose rag_lightning would be imported instead of the wheel's)."""
    venv = tmp_path / "venv"
    env = {name: value for name, value in cli_env().items() if name != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            env=env,
            text=True,
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.check_output(
        [venv / "bin" / "python", "-c", "import rag_lightning.config as c; print(c.__file__, c.conf_dir())"],
        cwd=elsewhere,
        env=env,
        text=True,
    ).split()
    assert all(path.startswith(str(site)) for path in where), where

    run = subprocess.run(
        [venv / "bin" / "rag-train", "experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train/steps"] == TINY.trainer.max_steps and "test/em" in results
    for command in COMMANDS[1:]:
        shown = subprocess.run(
            [venv / "bin" / command, "--cfg", "job"],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert shown.returncode == 0 and "Primary config" not in shown.stderr, (command, shown.stderr[-2000:])
