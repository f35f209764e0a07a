"""Evaluation scores: each example's scores, summed over a split (and over processes), then turned into metrics.

An evaluated example is a record (question, gold answers and titles, the passages the reader
read, the ranks of the first passage holding an answer and of the first gold passage, and
its `scores`; with answers, also the prediction). Retrieval is scored at every k of a list,
however many passages the reader reads: recall@k (an answer string in the top k), mrr@k
(1 / the rank of the first such passage, 0 below k) and gold_recall@k (a passage of a gold
title in the top k, over the examples whose gold titles are known). `SplitScores` adds
records up; its metrics are the whole split's once every process's sums are added together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rag_lightning.evaluation.metrics import contains_answer, exact_match, f1_score
from retrieval_workers import PassageTable


def first_rank(hits: list[bool]) -> int | None:
    """The 1-based rank of the first hit, None if there is none."""
    return next((rank for rank, hit in enumerate(hits, 1) if hit), None)


def passage_ranks(
    ranked: list[tuple[str, str]], answers: list[str], gold_titles: list[str]
) -> tuple[int | None, int | None]:
    """The ranks of the first (title, text) passage holding an answer and of the first of a gold title."""
    return (
        first_rank([contains_answer(text, answers) for _, text in ranked]),
        first_rank([title in gold_titles for title, _ in ranked]),
    )


def retrieval_scores(answer_rank: int | None, gold_rank: int | None, has_gold: bool, ks: list[int]) -> dict[str, float]:
    """recall@k and mrr@k for every k, and gold_recall@k when the gold titles are known."""
    scores = {}
    for k in ks:
        found = answer_rank is not None and answer_rank <= k
        scores[f"recall@{k}"] = float(found)
        scores[f"mrr@{k}"] = 1.0 / answer_rank if answer_rank is not None and found else 0.0
        if has_gold:
            scores[f"gold_recall@{k}"] = float(gold_rank is not None and gold_rank <= k)
    if has_gold:
        scores["gold_examples"] = 1.0
    return scores


def ranked_records(
    batch: dict, ids: np.ndarray, listed_scores: np.ndarray, passages: PassageTable, ks: list[int]
) -> list[dict]:
    """A record of each question of the batch (its questions, answers and gold_titles) from its ranked passage
    ids [B, depth]: the first listed_scores.shape[1] passages listed with their scores, the ranks of the first
    passage holding an answer and of the first of a gold title, and its retrieval scores at every k of ks."""
    depth, listed = ids.shape[1], listed_scores.shape[1]
    ranked = passages.titles_and_texts(ids)
    records = []
    for i, (question, answers, gold_titles) in enumerate(
        zip(batch["questions"], batch["answers"], batch["gold_titles"])
    ):
        passages_of_question = ranked[i * depth : (i + 1) * depth]
        answer_rank, gold_rank = passage_ranks(passages_of_question, answers, gold_titles)
        records.append(
            {
                "question": question,
                "answers": answers,
                "gold_titles": gold_titles,
                "retrieved": [
                    {"id": int(ids[i, j]), "title": passages_of_question[j][0], "score": float(listed_scores[i, j])}
                    for j in range(listed)
                ],
                "answer_rank": answer_rank,
                "gold_rank": gold_rank,
                "scores": retrieval_scores(answer_rank, gold_rank, bool(gold_titles), ks),
            }
        )
    return records


def answer_scores(prediction: str, answers: list[str], nll: float) -> dict[str, float]:
    return {"em": exact_match(prediction, answers), "f1": f1_score(prediction, answers), "loss": nll}


class SplitScores:
    """The sums of the per-example scores of one evaluated split, and every example's record. `answers`: the
    records carry answer scores (EM, F1, NLL), not only retrieval scores."""

    def __init__(self, ks: list[int], answers: bool = True):
        answer_names = ["em", "f1", "loss"] if answers else []
        self.mean_names = answer_names + [f"{name}@{k}" for k in ks for name in ("recall", "mrr")]
        self.gold_names = [f"gold_recall@{k}" for k in ks]
        self.sums = dict.fromkeys(self.mean_names + self.gold_names + ["gold_examples"], 0.0)
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
        names = list(self.sums)
        totals = [self.sums[name] for name in names] + [float(self.examples)]
        totals = add_up(totals) if add_up is not None else totals
        sums, examples = dict(zip(names, totals[:-1])), totals[-1]
        metrics = {f"{prefix}/{name}": sums[name] / max(examples, 1.0) for name in self.mean_names}
        metrics[f"{prefix}/examples"] = float(examples)
        if sums["gold_examples"]:
            metrics.update({f"{prefix}/{name}": sums[name] / sums["gold_examples"] for name in self.gold_names})
        return metrics
