"""Export a checkpoint to transformers' own RAG format: `python -m rag_lightning.export ckpt_path=... out=DIR`.

DIR receives a RAG model folder (config, weights, and the question-encoder and generator
tokenizers), `passages/` (a `datasets` folder: title, text, embeddings) and `index.faiss`
(one index over every passage, of the knowledge base's factory). Plain transformers then
answers like `rag_lightning.generate`:

    retriever = RagRetriever.from_pretrained(DIR, index_name="custom",
                                             passages_path=f"{DIR}/passages", index_path=f"{DIR}/index.faiss")
    model = RagSequenceForGeneration.from_pretrained(DIR, retriever=retriever)   # or RagToken
    model.generate(input_ids=..., attention_mask=..., num_beams=B, max_new_tokens=T)

with B and T the training config's model.num_beams and model.max_answer_tokens (the export
prints them).

transformers' RAG scores passages by the pooler output of a DPRQuestionEncoder, unscaled. A DPR
question encoder is exported as it is; a BERT-style one becomes a DPRQuestionEncoder of the
same weights (whose output is the [CLS] vector), so it exports exactly only when trained with
`model.question_encoder.pooling=cls` and `normalize=false`; and every model needs
`retriever.score_scale=1` (the default for vectors that are not normalised). `train` says at start-up when a
run's checkpoints will not export exactly (export_mismatch).
The passages carry the embeddings of the index version the checkpoint trained against.
The folder is written beside DIR and renamed into place when complete.

A model whose generator is a causal LM, which transformers' RAG classes cannot hold, exports as folders that
load one by one (rag_lightning/model/causal_folder.py): `generator/` (AutoModelForCausalLM, LoRA adapters merged
in), `question_encoder/` (sentence-transformers), the passages and index, and `rag_lightning.json` (kind, n_docs,
prompt, chat template, score scale, lengths); the README shows plain transformers and faiss answering from it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from transformers import DPRConfig, DPRQuestionEncoder, RagConfig, RagTokenizer

from rag_lightning.command import command
from rag_lightning.config import ExportConfig
from rag_lightning.encoders.folders import save_encoder_folder
from rag_lightning.errors import UserError
from rag_lightning.kb.hf_format import HFPassages, write_hf_passages
from rag_lightning.kb.passage_text import DOC_SEP, TITLE_SEP
from rag_lightning.model.causal_folder import GENERATOR_DIR, QUESTION_ENCODER_DIR, CausalExport, write_causal_settings
from rag_lightning.model.generator import RAG_CLASSES
from rag_lightning.model.lora import merged
from rag_lightning.model.rag_folder import export_mismatch
from rag_lightning.model.rag_module import RagModule
from rag_lightning.model.trained_model import TrainedModel, index_version_to_serve, load_trained_model
from retrieval_workers import PassageTable, load_embeddings, read_manifest

log = logging.getLogger(__name__)
PASSAGES, INDEX = "passages", "index.faiss"


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint's model and knowledge base into cfg.out; returns that folder."""
    out = Path(cfg.out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out: {out} exists and is not an empty folder; export writes a new one")
    trained = load_trained_model(cfg.ckpt_path)
    module = trained.module
    encoder = module.question_encoder
    mismatch = export_mismatch(encoder.pooling, encoder.normalize, module.score_scale)
    if mismatch is not None and not module.causal:
        raise UserError(f"ckpt_path: {cfg.ckpt_path} was trained with {mismatch}")
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"out: cannot write beside {out} ({e.strerror})") from None
    try:
        passages, factory = _knowledge_base(trained)
        if module.causal:
            _write_causal_model(module, staging)
        else:
            _write_rag_model(module, staging, out)
        write_hf_passages(staging / PASSAGES, staging / INDEX, passages, factory)
        if out.exists():
            out.rmdir()  # the empty folder checked above
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # our own unfinished folder
    log.info(
        "exported %s (%d passages) to %s; it was evaluated with generate(num_beams=%d, max_new_tokens=%d)",
        cfg.ckpt_path,
        len(passages.titles),
        out,
        module.model_cfg.num_beams,
        module.model_cfg.max_answer_tokens,
    )
    return out


def _write_rag_model(module: RagModule, staging: Path, out: Path) -> None:
    """transformers' RAG folder of the module, its passages and index to be at out."""
    rag = _transformers_model(module, passages_path=out / PASSAGES, index_path=out / INDEX)
    rag.save_pretrained(str(staging))
    # transformers 5 hands from_pretrained's `retriever=` on to GenerationConfig.from_pretrained, which
    # fails on it when the folder has a generation_config.json (RagToken writes one), so leave it out
    (staging / "generation_config.json").unlink(missing_ok=True)
    RagTokenizer(question_encoder=module.question_tokenizer, generator=module.generator_tokenizer).save_pretrained(
        str(staging)
    )


def _write_causal_model(module: RagModule, staging: Path) -> None:
    """The generator (adapters merged) and question encoder folders of a causal-LM model, and its settings."""
    generator = merged(module.rag.generator) if module.uses_lora else module.rag.generator
    generator.save_pretrained(str(staging / GENERATOR_DIR))
    module.generator_tokenizer.save_pretrained(str(staging / GENERATOR_DIR))
    cfg = module.model_cfg
    save_encoder_folder(
        module.question_encoder, module.question_tokenizer, staging / QUESTION_ENCODER_DIR, cfg.max_question_tokens
    )
    write_causal_settings(
        staging,
        CausalExport(
            kind=cfg.kind,
            n_docs=module.n_docs,
            prompt=cfg.prompt,
            chat_template=cfg.chat_template,
            score_scale=module.score_scale,
            max_context_tokens=module.max_context_tokens,
            max_question_tokens=cfg.max_question_tokens,
            max_answer_tokens=cfg.max_answer_tokens,
            num_beams=cfg.num_beams,
        ),
    )


def _knowledge_base(trained: TrainedModel) -> tuple[HFPassages, str]:
    """Every passage with its embedding in the index version the checkpoint trained against (else the active one)."""
    kb_dir = trained.module.service_spec.kb_dir
    manifest = read_manifest(kb_dir)
    version = index_version_to_serve(trained, manifest)
    table = PassageTable(f"{kb_dir}/{manifest.passages_file}")
    titles, texts = zip(*table.titles_and_texts(range(manifest.num_passages)))
    return HFPassages(list(titles), list(texts), load_embeddings(kb_dir, manifest, version)), manifest.index_factory


def _transformers_model(module: RagModule, passages_path: Path, index_path: Path):
    """The module's RAG model with its question encoder as a DPRQuestionEncoder."""
    question_encoder = as_dpr_question_encoder(module.question_encoder.model)
    generator = module.rag.generator
    cfg = module.model_cfg
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config,
        generator.config,
        n_docs=cfg.n_docs,
        max_combined_length=cfg.max_context_tokens,
        retrieval_vector_size=module.question_encoder.dim,
        title_sep=TITLE_SEP,
        doc_sep=DOC_SEP,
        label_smoothing=cfg.label_smoothing,
        index_name="custom",
        passages_path=str(passages_path),
        index_path=str(index_path),
    )
    return RAG_CLASSES[cfg.kind](config=config, question_encoder=question_encoder, generator=generator).eval()


def as_dpr_question_encoder(model) -> DPRQuestionEncoder:
    """A DPR question encoder as it is; a BERT as a DPRQuestionEncoder of the same weights."""
    if isinstance(model, DPRQuestionEncoder):
        return model
    if model.config.model_type != "bert":
        raise UserError(
            f"model.question_encoder: a {model.config.model_type} model has no DPR equivalent; "
            "export needs a BERT-style or DPR question encoder"
        )
    dpr_config = DPRConfig(
        **{
            key: getattr(model.config, key)
            for key in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "max_position_embeddings",
                "type_vocab_size",
                "initializer_range",
                "layer_norm_eps",
                "pad_token_id",
            )
        }
    )
    question_encoder = DPRQuestionEncoder(dpr_config)
    question_encoder.question_encoder.bert_model.load_state_dict(model.state_dict())
    return question_encoder


main = command("export")(export)  # python -m rag_lightning.export, or rag-export


if __name__ == "__main__":
    main()
