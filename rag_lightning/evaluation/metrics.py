"""Answer metrics: exact match and token F1 with SQuAD normalisation, and whether a passage holds an answer."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD's evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    return max(_token_f1(prediction, a) for a in answers)


def _token_f1(prediction: str, answer: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return float(predicted == gold)
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_patterns(answers: list[str]) -> set[str]:
    """The normalised answers, each between spaces: what contains_answer looks for in a normalised passage."""
    return {f" {normalize_answer(a)} " for a in answers if normalize_answer(a)}


def holds_pattern(passage: str, patterns: set[str]) -> bool:
    text = f" {normalize_answer(passage)} "
    return any(pattern in text for pattern in patterns)


def contains_answer(passage: str, answers: list[str]) -> bool:
    """Whether a normalised answer occurs, on word boundaries, in the normalised passage (DPR's answer match)."""
    return holds_pattern(passage, answer_patterns(answers))
