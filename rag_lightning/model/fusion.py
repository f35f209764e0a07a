"""How a question's dense and BM25 scores make RAG's prior over its candidates (retriever.fusion).

With a sparse index the service answers a question with the union of its dense and BM25 candidates, each with its
inner product q . d and its BM25 score. The prior's logits (doc_scores) are

    dense:  score_scale x (q . d)
    sparse: sparse_weight x s(bm25)
    hybrid: score_scale x (q . d) + sparse_weight x s(bm25)

where s standardises a question's BM25 scores by their mean and standard deviation over its candidates: a fixed
bias with no gradient, so the encoders train through the dense term alone. The candidates are ranked by the same
logits, so the fusion also chooses the passages the reader reads. A deeper search (evaluation at larger k) returns
a wider union; its standardisation still takes the candidates of the prior's width (retriever.candidates), so a
candidate's logit does not depend on how deep its question was searched.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import numpy as np
import torch

from rag_lightning.errors import UserError
from retrieval_workers import Manifest, SearchResult, union_columns

FUSIONS = ("dense", "sparse", "hybrid")
Scores = TypeVar("Scores", np.ndarray, torch.Tensor)


def standardised(bm25: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row of bm25 [B, W] less the mean of its entries where reference [B, W] is true, over their standard
    deviation (a reference of equal scores: zeros)."""
    counted = reference.sum(axis=1, keepdims=True)
    mean = np.where(reference, bm25, 0.0).sum(axis=1, keepdims=True) / counted
    centred = bm25 - mean
    spread = np.sqrt(np.where(reference, centred**2, 0.0).sum(axis=1, keepdims=True) / counted)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0).astype(np.float32)


def fused(dense_logits: Scores, sparse_logits: Scores, fusion: str) -> Scores:
    """The prior's logits from score_scale x (q . d) and sparse_weight x s(bm25)."""
    if fusion == "dense":
        return dense_logits
    if fusion == "sparse":
        return sparse_logits
    return dense_logits + sparse_logits


def rank_union(
    result: SearchResult, score_scale: float, fusion: str, sparse_weight: float, width: int
) -> tuple[SearchResult, np.ndarray]:
    """The service's union (a search with texts, of depth at least width) ranked best first by its fused logits,
    and each candidate's sparse_weight x s(bm25) in that order [B, W]; s standardises over the union a search of
    depth width returns (the prior's candidates)."""
    assert result.bm25 is not None  # a search with the questions' texts
    reference = np.zeros(result.ids.shape, dtype=bool)
    for row, columns in enumerate(union_columns(result.ids, result.scores, result.bm25, width)):
        reference[row, columns] = True
    sparse_logits = sparse_weight * standardised(result.bm25, reference)
    order = np.argsort(-fused(score_scale * result.scores, sparse_logits, fusion), axis=1, kind="stable")
    rows = np.arange(len(order))[:, None]
    ranked = replace(
        result,
        ids=result.ids[rows, order],
        scores=result.scores[rows, order],
        embeddings=result.embeddings[rows, order],
        token_ids=result.token_ids[rows, order],
        lengths=result.lengths[rows, order],
        bm25=result.bm25[rows, order],
    )
    return ranked, sparse_logits[rows, order]


def check_fusion_index(fusion: str, manifest: Manifest, kb_dir: str, key: str = "retriever.fusion") -> None:
    """Refuse a fusion that reads BM25 scores on a knowledge base built without a sparse index."""
    if fusion != "dense" and manifest.sparse is None:
        raise UserError(
            f"{key}={fusion} reads BM25 scores, but the knowledge base {kb_dir} was built without a sparse "
            "index; build it with index.sparse=bm25 (python -m rag_lightning.build_kb ... index.sparse=bm25, "
            "or add index.sparse=bm25 to the training command, which rebuilds it)"
        )
