"""retriever.fusion through RagModule, over a real service whose knowledge base has a BM25 index: doc_scores under
hybrid and sparse equal the formula, the gradient reaches the question encoder through the dense term alone, and
distant supervision finds, and learns from, positives that BM25 alone retrieves; and the commands end to end."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from rag_lightning.config import ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.model.rag_module import RagModule
from rag_lightning.model.retriever_objectives import distant_loss
from retrieval_workers.service import shutdown_service

from helpers import (
    REPO_ROOT,
    qa_data_and_first_batch,
    run_cli,
    running_service,
    tiny_encoder_config,
    tiny_generator_config,
)

N_DOCS = 2
BATCH = 8


@pytest.fixture(scope="module")
def sparse_service(ray_cluster, tmp_path_factory):
    """The demo's 40 passages with a BM25 index, served; the tiny random encoder embeds them."""
    data_dir, spec = running_service(tmp_path_factory, tiny_encoder_config(), sparse="bm25")
    yield data_dir, spec
    shutdown_service(spec)


def _module_and_batch(service, **retriever):
    data_dir, spec = service
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        kind="rag_token",
        n_docs=N_DOCS,
        question_encoder=tiny_encoder_config(),
        generator=tiny_generator_config(dropout=0.0),
        max_context_tokens=64,
        max_answer_tokens=8,
        num_beams=1,
    )
    module = RagModule(
        model=asdict(model_cfg),
        retriever=asdict(RetrieverConfig(train_question_encoder=True, **retriever)),
        optim=asdict(OptimConfig()),
        service=asdict(spec),
    )
    module.setup("fit")
    _, batch = qa_data_and_first_batch(module, data_dir, model_cfg, BATCH)
    return module, batch


def _standardised_by_hand(rows: np.ndarray) -> np.ndarray:
    return np.array([[(x - np.mean(row)) / np.std(row) for x in row] for row in rows.astype(np.float64)])


@pytest.mark.parametrize("fusion", ["hybrid", "sparse"])
def test_doc_scores_follow_the_fusion_and_only_the_dense_term_has_a_gradient(sparse_service, fusion):
    module, batch = _module_and_batch(sparse_service, fusion=fusion, sparse_weight=0.7)
    retrieved = module.retrieve(batch)
    k = retrieved.scores.shape[1]
    assert k == 2 * N_DOCS, "the union of the dense and the BM25 top n_docs"
    assert retrieved.result.bm25 is not None
    np.testing.assert_array_equal(retrieved.ids, retrieved.result.ids)
    dense = module.score_scale * torch.einsum("bd,bkd->bk", retrieved.questions, retrieved.embeddings)
    sparse = torch.tensor(0.7 * _standardised_by_hand(retrieved.result.bm25), dtype=torch.float32)
    expected = dense + sparse if fusion == "hybrid" else sparse
    torch.testing.assert_close(retrieved.scores, expected, rtol=1e-5, atol=1e-5)
    assert (retrieved.scores.diff(dim=1) <= 1e-5).all(), "best first by the fused scores"
    if fusion == "sparse":
        assert not retrieved.scores.requires_grad
        # BM25 chooses the passages read: each demo question names its person, the title of the gold passage
        titles = module.passages.titles_and_texts(retrieved.ids[:, :N_DOCS])
        firsts = [titles[row * N_DOCS][0] for row in range(len(batch["questions"]))]
        assert firsts == [gold[0] for gold in batch["gold_titles"]]
        return
    params = [p for p in module.question_encoder.parameters() if p.requires_grad]
    through_fused = torch.autograd.grad(retrieved.scores.sum(), params, retain_graph=True)
    through_dense = torch.autograd.grad(dense.sum(), params)
    for fused_grad, dense_grad in zip(through_fused, through_dense):
        torch.testing.assert_close(fused_grad, dense_grad)
    assert any(g.abs().sum() > 0 for g in through_fused)


@pytest.mark.parametrize("fusion", ["hybrid", "sparse"])
def test_a_candidates_doc_score_does_not_depend_on_how_deep_its_question_was_searched(sparse_service, fusion):
    """Validation and evaluate search deeper than a training step (for recall at larger k), and get a wider
    union; its BM25 term is standardised over the prior's candidates all the same, so a passage found by both
    searches has one doc score."""
    module, batch = _module_and_batch(sparse_service, fusion=fusion, sparse_weight=0.7)
    module.eval()  # no dropout: both searches embed the questions alike
    with torch.no_grad():
        shallow, deep = module.retrieve(batch), module.retrieve(batch, depth=20)
    assert deep.result.ids.shape[1] == 40 > shallow.result.ids.shape[1] == 2 * N_DOCS
    found_by_both = 0
    for row in range(len(batch["questions"])):
        deep_scores = dict(zip(deep.ids[row].tolist(), deep.scores[row].tolist()))
        for passage, score in zip(shallow.ids[row].tolist(), shallow.scores[row].tolist()):
            if passage in deep_scores:
                assert deep_scores[passage] == pytest.approx(score, abs=1e-5), (row, passage)
                found_by_both += 1
    assert found_by_both >= 2 * len(batch["questions"])


def test_a_dense_fusion_without_distant_supervision_asks_no_bm25(sparse_service):
    module, batch = _module_and_batch(sparse_service)
    assert not module.searches_bm25
    retrieved = module.retrieve(batch)
    assert retrieved.result.bm25 is None and retrieved.scores.shape[1] == N_DOCS


def test_distant_supervision_finds_and_learns_from_positives_only_bm25_retrieves(sparse_service):
    """The tiny random question encoder retrieves the gold passage of few questions; BM25 finds each by its
    person's name. Under fusion=dense the reader still reads the dense top n_docs, and distant's candidates are
    the union: its positives there are the BM25 passages holding the answer."""
    module, batch = _module_and_batch(sparse_service, objective="distant", positives="answer")
    assert module.searches_bm25
    retrieved = module.retrieve(batch)
    k = retrieved.scores.shape[1]
    ids = retrieved.ids[:, :k]
    positive = module.positive_candidates(batch, ids)
    dense_only = positive[:, :N_DOCS]  # ranked by the dense scores: the dense top n_docs come first
    only_bm25 = ~dense_only.any(1) & positive[:, N_DOCS:].any(1)
    assert only_bm25.sum() >= 3, positive
    scale, temperature = module.score_scale, module.retriever_cfg.temperature
    union_loss, union_without = distant_loss(
        retrieved.questions, retrieved.embeddings, torch.from_numpy(ids), torch.from_numpy(positive), scale, temperature
    )
    _, dense_without = distant_loss(
        retrieved.questions,
        retrieved.embeddings[:, :N_DOCS],
        torch.from_numpy(ids[:, :N_DOCS]),
        torch.from_numpy(dense_only),
        scale,
        temperature,
    )
    assert union_without == dense_without - only_bm25.sum() and union_without < dense_without
    objective = module.retriever_objective(batch, retrieved, torch.empty(0))
    torch.testing.assert_close(objective, union_loss)
    (question_grad,) = torch.autograd.grad(objective, retrieved.questions)
    assert (question_grad[torch.from_numpy(only_bm25)].abs().sum(1) > 0).all(), "those questions learn"


@pytest.mark.slow
def test_hybrid_training_and_evaluation_in_every_fusion_from_the_command_line(tmp_path):
    """train with a BM25 index, hybrid doc_scores and distant supervision; then evaluate mode=retrieval in each
    fusion (a Hydra multirun), from its checkpoint and from its knowledge base alone."""
    run_dir = tmp_path / "run"
    train = run_cli(
        "rag_lightning.train",
        [
            "experiment=tiny",
            "index.sparse=bm25",
            "retriever.fusion=hybrid",
            "retriever.objective=distant",
            "retriever.train_question_encoder=true",
            "logger=csv",
        ],
        REPO_ROOT,
        run_dir,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    trained = json.loads((run_dir / "results.json").read_text())
    assert trained["retriever/fusion"] == "hybrid"
    assert "validation: passages ranked by retriever.fusion=hybrid" in train.stderr + train.stdout
    sources = {"ckpt": [f"ckpt_path={trained['best_checkpoint']}"]}
    sources["kb"] = [f"kb.dir={run_dir / 'kb'}", "data=files", f"data.dir={run_dir / 'data'}"]
    for source, overrides in sources.items():
        out = tmp_path / f"eval-{source}"
        evaluate = run_cli(
            "rag_lightning.evaluate",
            [
                "-m",
                *overrides,
                "mode=retrieval",
                "eval_k=[1,5]",
                "retriever.fusion=dense,sparse,hybrid",
                f"hydra.sweep.dir={out}",
                "hydra.sweep.subdir=${retriever.fusion}",
            ],
            REPO_ROOT,
        )
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]
        results = {
            fusion: json.loads((out / fusion / "results.json").read_text()) for fusion in ("dense", "sparse", "hybrid")
        }
        for fusion, scores in results.items():
            assert scores["retriever/fusion"] == fusion
        # every test question names its person, whose passage is the only one holding that name
        assert results["sparse"]["test/recall@1"] == 1.0
        assert results["dense"]["test/recall@1"] < 1.0
