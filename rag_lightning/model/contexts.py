"""Generator inputs: each retrieved passage's stored token ids joined with the question's ids.

Passages are tokenized once when the knowledge base is built (as `title / text //`), so a
training step only concatenates integers and pads to the longest context of the batch. As in
transformers' RagRetriever, the generator's prefix (T5's task prefix) comes first.
"""
from __future__ import annotations

import numpy as np
import torch


def join_contexts(passage_ids: np.ndarray, passage_lengths: np.ndarray, question_ids: list[list[int]],
                  prefix_ids: list[int], eos_id: int, pad_id: int,
                  max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts [B * k, L] and their attention mask, rows ordered question by question.

    passage_ids [B, k, P] and passage_lengths [B, k] come from the retrieval service; each
    context is prefix + passage + question + eos, the passage cut first when over max_tokens.
    """
    batch, k = passage_lengths.shape
    rows = []
    for b in range(batch):
        question = list(question_ids[b])[:max(max_tokens - len(prefix_ids) - 1, 0)] + [eos_id]
        room = max(max_tokens - len(prefix_ids) - len(question), 0)
        for j in range(k):
            n = min(int(passage_lengths[b, j]), room)
            rows.append(prefix_ids + passage_ids[b, j, :n].tolist() + question)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask
