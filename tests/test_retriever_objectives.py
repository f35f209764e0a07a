"""The retriever objectives against hand computations, and distant's in-batch negatives across 2 DDP processes."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_lightning.model.retriever_objectives import (
    answer_log_likelihoods,
    distant_loss,
    emdr2_loss,
    pdist_loss,
)

SCALE, TEMPERATURE = 2.0, 0.5


def _logsumexp(values) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_distant_loss_is_infonce_over_positives_and_every_other_candidate():
    torch.manual_seed(0)
    questions = torch.randn(3, 4, requires_grad=True)
    candidates = torch.randn(3, 2, 4, requires_grad=True)
    ids = torch.tensor([[10, 11], [12, 10], [13, 14]])  # passage 10 is a candidate of questions 0 and 1
    positive = torch.tensor([[False, True], [True, True], [False, False]])  # question 2 has none
    loss, without_positive = distant_loss(questions, candidates, ids, positive, SCALE, TEMPERATURE)

    q, d = questions.detach().numpy(), candidates.detach().reshape(6, 4).numpy()
    logits = SCALE * q @ d.T / TEMPERATURE  # [3, 6]
    # question 0: positive its slot 1; passage 10 again as question 1's slot 1 (pool entry 3) is left out
    loss_0 = _logsumexp(logits[0, [0, 1, 2, 4, 5]]) - logits[0, 1]
    # question 1: both own slots positive; question 0's copy of passage 10 (pool entry 0) is left out
    loss_1 = _logsumexp(logits[1, [1, 2, 3, 4, 5]]) - _logsumexp(logits[1, [2, 3]])
    assert loss.item() == pytest.approx((loss_0 + loss_1) / 2, rel=1e-5)
    assert without_positive == 1

    loss.backward()
    assert torch.isfinite(questions.grad).all() and torch.isfinite(candidates.grad).all()
    assert torch.equal(questions.grad[2], torch.zeros(4)), "a question without a positive contributes nothing"


def test_distant_loss_without_any_positive_is_zero_with_a_gradient_path():
    questions = torch.randn(2, 4, requires_grad=True)
    loss, without_positive = distant_loss(
        questions,
        torch.randn(2, 3, 4),
        torch.arange(6).view(2, 3),
        torch.zeros(2, 3, dtype=torch.bool),
        SCALE,
        TEMPERATURE,
    )
    assert loss.item() == 0.0 and without_positive == 2
    loss.backward()  # DDP needs every trained parameter in the graph, even when nothing is learned
    assert torch.equal(questions.grad, torch.zeros(2, 4))


def test_pdist_and_emdr2_equal_hand_computations():
    doc_scores = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], requires_grad=True)
    answer_ll = torch.tensor([[-1.0, -3.0, -2.0], [-4.0, -0.5, -1.5]], requires_grad=True)

    def softmax(row):
        e = np.exp(np.asarray(row) - max(row))
        return e / e.sum()

    kl, marginal = [], []
    for s, ll in zip(doc_scores.tolist(), answer_ll.tolist()):
        target, prior = softmax([v / TEMPERATURE for v in ll]), softmax(s)
        kl.append(float(np.sum(target * (np.log(target) - np.log(prior)))))
        marginal.append(-math.log(float(np.sum(prior * np.exp(ll)))))
    assert pdist_loss(doc_scores, answer_ll, TEMPERATURE).item() == pytest.approx(np.mean(kl), rel=1e-5)
    assert emdr2_loss(doc_scores, answer_ll).item() == pytest.approx(np.mean(marginal), rel=1e-5)

    # the reader's scores are held fixed: the gradient reaches doc_scores only
    (pdist_loss(doc_scores, answer_ll, TEMPERATURE) + emdr2_loss(doc_scores, answer_ll)).backward()
    assert answer_ll.grad is None and doc_scores.grad.abs().sum() > 0


def test_answer_log_likelihoods_read_the_generators_logits_as_rag_does():
    torch.manual_seed(0)
    n_docs, pad = 2, 0
    labels = torch.tensor([[2, 5, 6, 3], [2, 7, 3, pad]])  # start token, answer, end; the second padded
    logits = torch.randn(2 * n_docs, 4, 9)
    ll = answer_log_likelihoods(logits, labels, n_docs, pad)
    log_probs = torch.log_softmax(logits, -1)
    for row in range(2 * n_docs):
        target = labels[row // n_docs]
        want = sum(float(log_probs[row, t, target[t + 1]]) for t in range(3) if target[t + 1] != pad)
        assert ll[row // n_docs, row % n_docs].item() == pytest.approx(want, rel=1e-5)


# --- in-batch negatives across processes -----------------------------------------------------------------

GLOBAL_BATCH, K, DIM = 5, 3, 8
SHARES = [[0, 1, 2], [3, 4]]  # rank 0 holds 3 questions, rank 1 two: the last batch of an epoch


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    questions = torch.randn(GLOBAL_BATCH, DIM, generator=generator)
    candidates = torch.randn(GLOBAL_BATCH, K, DIM, generator=generator)
    ids = torch.randperm(40, generator=generator)[: GLOBAL_BATCH * K].view(GLOBAL_BATCH, K)
    ids[4, 0] = ids[0, 2]  # one passage retrieved for questions on both ranks
    positive = torch.rand(GLOBAL_BATCH, K, generator=generator) > 0.6
    positive[1] = False  # one question without a positive
    positive[0, 0] = True
    return questions, candidates, ids, positive


def _loss_and_gradients(rows: list[int]):
    questions, candidates, ids, positive = _global_batch()
    questions = questions[rows].clone().requires_grad_(True)
    candidates = candidates[rows].clone().requires_grad_(True)
    loss, _ = distant_loss(questions, candidates, ids[rows], positive[rows], SCALE, TEMPERATURE)
    loss.backward()
    return loss.item(), questions.grad, candidates.grad


def _rank_process(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = _loss_and_gradients(SHARES[rank])
    finally:
        dist.destroy_process_group()


def test_distant_in_batch_negatives_are_gathered_across_two_processes():
    """The mean over 2 gloo processes of their losses and gradients (DDP's mean) equals 1 process's on the same
    global batch, processes holding different numbers of questions."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_process, args=(port, out), nprocs=2, join=True)
        per_rank = [out[0], out[1]]
    loss, question_grads, candidate_grads = _loss_and_gradients(list(range(GLOBAL_BATCH)))
    assert np.mean([r[0] for r in per_rank]) == pytest.approx(loss, rel=1e-5)
    for rank, rows in enumerate(SHARES):
        torch.testing.assert_close(per_rank[rank][1] / 2, question_grads[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(per_rank[rank][2] / 2, candidate_grads[rows], rtol=1e-4, atol=1e-6)
