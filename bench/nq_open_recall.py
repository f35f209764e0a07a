"""Untrained retrieval on NQ-open: the bundled MiniLM used as its sentence-transformers folder says (mean pooling,
then L2 normalisation, the default) against the same MiniLM without the normalisation (the baseline: what the
project did before).

    python bench/nq_open_recall.py --source nq-open-oracle.jsonl.gz     # the file: docs/data.md, "NQ-open"

Both knowledge bases are built by the real build code from the NQ-open gold passages (experiment=nq_open's
preparation: 2,736 passages of 100 words); the test split's questions are encoded by the question encoder the
trainer builds. Figures: recall@k (a gold answer string in the top k, EM-normalised) and gold_recall@k (a gold
passage's title in the top k) for k = 1, 5, 20, and the ratio of the normalised to the baseline figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import measure_and_print

from rag_lightning.config import EncoderConfig, GeneratorTokenizerConfig, IndexConfig, KBConfig
from rag_lightning.data.prepare import write_nq_open
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.evaluation.scores import passage_ranks, retrieval_scores
from rag_lightning.kb.build import build_knowledge_base
from retrieval_workers.kb_store import PassageTable, load_embeddings, read_manifest

KS = (1, 5, 20)


def recall(kb_dir: Path, encoder_cfg: EncoderConfig, questions: list[dict]) -> dict[str, float]:
    manifest = read_manifest(kb_dir)
    embeddings = load_embeddings(kb_dir, manifest)
    passages = PassageTable(kb_dir / manifest.passages_file).titles_and_texts(range(manifest.num_passages))
    tokenizer = load_encoder_tokenizer(encoder_cfg)
    encoder = build_encoder(encoder_cfg, tokenizer).eval()
    ids = tokenizer(
        [q["question"] for q in questions], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        vectors = encoder(ids).numpy()
    top = np.argsort(-(vectors @ embeddings.T), axis=1, kind="stable")[:, : max(KS)]
    sums: dict[str, float] = {}
    for row, question in zip(top, questions):
        ranks = passage_ranks([passages[j] for j in row], question["answers"], question["gold_titles"])
        for name, value in retrieval_scores(*ranks, has_gold=True, ks=list(KS)).items():
            sums[name] = sums.get(name, 0.0) + value
    figures = {f"{name}@{k}": sums[f"{name}@{k}"] / len(questions) for k in KS for name in ("recall", "gold_recall")}
    return figures


def measure(args: argparse.Namespace, work: Path) -> dict:
    write_nq_open(str(args.source), work / "data")
    questions = [json.loads(line) for line in (work / "data" / "test.jsonl").read_text().splitlines()]
    results = {"questions": len(questions)}
    for name, normalize in (("normalised", True), ("baseline", False)):
        encoder_cfg = EncoderConfig(normalize=normalize)
        kb = KBConfig(
            source=str(work / "data" / "kb.jsonl"),
            dir=str(work / f"kb_{name}"),
            context_encoder=encoder_cfg,
            generator_tokenizer=GeneratorTokenizerConfig(kind="bpe", vocab_size=8000, extra_texts=[]),
        )
        manifest = build_knowledge_base(kb, IndexConfig(factory="Flat", shards=1))
        results["passages"] = manifest.num_passages
        results.update({f"{name}/{key}": value for key, value in recall(Path(kb.dir), encoder_cfg, questions).items()})
    for k in KS:
        for metric in (f"recall@{k}", f"gold_recall@{k}"):
            results[f"ratio/{metric}"] = results[f"normalised/{metric}"] / max(results[f"baseline/{metric}"], 1e-9)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        required=True,
        help="the NQ-open oracle file, as data=nq_open's data.source (docs/data.md)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data and knowledge bases here")
    measure_and_print(measure, parser.parse_args())


if __name__ == "__main__":
    main()
