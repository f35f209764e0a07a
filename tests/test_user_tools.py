"""The user tools on real checkpoints: evaluate, generate, export to transformers' RAG format and import from it.

The export test loads the exported folder with plain transformers (RagRetriever with a custom
index, RagSequence/RagTokenForGeneration) and checks it retrieves and answers exactly like
our generate command. The tests of the tiny run read the session's (conftest.py's tiny_run).

train, evaluate and generate run as command lines (they start Ray); build_kb and export, which do not, run in
this process (conftest.py's `run`): test_bad_input.py tests their process boundary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from rag_lightning.config import MODEL_DEFAULTS, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.data.demo import write_demo_data
from rag_lightning.evaluation.metrics import normalize_answer
from rag_lightning.model.checkpoint_file import read_checkpoint
from rag_lightning.model.rag_module import RagModule
from rag_lightning.model.trained_model import load_trained_model
from retrieval_workers.index_shard import IndexShard
from retrieval_workers.kb_store import PassageTable, load_embeddings, read_manifest

from helpers import (
    REPO_ROOT,
    TINY_DIM,
    TINY_KB_ENCODER,
    cli_env,
    demo_generator_folder,
    write_documents,
    write_encoder_folder,
)

# a short training (what the export test compares needs no more: the weights move from the first step, and the
# answers are compared whatever they are); its scores are unscaled by default (retriever.score_scale: 1 for
# vectors that are not normalised), as transformers' RAG scores by the raw output of its DPR question encoder
EXPORTABLE_TRAINING = [
    "model.num_beams=2",
    "trainer.max_steps=8",
    "trainer.val_check_interval=8",
    "optim.lr=3e-3",
    "evaluate_before_training=false",
]
# MiniLM with [CLS] pooling and no normalisation on both sides: exportable, and pretrained, so questions retrieve
# differently
MINILM_CLS_CONTEXT = [
    "kb.context_encoder.pretrained=minilm",
    "kb.context_encoder.num_layers=0",
    "kb.context_encoder.pooling=cls",
    "kb.context_encoder.normalize=false",
]
EXPORTABLE = [
    "model.question_encoder.pretrained=minilm",
    "model.question_encoder.num_layers=0",
    "model.question_encoder.pooling=cls",
    "model.question_encoder.normalize=false",
    *MINILM_CLS_CONTEXT,
    *EXPORTABLE_TRAINING,
]


def _cli(module: str, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """The command line in a subprocess (train, evaluate and generate start Ray); it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _in_process(run, module: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """build_kb or export (no Ray) in this process (conftest.py's `run`); it must succeed."""
    proc = run(module, list(args), run_dir.parent, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_evaluate_reproduces_the_training_test_and_writes_every_prediction(tiny_run, tmp_path):
    trained = json.loads((tiny_run / "results.json").read_text())
    _cli(
        "rag_lightning.evaluate",
        f"ckpt_path={trained['best_checkpoint']}",
        "max_eval_examples=16",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in ("test/em", "test/f1", "test/recall@2", "test/gold_recall@2", "test/examples"):
        assert results[key] == trained[key], key
    assert results["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-5)
    assert results["data_dir"] == str(tiny_run / "data") and results["kb/index_version"] == 0

    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    test_questions = [json.loads(line) for line in (tiny_run / "data" / "test.jsonl").read_text().splitlines()]
    assert [p["question"] for p in predictions] == [q["question"] for q in test_questions]
    assert [p["answers"] for p in predictions] == [q["answers"] for q in test_questions]
    for p in predictions:
        assert set(p) == {
            "question",
            "prediction",
            "answers",
            "gold_titles",
            "em",
            "f1",
            "retrieved",
            "answer_rank",
            "gold_rank",
        }
        assert len(p["retrieved"]) == 2 and p["retrieved"][0]["score"] >= p["retrieved"][1]["score"]
    gold_hits = [any(r["title"] in p["gold_titles"] for r in p["retrieved"]) for p in predictions]
    assert results["test/gold_recall@2"] == sum(gold_hits) / len(gold_hits)
    assert results["test/em"] == sum(p["em"] for p in predictions) / len(predictions)


@pytest.mark.slow
def test_evaluate_on_other_qa_files_without_gold_passages(tiny_run, tmp_path):
    trained = json.loads((tiny_run / "results.json").read_text())
    rows = [json.loads(line) for line in (tiny_run / "data" / "val.jsonl").read_text().splitlines()][:3]
    data = tmp_path / "qa"
    data.mkdir()
    (data / "dev.jsonl").write_text(
        "".join(json.dumps({"question": r["question"], "answers": r["answers"]}) + "\n" for r in rows)
    )
    _cli(
        "rag_lightning.evaluate",
        f"ckpt_path={trained['best_checkpoint']}",
        "data=files",
        f"data.dir={data}",
        "split=dev",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["dev/examples"] == 3 and "dev/gold_recall@2" not in results
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 3


def _brute_force_scores(questions: torch.Tensor, kb_dir: Path, examples: list[dict], ks: list[int]) -> dict:
    """recall@k, mrr@k and gold_recall@k of question vectors against every passage embedding of the knowledge base's
    active version, ranked by numpy, with the answers matched as EM normalises them."""
    manifest = read_manifest(kb_dir)
    titles_and_texts = PassageTable(kb_dir / manifest.passages_file).titles_and_texts(range(manifest.num_passages))
    order = np.argsort(-(questions.numpy() @ load_embeddings(kb_dir, manifest).T), axis=1, kind="stable")
    sums: dict[str, float] = {}
    for example, ranked in zip(examples, order):
        normalized = [f" {normalize_answer(a)} " for a in example["answers"]]
        answer_rank = next(
            r
            for r, i in enumerate(ranked, 1)
            if any(a in f" {normalize_answer(titles_and_texts[i][1])} " for a in normalized)
        )
        gold_rank = next(r for r, i in enumerate(ranked, 1) if titles_and_texts[i][0] in example["gold_titles"])
        for k in ks:
            for name, value in (
                (f"recall@{k}", answer_rank <= k),
                (f"mrr@{k}", (answer_rank <= k) / answer_rank),
                (f"gold_recall@{k}", gold_rank <= k),
            ):
                sums[name] = sums.get(name, 0.0) + float(value)
    return {f"test/{name}": total / len(examples) for name, total in sums.items()}


@pytest.mark.slow
def test_retrieval_only_evaluate_equals_a_brute_force_ranking(tiny_run, tmp_path):
    """mode=retrieval at k up to above the knowledge base's size (n_docs is 2): no generation, the checkpoint's
    question encoder ranked against every stored embedding."""
    trained = json.loads((tiny_run / "results.json").read_text())
    _cli(
        "rag_lightning.evaluate",
        f"ckpt_path={trained['best_checkpoint']}",
        "mode=retrieval",
        "eval_k=[1,5,20,100]",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ks = [1, 2, 5, 20, 100]  # and n_docs
    examples = [json.loads(line) for line in (tiny_run / "data" / "test.jsonl").read_text().splitlines()]
    module = load_trained_model(trained["best_checkpoint"]).module
    question_ids = module.question_tokenizer(
        [e["question"] for e in examples],
        padding=True,
        truncation=True,
        max_length=module.model_cfg.max_question_tokens,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        expected = _brute_force_scores(module.question_encoder(question_ids), tiny_run / "kb", examples, ks)
    assert set(results) == {
        *expected,
        "test/examples",
        "ckpt_path",
        "data_dir",
        "kb/index_version",
        "retriever/fusion",
        "wall_time_s",
    }
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-9), name
    assert results["test/recall@2"] == trained["test/recall@2"]  # what the training's test measured
    assert results["test/recall@1"] < results["test/recall@20"] == 1.0  # the test questions are answerable
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all("prediction" not in p and len(p["retrieved"]) == 2 for p in predictions)
    assert np.mean([p["answer_rank"] <= 5 for p in predictions]) == results["test/recall@5"]


@pytest.mark.slow
def test_retrieval_only_evaluate_without_a_checkpoint_scores_the_knowledge_bases_encoder(tiny_run, tmp_path):
    from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
    from rag_lightning.model.rag_module import kb_encoder_config

    kb_dir = tiny_run / "kb"
    _cli(
        "rag_lightning.evaluate",
        "mode=retrieval",
        f"kb.dir={kb_dir}",
        "data=files",
        f"data.dir={tiny_run / 'data'}",
        "eval_k=[1,3,50]",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    examples = [json.loads(line) for line in (tiny_run / "data" / "test.jsonl").read_text().splitlines()]
    encoder_cfg = kb_encoder_config(read_manifest(kb_dir))
    tokenizer = load_encoder_tokenizer(encoder_cfg, "kb")
    encoder = build_encoder(encoder_cfg, tokenizer, "kb").eval()
    question_ids = tokenizer(
        [e["question"] for e in examples],
        padding=True,
        truncation=True,
        max_length=encoder_cfg.max_length or ModelConfig.max_question_tokens,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        expected = _brute_force_scores(encoder(question_ids), kb_dir, examples, [1, 3, 50])
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-9), name
    assert results["kb_dir"] == str(kb_dir) and results["test/examples"] == len(examples)


@pytest.mark.slow
def test_retrieval_only_evaluate_re_encodes_for_a_trained_context_encoder(tmp_path):
    """A checkpoint whose context encoder trained past the index it trained against (no refresh): the knowledge
    base is re-encoded by that encoder into a new version, which the ranking uses, and no version is pruned."""
    run_dir = tmp_path / "run"
    _cli(
        "rag_lightning.train",
        "experiment=tiny",
        "retriever.train_context_encoder=true",
        "optim.context_encoder_lr=1e-2",
        "evaluate_before_training=false",
        f"hydra.run.dir={run_dir}",
    )
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    _cli(
        "rag_lightning.evaluate",
        f"ckpt_path={checkpoint}",
        "mode=retrieval",
        "eval_k=[1,5]",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    kb_dir = run_dir / "kb"
    manifest = read_manifest(kb_dir)
    assert results["kb/index_version"] == manifest.active_version == 1 and manifest.kept_versions() == [0, 1]
    module = load_trained_model(str(checkpoint)).module
    module.passages = PassageTable(kb_dir / manifest.passages_file)
    with torch.no_grad():
        fresh = module.embed_passages(np.arange(manifest.num_passages)[None, :])[0].numpy()
    np.testing.assert_allclose(load_embeddings(kb_dir, manifest), fresh, rtol=1e-4, atol=1e-5)
    assert not np.allclose(load_embeddings(kb_dir, manifest, version=0), fresh, atol=1e-3), (
        "the context encoder must have moved in training"
    )
    examples = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    question_ids = module.question_tokenizer(
        [e["question"] for e in examples],
        padding=True,
        truncation=True,
        max_length=module.model_cfg.max_question_tokens,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        expected = _brute_force_scores(module.question_encoder(question_ids), kb_dir, examples, [1, 2, 5])
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, abs=1e-9), name


@pytest.mark.slow
def test_generate_prints_each_answer_with_its_passages(tiny_run, tmp_path):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    question = "where does somebody live ?"
    proc = _cli(
        "rag_lightning.generate",
        f"ckpt_path={checkpoint}",
        f"question='{question}'",
        f"output={tmp_path / 'answers.jsonl'}",
        cwd=tmp_path,
    )

    [answered] = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert answered["question"] == question and len(answered["retrieved"]) == 2
    kb_texts = [json.loads(line) for line in (tiny_run / "data" / "kb.jsonl").read_text().splitlines()]
    assert {"title": answered["retrieved"][0]["title"], "text": answered["retrieved"][0]["text"]} in kb_texts
    printed = proc.stdout.splitlines()
    at = printed.index(f"question: {question}")
    assert printed[at + 1] == f"answer:   {answered['answer']}"
    first = answered["retrieved"][0]
    assert printed[at + 2] == f"  1. [{first['score']:.4f}] {first['title']}: {first['text']}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]  # nothing else written


def _exportable_models(models: str, tmp_path: Path) -> tuple[list[str], list[str], Path]:
    """The train command's overrides for a model that exports exactly, the kb.context_encoder overrides that
    import its export again, and the folder of its QA files. `minilm_bart`: MiniLM encoders, the from-scratch BART
    on the demo; `dpr_t5` (or `dpr_bart`): DPR encoders (of MiniLM's weights) and a tiny T5 (or BART) generator folder
    with its own tokenizer (the T5 with a task prefix), on demo files written beforehand (the generator's tokenizer
    learns their words)."""
    if models == "minilm_bart":
        return EXPORTABLE, MINILM_CLS_CONTEXT, tmp_path / "run" / "data"
    data = write_demo_data(tmp_path / "data", num_entities=40)  # as experiment=tiny writes it
    generator = demo_generator_folder(tmp_path / "generator", models.removeprefix("dpr_"), data)
    question, context = (
        write_encoder_folder(tmp_path / kind, kind, minilm_weights=True) for kind in ("dpr_question", "dpr_context")
    )
    context_overrides = [f"kb.context_encoder.pretrained={context}"]
    t5_prefix = ["model.generator.prefix='answer: '"] if models == "dpr_t5" else []  # T5's task prefix
    return (
        [
            f"model.question_encoder.pretrained={question}",
            *context_overrides,
            f"model.generator.pretrained={generator}",
            *t5_prefix,
            "data.prepare=null",
            f"data.dir={data}",
            *EXPORTABLE_TRAINING,
        ],
        context_overrides,
        data,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, models",
    [("rag_token", "minilm_bart"), ("rag_sequence", "dpr_t5")],
)
def test_export_loads_in_plain_transformers_and_answers_like_generate(kind, models, tmp_path, run):
    """Both kinds, both question encoders (MiniLM made a DPRQuestionEncoder, and DPR) and both generator families
    (the from-scratch BART, a T5 folder with its prefix, whose RAG-Sequence loss needs the bos_token_id: null the
    export writes); tests/test_rag_checkpoints.py compares the other combinations with plain transformers."""
    from transformers import RagRetriever, RagTokenizer

    from rag_lightning.model.generator import RAG_CLASSES

    run_dir, out = tmp_path / "run", tmp_path / "exported"
    overrides, context_overrides, data_dir = _exportable_models(models, tmp_path)
    trained_run = _cli(
        "rag_lightning.train", "experiment=tiny", f"model={kind}", *overrides, f"hydra.run.dir={run_dir}"
    )
    assert "export will refuse" not in trained_run.stdout + trained_run.stderr  # no start-up warning
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # retriever.score_scale left null: the checkpoint keeps the scale it resolved to (1: raw inner products)
    assert read_checkpoint(str(checkpoint))["hyper_parameters"]["retriever"]["score_scale"] == 1.0
    _in_process(run, "rag_lightning.export", tmp_path / "export", f"ckpt_path={checkpoint}", f"out={out}")
    questions_file = data_dir / "test.jsonl"
    _cli(
        "rag_lightning.generate",
        f"ckpt_path={checkpoint}",
        f"questions={questions_file}",
        f"output={tmp_path / 'ours.jsonl'}",
    )
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]

    retriever = RagRetriever.from_pretrained(
        str(out), index_name="custom", passages_path=str(out / "passages"), index_path=str(out / "index.faiss")
    )
    model = RAG_CLASSES[kind].from_pretrained(str(out), retriever=retriever).eval()
    tokenizer = RagTokenizer.from_pretrained(str(out))
    inputs = tokenizer.question_encoder([r["question"] for r in ours], padding=True, return_tensors="pt")
    with torch.no_grad():
        question_vectors = model.question_encoder(**inputs)[0]
        docs = retriever(inputs["input_ids"], question_vectors.numpy(), return_tensors="pt")
        doc_scores = torch.bmm(question_vectors.unsqueeze(1), docs["retrieved_doc_embeds"].transpose(1, 2)).squeeze(1)
        generated = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], num_beams=2, max_new_tokens=8
        )
    answers = tokenizer.generator.batch_decode(generated, skip_special_tokens=True)

    if models == "minilm_bart":  # the questions retrieve differently (with the DPR encoders of MiniLM's [CLS]
        #                             vector, the demo's four test questions all retrieve the same two passages)
        assert len({tuple(r["id"] for r in o["retrieved"]) for o in ours}) > 1
    assert docs["doc_ids"].tolist() == [[r["id"] for r in o["retrieved"]] for o in ours]
    np.testing.assert_allclose(
        doc_scores.numpy(), [[r["score"] for r in o["retrieved"]] for o in ours], rtol=1e-4, atol=1e-4
    )
    assert answers == [o["answer"] for o in ours]

    # and back: the exported model loads through model.init_from as the model it came from
    trained = load_trained_model(str(checkpoint)).module
    back = RagModule(
        model=asdict(ModelConfig(kind=kind, init_from=str(out))),
        retriever=asdict(RetrieverConfig()),
        optim=asdict(OptimConfig()),
        service=asdict(trained.service_spec),
    ).eval()
    for name in MODEL_DEFAULTS:  # n_docs, max_context_tokens, label_smoothing: from the export's RagConfig
        assert getattr(back.model_cfg, name) == getattr(trained.model_cfg, name), name
    assert back.context_layout == trained.context_layout
    generator = trained.rag.generator.state_dict()
    assert all(torch.equal(tensor, generator[name]) for name, tensor in back.rag.generator.state_dict().items())
    questions = [o["question"] for o in ours]
    question_ids = back.question_tokenizer(questions, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back.question_encoder(question_ids), trained.question_encoder(question_ids))

    # and the exported passages and index import as a knowledge base with the same embeddings
    kb_dir = tmp_path / "imported"
    _in_process(
        run,
        "rag_lightning.build_kb",
        tmp_path / "import",
        f"kb.source={out / 'passages'}",
        f"kb.source_index={out / 'index.faiss'}",
        f"kb.dir={kb_dir}",
        *context_overrides,
    )
    original = run_dir / "kb"
    np.testing.assert_array_equal(
        load_embeddings(kb_dir, read_manifest(kb_dir)), load_embeddings(original, read_manifest(original))
    )


def _transformers_knowledge_base(folder: Path, dim: int, index_dim: int | None = None) -> tuple[Path, Path, np.ndarray]:
    """What transformers' use_own_knowledge_dataset.py writes: a datasets folder with title, text and embeddings
    rows, and the HNSW inner-product index it adds to the dataset, saved to a file."""
    import datasets

    rows = write_documents(folder / "source.jsonl", 30, words_per_doc=12)
    embeddings = np.random.default_rng(0).standard_normal((len(rows), dim)).astype(np.float32)
    dataset = datasets.Dataset.from_dict(
        {"title": [r["title"] for r in rows], "text": [r["text"] for r in rows], "embeddings": embeddings}
    )
    passages, index_file = folder / "my_knowledge_dataset", folder / "my_knowledge_dataset_hnsw_index.faiss"
    dataset.save_to_disk(str(passages))
    if index_dim is None:
        dataset.add_faiss_index("embeddings", custom_index=faiss.IndexHNSWFlat(dim, 128, faiss.METRIC_INNER_PRODUCT))
        dataset.get_index("embeddings").save(str(index_file))
    else:
        index = faiss.IndexFlatIP(index_dim)
        index.add(np.zeros((len(rows), index_dim), dtype=np.float32))
        faiss.write_index(index, str(index_file))
    return passages, index_file, embeddings


@pytest.mark.slow
def test_build_kb_imports_a_knowledge_base_of_transformers_rag_example(tmp_path, run):
    passages, index_file, embeddings = _transformers_knowledge_base(tmp_path, dim=TINY_DIM)
    kb_dir = tmp_path / "kb"
    _in_process(
        run,
        "rag_lightning.build_kb",
        tmp_path / "build",
        f"kb.source={passages}",
        f"kb.source_index={index_file}",
        f"kb.dir={kb_dir}",
        *TINY_KB_ENCODER,
        "index.shards=2",
    )

    manifest = read_manifest(kb_dir)
    assert manifest.num_passages == 30 and manifest.dim == TINY_DIM
    np.testing.assert_array_equal(load_embeddings(kb_dir, manifest), embeddings)
    queries = embeddings[:5] + 0.01
    brute_force = np.argmax(queries @ embeddings.T, axis=1)
    best = [IndexShard(str(kb_dir), shard).search(queries, 1) for shard in range(2)]
    merged = np.where(best[0].scores[:, 0] >= best[1].scores[:, 0], best[0].ids[:, 0], best[1].ids[:, 0])
    np.testing.assert_array_equal(merged, brute_force)


@pytest.mark.slow
def test_an_index_of_another_dimension_is_refused_and_the_existing_kb_kept(tmp_path, run):
    passages, index_file, _ = _transformers_knowledge_base(tmp_path, dim=TINY_DIM, index_dim=TINY_DIM // 2)
    kb_dir = tmp_path / "kb"
    write_documents(tmp_path / "earlier.jsonl", 6)
    _in_process(
        run,
        "rag_lightning.build_kb",
        tmp_path / "earlier",
        f"kb.source={tmp_path / 'earlier.jsonl'}",
        f"kb.dir={kb_dir}",
        *TINY_KB_ENCODER,
    )
    before = {p.relative_to(kb_dir): p.read_bytes() for p in kb_dir.rglob("*") if p.is_file()}

    proc = run(
        "rag_lightning.build_kb",
        [f"kb.source={passages}", f"kb.source_index={index_file}", f"kb.dir={kb_dir}", *TINY_KB_ENCODER],
        tmp_path,
        tmp_path / "build",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert f"kb.source_index: {index_file}" in error
    assert f"dimension {TINY_DIM // 2}" in error and f"dimension {TINY_DIM}" in error
    assert {p.relative_to(kb_dir): p.read_bytes() for p in kb_dir.rglob("*") if p.is_file()} == before
