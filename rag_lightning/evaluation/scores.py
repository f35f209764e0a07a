"""Evaluation scores: each example's scores, summed over a split (and over processes), then turned into metrics.

An evaluated example is a record (question, prediction, gold answers and titles, the
retrieved passages, and its `scores`). `SplitScores` adds records up; its metrics are the
whole split's once every process's sums are added together.
"""
from __future__ import annotations

from collections.abc import Callable

from rag_lightning.evaluation.metrics import answer_in_passages, exact_match, f1_score


def example_scores(prediction: str, answers: list[str], gold_titles: list[str],
                   retrieved: list[tuple[str, str]], nll: float) -> dict[str, float]:
    """One example's scores: EM, F1, answer recall over the k retrieved (title, text) passages, answer NLL, and
    gold-passage recall when the gold titles are known."""
    k = len(retrieved)
    scores = {"em": exact_match(prediction, answers), "f1": f1_score(prediction, answers),
              f"recall@{k}": answer_in_passages([text for _, text in retrieved], answers), "loss": nll}
    if gold_titles:
        scores[f"gold_recall@{k}"] = float(any(title in gold_titles for title, _ in retrieved))
        scores["gold_examples"] = 1.0
    return scores


def sum_names(n_docs: int) -> list[str]:
    """The scores a split sums up; gold-passage recall and the count of examples it applies to come last."""
    return ["em", "f1", f"recall@{n_docs}", "loss", f"gold_recall@{n_docs}", "gold_examples"]


class SplitScores:
    """The sums of the per-example scores of one evaluated split, and every example's record."""

    def __init__(self, n_docs: int):
        self.n_docs = n_docs
        self.sums = dict.fromkeys(sum_names(n_docs), 0.0)
        self.examples = 0
        self.records: list[dict] = []

    def add(self, records: list[dict]) -> None:
        for record in records:
            for name, value in record["scores"].items():
                self.sums[name] += value
        self.examples += len(records)
        self.records.extend(records)

    def metrics(self, prefix: str, add_up: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        """The split's metrics: means over its examples, gold-passage recall over the examples whose gold titles
        are known (left out when none are). `add_up` sums the counts of every process (DDP); None for one."""
        names = sum_names(self.n_docs)
        totals = [self.sums[name] for name in names] + [float(self.examples)]
        totals = add_up(totals) if add_up is not None else totals
        sums, examples = dict(zip(names, totals[:-1])), totals[-1]
        metrics = {f"{prefix}/{name}": sums[name] / max(examples, 1.0) for name in names[:4]}
        metrics[f"{prefix}/examples"] = float(examples)
        if sums["gold_examples"]:
            gold = f"gold_recall@{self.n_docs}"
            metrics[f"{prefix}/{gold}"] = sums[gold] / sums["gold_examples"]
        return metrics
