"""Evaluate a checkpoint: `python -m rag_lightning.evaluate ckpt_path=... [data=...] [split=test]`.

Answers every question of the split with the checkpoint's model and its knowledge base,
and writes into the run directory results.json (exact match, F1, answer recall@k,
gold-passage recall@k where the data names the gold passages, answer NLL) and
predictions.jsonl (each question with its prediction, gold answers, and the retrieved
passages' titles and scores).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from rag_lightning.command import command
from rag_lightning.config import EvaluateConfig
from rag_lightning.data.datamodule import TokenizedQA, eval_loader
from rag_lightning.data.prepare import prepare_data
from rag_lightning.data.qa_files import read_split
from rag_lightning.errors import UserError
from rag_lightning.evaluation.scores import SplitScores
from rag_lightning.model.trained_model import load_trained_model, serving
from retrieval_workers.atomic_files import atomic_write_bytes

log = logging.getLogger(__name__)


def evaluate(cfg: EvaluateConfig) -> dict:
    """The checkpoint's metrics on the split; writes results.json and predictions.jsonl into the run dir."""
    started = time.time()
    trained = load_trained_model(cfg.ckpt_path)
    module = trained.module
    if cfg.data is not None:
        prepare_data(cfg.data)
        data_dir = cfg.data.dir
    elif module.hparams.get("data_dir"):
        data_dir = module.hparams.data_dir
    else:
        raise UserError(f"data: {cfg.ckpt_path} does not record its QA files; give data=files data.dir=DIR")
    examples = read_split(data_dir, cfg.split)
    if cfg.max_examples:
        examples = examples[:cfg.max_examples]
    dataset = TokenizedQA(examples, module.question_tokenizer, module.generator_tokenizer, module.decoder_prefix,
                          module.model_cfg.max_question_tokens, module.model_cfg.max_answer_tokens)
    loader = eval_loader(dataset, cfg.batch_size, module.question_tokenizer.pad_token_id,
                         module.generator_tokenizer.pad_token_id)
    scores = SplitScores(module.model_cfg.n_docs)
    with serving(trained, cfg.service) as index_version:
        for batch in tqdm(loader, desc=f"evaluating {cfg.split}", unit="batch", mininterval=2.0):
            scores.add(module.evaluate_batch(batch))

    results = {**scores.metrics(cfg.split),
               "ckpt_path": str(Path(cfg.ckpt_path).resolve()), "data_dir": str(Path(data_dir).resolve()),
               "kb/index_version": index_version, "wall_time_s": round(time.time() - started, 1)}
    run_dir = Path(cfg.paths.run_dir)
    atomic_write_bytes(run_dir / "predictions.jsonl",
                       "".join(json.dumps(prediction_row(record)) + "\n" for record in scores.records).encode())
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    log.info("results: %s", json.dumps(results))
    return results


def prediction_row(record: dict) -> dict:
    """An evaluated example as predictions.jsonl holds it: the record, with its EM and F1 of all its scores."""
    row = {key: value for key, value in record.items() if key != "scores"}
    return {**row, "em": record["scores"]["em"], "f1": record["scores"]["f1"]}


main = command("evaluate")(evaluate)      # python -m rag_lightning.evaluate, or rag-evaluate


if __name__ == "__main__":
    main()
