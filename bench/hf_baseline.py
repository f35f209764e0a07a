"""The plain Hugging Face RAG training loop: what one writes with transformers alone, the benchmarks' baseline.

transformers' RagRetriever over a `datasets` table of the passages with a FAISS HNSW index (built as transformers'
RAG example use_own_knowledge_dataset.py builds one), attached to a RagSequenceForGeneration or
RagTokenForGeneration, which then retrieves inside its forward pass; a torch AdamW loop over batches of questions.
Every step is timed, the first included. The last stdout line is one JSON object with `steps_per_s`.

    python bench/hf_baseline.py --kb kb.tsv --qa train.jsonl --tokenizer TOKENIZER_DIR --dim 128 --layers 2 \\
        --heads 4 --batch 8 --n_docs 5 --max_combined_length 128 --steps 30 --model token
    python bench/hf_baseline.py --kb kb.tsv --qa train.jsonl --rag_dir RAG_DIR --batch 8 --n_docs 5 \\
        --max_combined_length 128 --steps 8 --model sequence

--kb: a TSV file, a header `title<TAB>text` then a passage a line. --qa: JSON lines {"question": str, "answers":
[str, ...]}, trained on in order (the first answer), from the top again when they run out. --tokenizer: a saved
tokenizer for both sides of tiny random models (a DPR question encoder and a BART generator of --dim, --layers,
--heads). --rag_dir: a RAG folder as transformers saves one (the model's and a RagTokenizer's save_pretrained),
trained instead. The passages' vectors are random, of the question encoder's size: the speed of a step does not
depend on what they hold. `python bench/train_throughput.py --work-dir DIR` leaves such files in DIR (kb.tsv,
data/train.jsonl, tokenizer/, pretrained/rag/).
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import datasets
import faiss
import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    DPRConfig,
    RagConfig,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)
from transformers.models.rag.retrieval_rag import CustomHFIndex

MODELS = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
HNSW_LINKS = 128  # use_own_knowledge_dataset.py's default number of links a vector (its `m`)
MAX_QUESTION_TOKENS = 32
LR, SEED = 1e-4, 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kb", required=True, help="passages: TSV with title and text columns")
    p.add_argument("--qa", required=True, help="questions: JSON lines with question and answers")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--tokenizer", help="tokenizer folder of tiny random models of --dim, --layers, --heads")
    weights.add_argument("--rag_dir", help="a saved RAG model and RagTokenizer, trained instead")
    for size in ("dim", "layers", "heads"):
        p.add_argument(f"--{size}", type=int, help="size of the tiny models (with --tokenizer)")
    for size in ("batch", "n_docs", "max_combined_length", "steps"):
        p.add_argument(f"--{size}", type=int, required=True)
    p.add_argument("--model", choices=MODELS, required=True, help="RAG-Sequence or RAG-Token")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.tokenizer and None in (args.dim, args.layers, args.heads):
        p.error("--tokenizer needs --dim, --layers and --heads")
    return args


def tiny_rag(args: argparse.Namespace) -> tuple[RagConfig, RagTokenizer]:
    """The config of a random DPR question encoder and BART generator, both over the tokenizer in --tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    both = dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    question_encoder = DPRConfig(
        hidden_size=args.dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.dim,
        **both,
    )
    generator = BartConfig(
        d_model=args.dim,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=4 * args.dim,
        decoder_ffn_dim=4 * args.dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        **both,
    )
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder, generator, retrieval_vector_size=args.dim
    )
    return config, RagTokenizer(question_encoder=tokenizer, generator=tokenizer)


def hnsw_retriever(config: RagConfig, tokenizer: RagTokenizer, kb_file: str) -> RagRetriever:
    """A RagRetriever over the passages of kb_file, each with a random vector, in a datasets table with HNSW."""
    with open(kb_file, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    dim = config.retrieval_vector_size
    vectors = np.random.default_rng(SEED).standard_normal((len(rows), dim), dtype=np.float32)
    table = datasets.Dataset.from_dict(
        {"title": [row["title"] for row in rows], "text": [row["text"] for row in rows], "embeddings": list(vectors)}
    )
    table.add_faiss_index("embeddings", custom_index=faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT))
    return RagRetriever(config, tokenizer.question_encoder, tokenizer.generator, index=CustomHFIndex(dim, table))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    if args.rag_dir:
        config, tokenizer = RagConfig.from_pretrained(args.rag_dir), RagTokenizer.from_pretrained(args.rag_dir)
    else:
        config, tokenizer = tiny_rag(args)
    config.n_docs, config.max_combined_length = args.n_docs, args.max_combined_length
    retriever = hnsw_retriever(config, tokenizer, args.kb)
    model_class = MODELS[args.model]
    model = model_class.from_pretrained(args.rag_dir, config=config) if args.rag_dir else model_class(config)
    model.set_retriever(retriever)
    with open(args.qa, encoding="utf-8") as f:
        qa = [(row["question"], row["answers"][0]) for row in map(json.loads, f)]

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    started = time.perf_counter()
    for step in range(args.steps):
        questions, answers = zip(*(qa[(step * args.batch + i) % len(qa)] for i in range(args.batch)))
        inputs = tokenizer.question_encoder(
            list(questions), padding=True, truncation=True, max_length=MAX_QUESTION_TOKENS, return_tensors="pt"
        )
        labels = tokenizer.generator(list(answers), padding=True, return_tensors="pt")["input_ids"]
        # the model retrieves (question encoder, then the retriever), then gives the marginal NLL
        loss = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, reduce_loss=True
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "system": "hf_baseline",
                "model": args.model,
                "rag_dir": args.rag_dir,
                "steps": args.steps,
                "steps_per_s": round(args.steps / seconds, 4),
                "loss_first": losses[0],
                "loss_last": losses[-1],
            }
        )
    )


if __name__ == "__main__":
    main()
