"""Evaluation scores: per-example scores summed over a split (and over processes), then turned into metrics."""
from __future__ import annotations


def eval_sum_names(n_docs: int) -> list[str]:
    """The per-example scores evaluation sums up, gold-passage recall and the count of examples it applies to last."""
    return ["em", "f1", f"recall@{n_docs}", "loss", f"gold_recall@{n_docs}", "gold_examples"]


def eval_metrics(prefix: str, sums: dict[str, float], examples: float, n_docs: int) -> dict[str, float]:
    """A split's metrics from the sums of its per-example scores: means over its examples, and gold-passage
    recall over the examples whose gold titles are known (left out when none are)."""
    metrics = {f"{prefix}/{name}": sums.get(name, 0.0) / max(examples, 1.0)
               for name in eval_sum_names(n_docs)[:4]}
    metrics[f"{prefix}/examples"] = float(examples)
    if sums.get("gold_examples"):
        metrics[f"{prefix}/gold_recall@{n_docs}"] = sums[f"gold_recall@{n_docs}"] / sums["gold_examples"]
    return metrics
