"""data=nq_open reads the file the user names (data.source): the format docs/data.md describes, and one clear error
line when the file is not given, missing or not that format."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from rag_lightning.data.prepare import write_nq_open
from rag_lightning.errors import UserError

from helpers import cli_env

QUESTIONS = 10


def oracle_rows() -> list[dict]:
    """Rows as docs/data.md describes them: each question with one gold context among others, one row (the last)
    with no context marked gold (its first is taken), and one gold passage shared by two questions."""
    rows = []
    for i in range(QUESTIONS):
        gold = {"title": f"Title {i // 2} ", "text": f" passage {i // 2} ", "isgold": True}
        other = {"title": "Other", "text": f"a passage without the answer {i}", "isgold": False}
        rows.append({"question": f"question {i}?", "answers": [f"answer {i}"], "ctxs": [other, gold]})
    rows[-1]["ctxs"] = [{"title": "First", "text": "the first context"}]
    return rows


def write_source(path, rows: list) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_gold_passages_make_the_kb_and_the_questions_a_fixed_split(tmp_path):
    source = write_source(tmp_path / "nq.jsonl.gz", oracle_rows())
    write_nq_open(source, tmp_path / "data")
    # the distinct gold passages in file order, stripped; the other contexts are not passages
    assert read_jsonl(tmp_path / "data" / "kb.jsonl") == [
        *({"title": f"Title {j}", "text": f"passage {j}"} for j in range(QUESTIONS // 2)),
        {"title": "First", "text": "the first context"},
    ]
    splits = {name: read_jsonl(tmp_path / "data" / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert [len(splits[name]) for name in ("train", "val", "test")] == [8, 1, 1]
    questions = {q["question"]: q for split in splits.values() for q in split}
    assert questions["question 3?"] == {"question": "question 3?", "answers": ["answer 3"], "gold_titles": ["Title 1"]}
    assert questions[f"question {QUESTIONS - 1}?"]["gold_titles"] == ["First"]
    write_nq_open(source, tmp_path / "again")
    for name in ("train", "val", "test"):
        assert read_jsonl(tmp_path / "again" / f"{name}.jsonl") == splits[name], "the split is fixed"


@pytest.mark.parametrize(
    "source, fragments",
    [
        (None, ["data.source: data=nq_open needs data.source=PATH", "docs/data.md"]),
        ("missing.jsonl.gz", ["data.source:", "missing.jsonl.gz is not a file", "docs/data.md"]),
    ],
)
def test_a_source_not_given_or_missing_says_where_the_file_comes_from(tmp_path, source, fragments):
    with pytest.raises(UserError) as raised:
        write_nq_open(source and str(tmp_path / source), tmp_path / "data")
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "content, fragment",
    [
        ([json.dumps({"question": "q?", "answers": ["a"], "ctxs": []}), "{not json"], "nq.jsonl.gz:2: not an NQ-open"),
        (
            [json.dumps({"question": "q?", "answers": ["a"]})],
            "nq.jsonl.gz:1: not an NQ-open oracle row (KeyError('ctxs'))",
        ),
        (None, "nq.jsonl.gz cannot be read"),
    ],
)
def test_a_source_of_another_format_names_the_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "nq.jsonl.gz"
    if content is None:
        path.write_text("plain text, not gzip\n")
    else:
        write_source(path, content)
    with pytest.raises(UserError) as raised:
        write_nq_open(str(path), tmp_path / "data")
    assert fragment in str(raised.value)


@pytest.mark.slow
def test_training_on_nq_open_without_a_source_stops_with_one_error_line(tmp_path):
    """The real command line: exit code 2, one `error:` line naming data.source, before any knowledge base."""
    proc = subprocess.run(
        [sys.executable, "-m", "rag_lightning.train", "data=nq_open", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: data.source: data=nq_open needs data.source=PATH"), (
        proc.stderr[-3000:]
    )
    assert not (tmp_path / "run" / "kb").exists()
