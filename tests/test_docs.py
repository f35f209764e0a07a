"""The documentation: README.md a front page whose links and Layout hold, docs/ built strictly by mkdocs, and the
configuration reference what the schema says today."""

from __future__ import annotations

import re
import subprocess
import sys

from rag_lightning.config_reference import reference

from helpers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_the_configuration_reference_is_current():
    """docs/reference/configuration.md is generated; regenerate it with
    `python -m rag_lightning.config_reference > docs/reference/configuration.md`."""
    assert (REPO_ROOT / "docs" / "reference" / "configuration.md").read_text() == reference()


def test_the_readme_is_a_front_page_whose_links_resolve():
    assert len(README.splitlines()) <= 250
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", README) if "://" not in t and t[0] != "#"]
    assert targets, "the README links to the docs"
    missing = [t for t in targets if not (REPO_ROOT / t).exists()]
    assert not missing, missing


def test_the_readme_layout_names_every_part_of_the_tree():
    """Each folder of the repository and each subpackage of rag_lightning appears in README's Layout section."""
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    parts = {line.split("/")[0] + "/" for line in tracked.splitlines() if "/" in line}
    parts |= {p.parent.name + "/" for p in (REPO_ROOT / "rag_lightning").glob("*/__init__.py")}
    missing = sorted(p for p in parts if p not in layout)
    assert not missing, f"README's Layout does not name {missing}"


def test_the_docs_build_strictly(tmp_path):
    """mkdocs fails on a broken link or a page missing from the nav (--strict makes its warnings errors)."""
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
