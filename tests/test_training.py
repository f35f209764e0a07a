"""RAG-Sequence and RAG-Token training steps over the real retrieval service, on tiny models and data."""

from __future__ import annotations

import math
import threading
from dataclasses import asdict

import lightning as L
import numpy as np
import pytest
import ray
import torch

from rag_lightning.callbacks.evaluation_metrics import EvaluationMetrics
from rag_lightning.config import (
    EncoderConfig,
    ModelConfig,
    OptimConfig,
    RetrieverConfig,
)
from rag_lightning.data.retrieval_ahead import RetrievalAhead
from rag_lightning.errors import UserError
from rag_lightning.evaluation.metrics import contains_answer
from rag_lightning.model.rag_module import RagModule
from retrieval_workers.service import shutdown_service

from helpers import (
    actor_pid,
    demo_data,
    demo_generator_folder,
    qa_data_and_first_batch,
    quiet_trainer,
    running_service,
    tiny_encoder_config,
    tiny_generator_config,
    train_on_one_batch,
    transformers_context,
    write_encoder_folder,
    write_generator_folder,
)

N_DOCS = 2
BATCH = 4
K_CANDIDATES = 10  # passages re-scored per question where a test over-retrieves


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The tiny random encoder's knowledge base and service."""
    data_dir, spec = running_service(tmp_path_factory, tiny_encoder_config())
    yield data_dir, spec
    shutdown_service(spec)


def _model_config(kind: str, question_encoder: EncoderConfig | None = None, **overrides) -> ModelConfig:
    return ModelConfig(
        kind=kind,
        n_docs=N_DOCS,
        question_encoder=question_encoder or tiny_encoder_config(),
        generator=tiny_generator_config(dropout=0.0),
        max_context_tokens=64,
        max_answer_tokens=8,
        num_beams=2,
        **overrides,
    )


def _module_and_batch(
    service, kind: str, train_question_encoder: bool = True, model_cfg: ModelConfig | None = None, **retriever_overrides
):
    data_dir, spec = service
    torch.manual_seed(0)
    model_cfg = model_cfg or _model_config(kind)
    retriever = RetrieverConfig(train_question_encoder=train_question_encoder, **retriever_overrides)
    module = RagModule(
        model=asdict(model_cfg),
        retriever=asdict(retriever),
        optim=asdict(OptimConfig(lr=1e-3, warmup_steps=0)),
        service=asdict(spec),
    )
    module.setup("fit")
    datamodule, batch = qa_data_and_first_batch(module, data_dir, model_cfg, BATCH)
    return module, datamodule, batch


@pytest.mark.parametrize("kind", ["rag_sequence", "rag_token"])
def test_training_lowers_the_loss_and_trains_the_question_encoder(service, kind):
    module, _, batch = _module_and_batch(service, kind)
    assert (
        type(module.rag).__name__
        == {"rag_sequence": "RagSequenceForGeneration", "rag_token": "RagTokenForGeneration"}[kind]
    )
    assert batch["question_ids"].shape[0] == BATCH and batch["labels"].shape[0] == BATCH

    # one retrieval: n_docs passages per question, each context the ids transformers' RagRetriever makes
    retrieved = module.retrieve(batch)
    doc_scores, context_ids, context_mask = module.reader_inputs(batch, retrieved)
    assert doc_scores.shape == (BATCH, N_DOCS) and doc_scores.requires_grad
    assert retrieved.ids.shape == (BATCH, N_DOCS) and np.all(retrieved.ids >= 0)
    assert context_ids.shape[0] == BATCH * N_DOCS and context_mask.shape == context_ids.shape
    passages = module.passages.titles_and_texts(retrieved.ids.reshape(-1))
    for row, (title, text) in enumerate(passages):
        want = transformers_context(module.generator_tokenizer, title, text, batch["questions"][row // N_DOCS])
        assert context_ids[row, : int(context_mask[row].sum())].tolist() == want

    question_encoder_params = [p for p in module.question_encoder.parameters()]
    rag_param_ids = {id(p) for p in module.rag.parameters()}
    assert all(id(p) in rag_param_ids for p in question_encoder_params), "RAG must hold our question encoder"
    generator_params = list(module.rag.generator.parameters())

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    module.train()
    for step in range(30):
        optimizer.zero_grad()
        loss = module.training_step(batch, step)["loss"]
        assert loss.ndim == 0 and math.isfinite(loss.item())
        loss.backward()
        if step == 0:
            # the gradient reaches every trainable encoder weight through doc_scores = q . d; the token
            # embedding table is frozen by default (retriever.freeze_embeddings)
            word_embeddings = module.question_encoder.model.embeddings.word_embeddings.weight
            assert not word_embeddings.requires_grad and word_embeddings.grad is None
            grads = [p.grad for p in question_encoder_params if p.requires_grad]
            assert len(grads) > 1 and all(g is not None for g in grads), "trainable encoder weights need gradients"
            assert sum(float(g.abs().sum()) for g in grads) > 0, "the question encoder's gradients are all zero"
            assert sum(float(p.grad.abs().sum()) for p in generator_params if p.grad is not None) > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_frozen_question_encoder_gets_no_gradient(service):
    module, _, batch = _module_and_batch(service, "rag_sequence", train_question_encoder=False)
    module.train()  # dropout for what trains, none in the frozen retriever
    assert module.rag.generator.training and not any(m.training for m in module.question_encoder.modules())
    module.training_step(batch, 0)["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in module.question_encoder.parameters())
    assert sum(float(p.grad.abs().sum()) for p in module.rag.generator.parameters() if p.grad is not None) > 0


def test_context_encoder_gets_gradients_only_when_trained(service):
    # train_context_encoder=false: the stored embeddings are used and there is no context encoder to update
    module, _, batch = _module_and_batch(service, "rag_sequence")
    assert module.context_encoder is None
    assert not any("context_encoder" in name for name, _ in module.named_parameters())
    module.training_step(batch, 0)["loss"].backward()

    module, _, batch = _module_and_batch(service, "rag_sequence", train_context_encoder=True)
    # it starts from the knowledge base's encoder: re-embedding the retrieved passages gives the stored rows
    module.eval()  # no dropout
    result = module.retrieve(batch).result
    with torch.no_grad():
        np.testing.assert_allclose(module.embed_passages(result.ids).numpy(), result.embeddings, rtol=1e-4, atol=1e-5)
    module.train()
    module.training_step(batch, 0)["loss"].backward()
    trainable = [p for p in module.context_encoder.parameters() if p.requires_grad]
    assert len(trainable) > 1 and all(p.grad is not None for p in trainable)
    assert sum(float(p.grad.abs().sum()) for p in trainable) > 0, "the context encoder's gradients are all zero"
    assert not module.context_encoder.model.get_input_embeddings().weight.requires_grad  # frozen by default


@pytest.mark.slow
@pytest.mark.parametrize(
    "folders", [("dpr_question", "dpr_context"), ("sentence_transformers", "sentence_transformers")], ids=["dpr", "st"]
)
def test_encoders_of_every_folder_kind_train_end_to_end(ray_cluster, tmp_path_factory, folders):
    """DPR question and context encoders (pooler output with projection), and sentence-transformers folders
    ([CLS] pooling, normalised), each with the score scale of its vectors (retriever.score_scale left null: 1 for
    DPR's raw inner products, 20 for cosines): both encoders get gradients and move, their embedding tables do
    not, the loss falls."""
    root = tmp_path_factory.mktemp("folders")
    question_folder, context_folder = (
        write_encoder_folder(root / f"{side}", kind) for side, kind in zip(("question", "context"), folders)
    )
    service = running_service(tmp_path_factory, EncoderConfig(pretrained=str(context_folder)))
    try:
        module, datamodule, batch = _module_and_batch(
            service,
            "rag_sequence",
            model_cfg=_model_config("rag_sequence", EncoderConfig(pretrained=str(question_folder))),
            train_context_encoder=True,
        )
        encoders = (module.question_encoder, module.context_encoder)
        assert module.retriever_cfg.score_scale == {"dpr_question": 1.0}.get(folders[0], 20.0)
        assert [type(e.model).__name__ for e in encoders] == {
            "dpr_question": ["DPRQuestionEncoder", "DPRContextEncoder"]
        }.get(folders[0], ["BertModel"] * 2)
        before = [{n: p.detach().clone() for n, p in e.named_parameters()} for e in encoders]
        losses = train_on_one_batch(module, batch, steps=30)
        assert losses[-1] < 0.8 * losses[0], losses
        for encoder, weights in zip(encoders, before):
            embeddings = encoder.model.get_input_embeddings().weight
            moved = {n for n, p in encoder.named_parameters() if not torch.equal(p, weights[n])}
            assert moved and moved == {n for n, p in encoder.named_parameters() if p.requires_grad}
            assert not embeddings.requires_grad and not any("word_embeddings" in n for n in moved)

        # and in bf16 mixed precision on the CPU, through a real Trainer
        trainer = quiet_trainer(tmp_path_factory.mktemp("bf16"), max_steps=2, precision="bf16-mixed")
        trainer.fit(module, datamodule=datamodule)
        assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    finally:
        shutdown_service(service[1])


def test_a_frozen_generator_does_not_move_and_holds_no_optimizer_state(service, tmp_path):
    """model.generator.train=false: the retriever trains against a fixed reader (as REPLUG does)."""
    model_cfg = _model_config("rag_sequence")
    model_cfg.generator.train = False
    module, datamodule, _ = _module_and_batch(service, "rag_sequence", model_cfg=model_cfg)
    generator = {n: p.detach().clone() for n, p in module.rag.generator.named_parameters()}
    question_encoder = [p.detach().clone() for p in module.question_encoder.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=datamodule)
    assert all(torch.equal(p, generator[n]) for n, p in module.rag.generator.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(question_encoder, module.question_encoder.parameters()))
    optimizer = trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.question_encoder.parameters() if p.requires_grad}
    assert len(optimizer.state) == len(optimized)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(service):
    """Generator, question and context encoders recompute their activations in the backward pass, to the same
    result (dropout included: the recomputation replays the random state)."""

    def loss_and_gradients(checkpointing: bool):
        model_cfg = _model_config("rag_sequence", gradient_checkpointing=checkpointing)
        module, _, batch = _module_and_batch(service, "rag_sequence", model_cfg=model_cfg, train_context_encoder=True)
        assert module.rag.generator.is_gradient_checkpointing == checkpointing
        module.train()
        torch.manual_seed(1)
        loss = module.training_step(batch, 0)["loss"]
        loss.backward()
        return loss.item(), {n: p.grad for n, p in module.named_parameters() if p.requires_grad}

    (plain_loss, plain), (checkpointed_loss, checkpointed) = loss_and_gradients(False), loss_and_gradients(True)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == checkpointed.keys() and any("context_encoder" in n for n in plain)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, kind, prefix",
    [
        ("bart", "rag_sequence", ["</s>", "<s>"]),
        ("t5", "rag_sequence", ["<pad>"]),
        ("t5", "rag_token", ["<pad>"]),
        ("encoder_decoder", "rag_sequence", ["[CLS]"]),
    ],
)
def test_pretrained_generators_of_every_family_train_and_generate(ray_cluster, tmp_path_factory, family, kind, prefix):
    """A BART, a T5 (under both model kinds: its config has no bos_token_id, which RAG-Sequence's loss reads) and an
    EncoderDecoderModel folder, each with its own tokenizer, which the knowledge base's passages are tokenized
    with; each answer follows the family's decoder start. They train, and answer as evaluate and generate do."""
    data_dir = demo_data(tmp_path_factory)
    folder = demo_generator_folder(tmp_path_factory.mktemp(family) / "generator", family, data_dir)
    service = running_service(tmp_path_factory, tiny_encoder_config(), data_dir, generator_tokenizer=str(folder))
    try:
        model_cfg = _model_config(kind)
        model_cfg.generator.pretrained = str(folder)
        model_cfg.generator.prefix = "answer the question :" if family == "t5" else None  # T5's task prefix
        module, _, batch = _module_and_batch(service, kind, model_cfg=model_cfg)
        assert module.generator_tokenizer.convert_ids_to_tokens(module.answer_format.prefix) == prefix
        retrieved = module.retrieve(batch)
        _, context_ids, context_mask = module.reader_inputs(batch, retrieved)
        title, text = module.passages.titles_and_texts(retrieved.ids[:1, :1].reshape(-1))[0]
        want = transformers_context(
            module.generator_tokenizer, title, text, batch["questions"][0], prefix=model_cfg.generator.prefix or ""
        )
        assert context_ids[0, : int(context_mask[0].sum())].tolist() == want
        assert batch["labels"][0, : len(prefix)].tolist() == module.answer_format.prefix
        generator = {n: p.detach().clone() for n, p in module.rag.generator.named_parameters()}
        losses = train_on_one_batch(module, batch, steps=30)
        assert losses[-1] < 0.85 * losses[0], losses
        unmoved = [n for n, p in module.rag.generator.named_parameters() if torch.equal(p, generator[n])]
        assert not unmoved, unmoved
        module.eval()
        records = module.evaluate_batch(batch, [N_DOCS])  # generated answers, and the gold answers' NLL
        assert len(records) == BATCH
        assert all(isinstance(r["prediction"], str) and math.isfinite(r["scores"]["loss"]) for r in records)
    finally:
        shutdown_service(service[1])


def test_a_generator_whose_tokenizer_is_not_the_knowledge_bases_is_refused(service, tmp_path):
    folder = write_generator_folder(tmp_path / "bart", "bart", ["words of another knowledge base"])
    model_cfg = _model_config("rag_sequence")
    model_cfg.generator.pretrained = str(folder)
    with pytest.raises(
        UserError,
        match=f"^model.generator.pretrained: {folder} tokenizes with [0-9a-f]{{12}}, "
        f"the knowledge base {service[1].kb_dir} with [0-9a-f]{{12}}",
    ):
        RagModule(
            model=asdict(model_cfg),
            retriever=asdict(RetrieverConfig()),
            optim=asdict(OptimConfig()),
            service=asdict(service[1]),
        )


@pytest.mark.parametrize("kind", ["rag_sequence", "rag_token"])
def test_predict_answers_returns_one_string_per_question(service, kind):
    module, _, batch = _module_and_batch(service, kind)
    module.eval()
    predictions, retrieved = module.predict_answers(batch)
    assert isinstance(predictions, list) and len(predictions) == len(batch["questions"]) == BATCH
    assert all(isinstance(p, str) for p in predictions)
    assert retrieved.ids.shape == (BATCH, N_DOCS)


def test_lightning_fit_and_test(service, tmp_path):
    """A real Trainer: configure_optimizers, a few optimizer steps, then test metrics over every test example."""
    module, datamodule, _ = _module_and_batch(service, "rag_token")
    before = [p.detach().clone() for p in module.question_encoder.parameters()]
    metrics_callback = EvaluationMetrics(module.eval_k, answers=True)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[metrics_callback])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 3
    assert "train/loss" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, module.question_encoder.parameters())), (
        "the question encoder must be updated by training"
    )
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    assert module.eval_k == [1, N_DOCS, 5, 20, 100]  # retriever.eval_k's defaults and n_docs
    retrieval_names = [f"{name}@{k}" for k in module.eval_k for name in ("recall", "mrr", "gold_recall")]
    # the demo data names each question's gold passage
    assert set(metrics) == {f"test/{name}" for name in ["em", "f1", "loss", "examples", *retrieval_names]}
    # the metrics are the means of the per-example records, one record per test example
    records = metrics_callback.scores.records
    assert metrics["test/examples"] == len(records) == len(datamodule.splits["test"])
    assert [r["question"] for r in records] == [e.question for e in datamodule.splits["test"].examples]
    for name in ("em", "f1", "loss", *retrieval_names):
        assert metrics[f"test/{name}"] == pytest.approx(sum(r["scores"][name] for r in records) / len(records))
    # gold recall at n_docs: a record's gold title is among the titles the reader read
    assert [r["scores"][f"gold_recall@{N_DOCS}"] for r in records] == [
        float(any(p["title"] in r["gold_titles"] for p in r["retrieved"])) for r in records
    ]
    assert all(
        metrics[f"test/recall@{a}"] <= metrics[f"test/recall@{b}"] for a, b in zip(module.eval_k, module.eval_k[1:])
    )
    assert metrics["test/loss"] > 0


class KillShardActor(L.Callback):
    """Kills the module's shard-0 actor (Ray restarts it) after the given training step."""

    def __init__(self, after_step: int):
        self.after_step = after_step
        self.killed_pid: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.after_step:
            actor = pl_module.retrieval_client.replicas[0][0]
            self.killed_pid = actor_pid(actor)
            ray.kill(actor, no_restart=False)


def test_training_goes_on_when_a_shard_actor_dies_mid_training(service, tmp_path):
    """One replica per shard: the next step's search waits for Ray's restart, and no step fails."""
    module, datamodule, _ = _module_and_batch(service, "rag_sequence")
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[killer := KillShardActor(2)])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 4
    assert killer.killed_pid is not None and actor_pid(module.retrieval_client.replicas[0][0]) != killer.killed_pid


@pytest.mark.parametrize("objective", ["distant", "pdist", "emdr2"])
def test_the_objective_trains_the_retriever_and_the_rag_loss_the_generator(service, objective):
    """objective_weight 0: the step's loss is the RAG loss, and the question encoder gets no gradient from it;
    weight 1: the generator's gradients are those of the RAG loss alone, the question encoder's are not zero."""
    gradients = {}
    for weight in (0.0, 1.0):
        module, _, batch = _module_and_batch(
            service, "rag_sequence", objective=objective, objective_weight=weight, candidates=4
        )
        module.eval()  # no dropout: both steps see the same numbers
        module.training_step(batch, 0)["loss"].backward()
        gradients[weight] = (
            {n: p.grad.clone() for n, p in module.rag.generator.named_parameters() if p.grad is not None},
            [p.grad for p in module.question_encoder.parameters() if p.requires_grad],
        )
    generator_alone, encoder_alone = gradients[0.0]
    assert generator_alone and all(g is None or not g.any() for g in encoder_alone)
    generator_both, encoder_both = gradients[1.0]
    assert generator_both.keys() == generator_alone.keys()
    for name, grad in generator_both.items():
        torch.testing.assert_close(grad, generator_alone[name], msg=name)
    assert sum(float(g.abs().sum()) for g in encoder_both if g is not None) > 0


def test_candidates_are_reranked_by_the_current_context_encoder(service):
    """The context encoder changed after the index was built: the reader's passages are the best n_docs of the
    K candidates by fresh scores."""
    module, _, batch = _module_and_batch(service, "rag_sequence", train_context_encoder=True, candidates=6)
    module.eval()
    with torch.no_grad():
        for p in module.context_encoder.parameters():
            p.add_(0.5 * torch.randn_like(p))
        retrieved = module.retrieve(batch)
        candidates = retrieved.result.ids[:, :6]
        questions = module.question_encoder(batch["question_ids"])
        fresh = torch.einsum("bd,bkd->bk", questions, module.embed_passages(candidates))
    best = np.take_along_axis(candidates, fresh.argsort(dim=1, descending=True).numpy(), axis=1)
    np.testing.assert_array_equal(retrieved.ids[:, :N_DOCS], best[:, :N_DOCS])
    assert all(set(a) == set(b) for a, b in zip(retrieved.ids[:, :6], candidates))
    torch.testing.assert_close(retrieved.scores, module.retriever_cfg.score_scale * fresh.sort(1, descending=True)[0])
    changed = np.mean([set(a[:N_DOCS]) != set(b[:N_DOCS]) for a, b in zip(best, candidates)])
    assert retrieved.reranked == changed > 0, "the changed encoder must change some reader passages"


def test_distant_supervision_trains_the_question_encoder_toward_its_positives(service):
    """The retriever's probability mass on the candidates that hold an answer grows over a few steps."""
    module, _, batch = _module_and_batch(service, "rag_sequence", objective="distant", candidates=K_CANDIDATES)

    def positive_mass() -> float:
        with torch.no_grad():
            retrieved = module.retrieve(batch)
            prior = torch.softmax(retrieved.scores, 1).numpy()
        return float((prior * module.positive_candidates(batch, retrieved.ids[:, :K_CANDIDATES])).sum(1).mean())

    module.eval()
    ids = module.retrieve(batch).ids[:, :K_CANDIDATES]
    answer_or_title = module.positive_candidates(batch, ids)
    module.retriever_cfg.positives = "answer"
    holding_an_answer = module.positive_candidates(batch, ids)
    module.retriever_cfg.positives = "answer_or_title"
    _, texts = zip(*module.passages.titles_and_texts(ids))
    answers = [a for a in batch["answers"] for _ in range(K_CANDIDATES)]  # each question's, for each candidate
    assert holding_an_answer.ravel().tolist() == [contains_answer(t, a) for t, a in zip(texts, answers)]
    assert (answer_or_title >= holding_an_answer).all()
    before = positive_mass()
    assert before > 0, "some question must have a positive among its candidates"
    module.train()
    train_on_one_batch(module, batch, steps=15)
    module.eval()
    assert positive_mass() > before + 0.05, before


def test_the_retriever_learns_against_a_fixed_reader(service):
    """model.generator.train=false with pdist (as REPLUG): the reader's log-likelihoods teach the question encoder,
    and the generator neither trains nor gets gradients."""
    model_cfg = _model_config("rag_sequence")
    model_cfg.generator.train = False
    module, _, batch = _module_and_batch(service, "rag_sequence", model_cfg=model_cfg, objective="pdist")
    assert not any(m.training for m in module.rag.generator.modules()), "a fixed reader runs in eval mode"
    generator = {n: p.detach().clone() for n, p in module.rag.generator.named_parameters()}
    encoder = [p.detach().clone() for p in module.question_encoder.parameters() if p.requires_grad]
    train_on_one_batch(module, batch, steps=3)
    assert all(p.grad is None and torch.equal(p, generator[n]) for n, p in module.rag.generator.named_parameters())
    assert any(
        not torch.equal(a, b)
        for a, b in zip(encoder, [p for p in module.question_encoder.parameters() if p.requires_grad])
    )


def test_retrieval_ahead_starts_each_batchs_retrieval_before_handing_on_the_batch_before():
    """RetrievalAhead hands on batch i once batch i+1 is made and its retrieval submitted to the background thread;
    every batch comes once, in order, with the Future of its own retrieval."""
    made: list[int] = []

    class Loader:
        def __len__(self) -> int:
            return 3

        def __iter__(self):
            for i in range(3):
                made.append(i)
                yield {"i": i}

    def retrieve(batch: dict) -> tuple[int, str]:
        return batch["i"], threading.current_thread().name

    ahead = RetrievalAhead(Loader(), retrieve)
    handed = [(batch["i"], len(made), batch["retrieved"].result()) for batch in ahead]
    assert len(ahead) == 3
    assert [(i, count) for i, count, _ in handed] == [(0, 2), (1, 3), (2, 3)]
    assert all(result[0] == i and result[1].startswith("retrieval-ahead") for i, _, result in handed)
