"""Evaluate a checkpoint: `python -m rag_lightning.evaluate ckpt_path=... [data=...] [split=test] [mode=retrieval]`.

Answers every question of the split with the checkpoint's model and its knowledge base,
and writes into the run directory results.json (exact match, F1, answer NLL, and retrieval
at every k of `k` and n_docs: answer recall@k, mrr@k, gold-passage recall@k where the data
names the gold passages) and predictions.jsonl (each question with its prediction, gold
answers, the passages the reader read, and the ranks of the first passage holding an answer
and of the first gold passage). `mode=retrieval` scores the retrieval alone, without
generating: fast, at any k however small n_docs is.

Without a checkpoint, `mode=retrieval kb.dir=KB data=...` scores the knowledge base's own
encoder as it is (questions encoded by its context encoder): the baseline a trained
retriever is measured against.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import cast

import torch
from tqdm import tqdm

from rag_lightning.command import command
from rag_lightning.config import EvaluateConfig, ModelConfig, RetrieverConfig
from rag_lightning.data.datamodule import TokenizedQA, eval_loader, pad
from rag_lightning.data.prepare import prepare_data
from rag_lightning.data.qa_files import QAExample, read_split
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.errors import UserError
from rag_lightning.evaluation.scores import SplitScores, ranked_records
from rag_lightning.model.folder_settings import fill_model_settings, fill_score_scale
from rag_lightning.model.fusion import check_fusion_index, fused, rank_union
from rag_lightning.model.rag_module import kb_encoder_config
from rag_lightning.model.trained_model import load_trained_model, serving, serving_knowledge_base
from retrieval_workers import (
    KnowledgeBaseError,
    PassageTable,
    RetrievalClient,
    ServiceSpec,
    atomic_write_bytes,
    read_manifest,
)

log = logging.getLogger(__name__)

LISTED_PASSAGES = 5  # passages each row of predictions.jsonl lists when no reader sets how many it reads


def evaluate(cfg: EvaluateConfig) -> dict:
    """The metrics on the split; writes results.json and predictions.jsonl into the run dir."""
    started = time.time()
    if cfg.ckpt_path is None:
        scores, about = evaluate_kb_encoder(cfg)
    else:
        scores, about = evaluate_checkpoint(cfg)
    results = {**scores.metrics(cfg.split), **about, "wall_time_s": round(time.time() - started, 1)}
    run_dir = Path(cfg.paths.run_dir)
    atomic_write_bytes(
        run_dir / "predictions.jsonl",
        "".join(json.dumps(prediction_row(record)) + "\n" for record in scores.records).encode(),
    )
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    log.info("results: %s", json.dumps(results))
    return results


def evaluate_checkpoint(cfg: EvaluateConfig) -> tuple[SplitScores, dict]:
    """The checkpoint's scores on the split, and what they were measured on."""
    assert cfg.ckpt_path is not None  # evaluate() chose this for a checkpoint
    trained = load_trained_model(cfg.ckpt_path)
    module = trained.module
    retriever = module.retriever_cfg
    retriever.fusion = cfg.retriever.fusion or retriever.fusion
    retriever.sparse_weight = (
        cfg.retriever.sparse_weight if cfg.retriever.sparse_weight is not None else retriever.sparse_weight
    )
    check_fusion_index(retriever.fusion, read_manifest(module.service_spec.kb_dir), module.service_spec.kb_dir)
    if cfg.data is not None:
        prepare_data(cfg.data)
        data_dir = cfg.data.dir
    elif module.hparams.get("data_dir"):
        data_dir = module.hparams.data_dir
    else:
        raise UserError(f"data: {cfg.ckpt_path} does not record its QA files; give data=files data.dir=DIR")
    examples = split_examples(data_dir, cfg)
    dataset = TokenizedQA(
        examples,
        module.question_tokenizer,
        module.generator_tokenizer,
        module.answer_format,
        module.model_cfg.max_question_tokens,
        module.model_cfg.max_answer_tokens,
    )
    loader = eval_loader(
        dataset, cfg.eval_batch_size, module.question_tokenizer.pad_token_id, module.generator_tokenizer.pad_token_id
    )
    ks, answers = sorted({*cfg.eval_k, module.n_docs}), cfg.mode == "answers"
    scores = SplitScores(ks, answers=answers)
    with serving(trained, cfg.service) as index_version:
        for batch in tqdm(loader, desc=f"evaluating {cfg.split}", unit="batch", mininterval=2.0):
            scores.add(module.evaluate_batch(batch, ks, answers=answers))
    return scores, {
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "data_dir": str(Path(data_dir).resolve()),
        "kb/index_version": index_version,
        "retriever/fusion": retriever.fusion,
    }


@torch.no_grad()
def evaluate_kb_encoder(cfg: EvaluateConfig) -> tuple[SplitScores, dict]:
    """The scores of the knowledge base's own encoder, encoding the questions as it encoded the passages."""
    assert cfg.kb.dir is not None and cfg.data is not None  # EvaluateConfig.check requires both without a checkpoint
    kb_dir = str(Path(cfg.kb.dir).resolve())
    try:
        manifest = read_manifest(kb_dir)
    except KnowledgeBaseError as e:
        raise UserError(f"kb.dir: {e}") from None
    encoder_cfg = kb_encoder_config(manifest)
    fusion = cfg.retriever.fusion or "dense"
    check_fusion_index(fusion, manifest, kb_dir)
    model = fill_model_settings(ModelConfig(question_encoder=encoder_cfg))
    retriever = fill_score_scale(RetrieverConfig(fusion=fusion), model, encoder_cfg)
    if cfg.retriever.sparse_weight is not None:
        retriever.sparse_weight = cfg.retriever.sparse_weight
    score_scale = cast(float, retriever.score_scale)  # filled in above
    tokenizer = load_encoder_tokenizer(encoder_cfg, "kb.context_encoder")
    encoder = build_encoder(encoder_cfg, tokenizer, "kb.context_encoder").eval()
    prepare_data(cfg.data)
    examples = split_examples(cfg.data.dir, cfg)
    max_tokens = encoder_cfg.max_length or ModelConfig.max_question_tokens
    spec = ServiceSpec(kb_dir=kb_dir, num_shards=len(manifest.shards), num_replicas=1)
    ks = sorted(set(cfg.eval_k))
    scores = SplitScores(ks, answers=False)
    with serving_knowledge_base(spec, cfg.service) as spec:
        client, passages = RetrievalClient(spec), PassageTable(f"{kb_dir}/{manifest.passages_file}")
        depth = min(max(cfg.eval_k), len(passages))
        width = retriever.candidates_of(cast(int, model.n_docs))  # the prior's candidates, as in training
        for start in tqdm(
            range(0, len(examples), cfg.eval_batch_size), desc=f"evaluating {cfg.split}", unit="batch", mininterval=2.0
        ):
            chunk = examples[start : start + cfg.eval_batch_size]
            questions = [e.question for e in chunk]
            ids = tokenizer(questions, truncation=True, max_length=max_tokens)["input_ids"]
            texts = questions if fusion != "dense" else None
            result = client.search(encoder(pad(ids, tokenizer.pad_token_id)).float().numpy(), depth, texts)
            ranked_scores = result.scores
            if texts is not None:  # the union of dense and BM25 candidates, ranked by the fusion
                result, sparse_logits = rank_union(result, score_scale, fusion, retriever.sparse_weight, width)
                ranked_scores = fused(score_scale * result.scores, sparse_logits, fusion)
            batch = {
                "questions": questions,
                "answers": [e.answers for e in chunk],
                "gold_titles": [e.gold_titles for e in chunk],
            }
            scores.add(ranked_records(batch, result.ids, ranked_scores[:, :LISTED_PASSAGES], passages, ks))
    return scores, {
        "kb_dir": kb_dir,
        "data_dir": str(Path(cfg.data.dir).resolve()),
        "kb/index_version": manifest.active_version,
        "retriever/fusion": fusion,
    }


def split_examples(data_dir: str, cfg: EvaluateConfig) -> list[QAExample]:
    examples = read_split(data_dir, cfg.split)
    return examples[: cfg.max_eval_examples] if cfg.max_eval_examples else examples


def prediction_row(record: dict) -> dict:
    """An evaluated example as predictions.jsonl holds it: the record, with its EM and F1 (when it was answered)
    of all its scores."""
    row = {key: value for key, value in record.items() if key != "scores"}
    return {**row, **{name: record["scores"][name] for name in ("em", "f1") if name in record["scores"]}}


main = command("evaluate")(evaluate)  # python -m rag_lightning.evaluate, or rag-evaluate


if __name__ == "__main__":
    main()
