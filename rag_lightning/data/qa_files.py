"""Reading question-answer files, checked line by line.

Two formats per split: `{split}.jsonl` with {"question": str, "answers": [str, ...]} a line
(and optionally "gold_titles": [str, ...], the titles of the passages that hold the answer,
for evaluation's gold-passage recall), or transformers' RAG example pair `{split}.source`
(one question a line) and `{split}.target` (its answer; several separated by tabs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rag_lightning.errors import UserError
from rag_lightning.text_files import jsonl_rows, read_utf8, utf8_lines


@dataclass
class QAExample:
    question: str
    answers: list[str]
    gold_titles: list[str] = field(default_factory=list)  # empty: the gold passages are not known


def find_split(data_dir: str | Path, split: str) -> Path:
    """The file holding a split: `{split}.jsonl`, else `{split}.source` (with its .target)."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / f"{split}.jsonl", data_dir / f"{split}.source"):
        if candidate.is_file():
            return candidate
    raise UserError(f"data.dir: no {split}.jsonl or {split}.source in {data_dir}")


def read_split(data_dir: str | Path, split: str) -> list[QAExample]:
    path = find_split(data_dir, split)
    examples = _read_jsonl(path) if path.suffix == ".jsonl" else _read_source_target(path, path.with_suffix(".target"))
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def _read_jsonl(path: Path) -> list[QAExample]:
    examples = []
    for number, row in jsonl_rows(path, utf8_lines(path)):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserError(f"{path}:{number}: needs a non-empty string 'question'")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise UserError(f"{path}:{number}: needs 'answers', a non-empty list of non-empty strings")
        gold_titles = row.get("gold_titles", [])
        if not isinstance(gold_titles, list) or not all(isinstance(t, str) for t in gold_titles):
            raise UserError(f"{path}:{number}: 'gold_titles', when given, must be a list of strings")
        examples.append(
            QAExample(row["question"].strip(), [a.strip() for a in answers], [t.strip() for t in gold_titles])
        )
    return examples


def _read_source_target(source: Path, target: Path) -> list[QAExample]:
    if not target.is_file():
        raise UserError(f"{target}: missing (every .source file needs its .target)")
    questions, answers = read_utf8(source).splitlines(), read_utf8(target).splitlines()
    if len(questions) != len(answers):
        raise UserError(
            f"{source} has {len(questions)} lines but {target} has {len(answers)}; they must pair line by line"
        )
    examples = []
    for number, (question, answer) in enumerate(zip(questions, answers), 1):
        golds = [a.strip() for a in answer.split("\t") if a.strip()]
        if not question.strip():
            raise UserError(f"{source}:{number}: empty question")
        if not golds:
            raise UserError(f"{target}:{number}: no answer")
        examples.append(QAExample(question.strip(), golds))
    return examples
