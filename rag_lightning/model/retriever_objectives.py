"""What the retriever learns from besides RAG's marginal likelihood (`retriever.objective`).

- distant: DPR's distant supervision as an InfoNCE loss. A question's positives are its
  retrieved candidates that hold a gold answer or carry a gold title; its negatives are its
  other candidates (hard negatives from the live index, as ANCE uses) and every candidate of
  every other question of the global batch, gathered from all DDP processes.
- pdist: Atlas' perplexity distillation, KL(softmax(reader log-likelihoods / T) || the
  retriever's distribution over the reader's passages).
- emdr2: EMDR2's -log sum_k p(z_k | q) p(a | q, z_k), the reader's term held fixed.

In each, the reader's scores carry no gradient: the retriever learns from them, the reader
from the RAG loss alone (whose gradient into the doc scores RagModule stops).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def answer_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor, n_docs: int, pad_id: int) -> torch.Tensor:
    """log p(answer | question, passage) of each retrieved passage, without gradient: [B, n_docs].

    logits are the generator's [B * n_docs, T, V] (RAG's forward with decoder_input_ids = labels), so position t
    predicts label t + 1, as transformers' RAG get_nll reads them; padding is not counted."""
    targets = labels.repeat_interleave(n_docs, dim=0)[:, 1:]
    log_probs = torch.log_softmax(logits.detach()[:, :-1].float(), dim=-1)
    token_ll = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_ll * targets.ne(pad_id)).sum(1).view(-1, n_docs)


def pdist_loss(doc_scores: torch.Tensor, answer_ll: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over questions of KL(softmax(answer_ll / T) || softmax(doc_scores)); doc_scores [B, n] are logits."""
    target = torch.softmax(answer_ll.detach() / temperature, dim=-1)
    return F.kl_div(torch.log_softmax(doc_scores, dim=-1), target, reduction="batchmean")


def emdr2_loss(doc_scores: torch.Tensor, answer_ll: torch.Tensor) -> torch.Tensor:
    """Mean over questions of -log sum_k softmax(doc_scores)_k exp(answer_ll_k), the reader's term fixed."""
    return -torch.logsumexp(torch.log_softmax(doc_scores, dim=-1) + answer_ll.detach(), dim=-1).mean()


def distant_loss(
    questions: torch.Tensor,
    candidates: torch.Tensor,
    candidate_ids: torch.Tensor,
    positive: torch.Tensor,
    score_scale: float,
    temperature: float,
) -> tuple[torch.Tensor, int]:
    """InfoNCE over the global batch's candidates; returns (this process's loss, its questions with no positive).

    questions [B, D] and candidates [B, K, D] are vectors (the candidates' with gradients when the context
    encoder trains), candidate_ids [B, K] their passage ids, positive [B, K] which candidates are positives.
    A question's logits are score_scale * q . d / temperature over every candidate of the global batch; a copy
    of one of its own candidates among other questions' is left out, so no passage counts twice. Its loss is
    -log(sum over its positives of softmax); a question with no positive adds nothing. The loss returned is
    this process's sum over the global count of questions with a positive, times the number of processes:
    DDP's mean over processes then makes it, and its gradient, the global batch's mean.
    """
    batch, k, _ = candidates.shape
    pool, offset = gather_rows(candidates.reshape(batch * k, -1))
    pool_ids, _ = gather_rows(candidate_ids.reshape(-1))
    logits = score_scale * questions @ pool.T / temperature  # [B, N]
    own = torch.zeros_like(logits, dtype=torch.bool)
    rows = torch.arange(batch * k, device=own.device)
    own[rows // k, offset + rows] = True
    duplicate = (pool_ids.unsqueeze(0).unsqueeze(0) == candidate_ids.unsqueeze(-1)).any(1) & ~own
    logits = logits.masked_fill(duplicate, float("-inf"))
    has_positive = positive.any(1)
    chosen = torch.zeros_like(own)
    chosen[own] = positive.reshape(-1)
    chosen |= own & ~has_positive.unsqueeze(1)  # any finite logits for a question without a positive, whose
    #                                              loss is dropped below: an all -inf row would make NaN gradients
    per_question = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~chosen, float("-inf")), 1)
    loss = torch.where(has_positive, per_question, 0.0).sum()
    counted, world = int(has_positive.sum()), 1
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor([counted], dtype=torch.float64, device=logits.device)
        dist.all_reduce(total)
        counted, world = int(total.item()), dist.get_world_size()
    return loss * world / max(counted, 1), int((~has_positive).sum())


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows [n_r, ...] concatenated in rank order, with gradients flowing back to each
    process's own, and the offset of this process's rows; as they are in a single process. Processes may hold
    different numbers of rows (the last batch of an epoch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows, 0
    sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(rows)], dtype=torch.int64, device=rows.device))
    sizes = [int(s) for s in sizes]
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, max(sizes) - len(rows)))
    parts = dist_fn.all_gather(padded)
    rank = dist.get_rank()
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sum(sizes[:rank])
