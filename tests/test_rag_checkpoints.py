"""Whole RAG checkpoints (`model.init_from`): a folder as transformers writes it runs with us exactly as plain
transformers runs it (retrieving through its RagRetriever over our passages and index), and trains."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from rag_lightning.config import EncoderConfig, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.kb.hf_format import HFPassages, write_hf_passages
from rag_lightning.model.generator import RAG_CLASSES
from rag_lightning.model.rag_folder import write_rag_folder
from rag_lightning.model.rag_module import RagModule
from retrieval_workers.kb_store import PassageTable, load_embeddings, read_manifest
from retrieval_workers.service import shutdown_service

from helpers import (
    demo_data,
    demo_generator_folder,
    qa_data_and_first_batch,
    running_service,
    train_on_one_batch,
    write_encoder_folder,
)

N_DOCS, MAX_COMBINED_LENGTH, BATCH = 2, 96, 4  # long enough that no context is cut (transformers cuts elsewhere)


@pytest.mark.slow
@pytest.mark.parametrize("kind, family", [("rag_sequence", "bart"), ("rag_sequence", "t5"), ("rag_token", "t5")])
def test_a_rag_folder_scores_and_answers_as_plain_transformers_and_trains(ray_cluster, tmp_path_factory, kind, family):
    """DPR question encoder + BART (RAG-Sequence) and + T5 with a task prefix in its config (both kinds), tiny and
    random; the knowledge base is encoded by a DPR context encoder and tokenized by the folder's generator
    tokenizer. Scores use the default retriever.score_scale: 1 for a RAG folder's DPR encoder."""
    from transformers import RagRetriever

    folder = tmp_path_factory.mktemp(kind)
    data_dir = demo_data(tmp_path_factory)
    generator = demo_generator_folder(folder / "generator", family, data_dir)
    if family == "t5":  # where transformers' RAG reads the prefix: the generator's config
        config = json.loads((generator / "config.json").read_text())
        (generator / "config.json").write_text(json.dumps({**config, "prefix": "answer: "}))
    rag_dir = write_rag_folder(
        folder / "rag",
        write_encoder_folder(folder / "question", "dpr_question"),
        generator,
        n_docs=N_DOCS,
        max_combined_length=MAX_COMBINED_LENGTH,
    )
    generator_config = json.loads((rag_dir / "config.json").read_text())["generator"]
    assert ("bos_token_id" in generator_config) == (family == "bart")  # as transformers writes a T5's: none
    context_encoder = EncoderConfig(pretrained=str(write_encoder_folder(folder / "context", "dpr_context")))
    _, spec = running_service(
        tmp_path_factory, context_encoder, data_dir, generator_tokenizer=str(rag_dir / "generator_tokenizer")
    )
    try:
        model_cfg = ModelConfig(kind=kind, init_from=str(rag_dir), num_beams=2, max_answer_tokens=8)
        module = RagModule(
            model=asdict(model_cfg),
            retriever=asdict(RetrieverConfig(train_question_encoder=True)),
            optim=asdict(OptimConfig()),
            service=asdict(spec),
        )
        assert module.retriever_cfg.score_scale == 1.0
        module.setup("fit")
        assert (module.model_cfg.n_docs, module.model_cfg.max_context_tokens) == (N_DOCS, MAX_COMBINED_LENGTH)
        assert bool(module.context_layout.prefix) == (family == "t5")  # read from the folder's generator
        _, batch = qa_data_and_first_batch(module, data_dir, module.model_cfg, BATCH)
        module.eval()
        with torch.no_grad():
            retrieved = module.retrieve(batch)
            doc_scores, context_ids, context_mask = module.reader_inputs(batch, retrieved)
            loss, _ = module.reader_nll(batch, retrieved, doc_scores)
            answers = module.generate_answers(batch, retrieved)

        # plain transformers: the same folder, retrieving over our passages and index as our export writes them
        manifest = read_manifest(spec.kb_dir)
        titles, texts = zip(
            *PassageTable(f"{spec.kb_dir}/{manifest.passages_file}").titles_and_texts(range(manifest.num_passages))
        )
        passages, index = folder / "passages", folder / "index.faiss"
        embeddings = load_embeddings(spec.kb_dir, manifest)
        write_hf_passages(passages, index, HFPassages(list(titles), list(texts), embeddings), manifest.index_factory)
        retriever = RagRetriever.from_pretrained(
            str(rag_dir), index_name="custom", passages_path=str(passages), index_path=str(index)
        )
        theirs = RAG_CLASSES[kind].from_pretrained(str(rag_dir)).eval()
        if family == "t5":  # plain transformers' RAG-Sequence loss reads the generator's bos_token_id, which
            #                     a T5 config lacks (an AttributeError): the reference gets the None ours has
            theirs.config.generator.bos_token_id = None
        theirs.set_retriever(retriever)
        inputs = module.question_tokenizer(
            batch["questions"], padding=True, return_token_type_ids=False, return_tensors="pt"
        )
        with torch.no_grad():
            out = theirs(**inputs, labels=batch["labels"], reduce_loss=False, output_retrieved=True)
            generated = theirs.generate(**inputs, num_beams=2, max_new_tokens=8)

        assert out.retrieved_doc_ids.tolist() == retrieved.ids.tolist()
        torch.testing.assert_close(out.doc_scores, doc_scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-4)
        assert retriever.generator_tokenizer.batch_decode(generated, skip_special_tokens=True) == answers

        # and it trains: the loss falls, the generator and the question encoder move
        module.train()  # both parts were loaded in eval mode (from_pretrained); both train, with dropout
        parts = (module.question_encoder, module.rag.generator)
        assert all(m.training for part in parts for m in part.modules())
        before = [[p.detach().clone() for p in part.parameters()] for part in parts]
        losses = train_on_one_batch(module, batch, steps=20)
        assert losses[-1] < 0.85 * losses[0], losses
        for part, weights in zip(parts, before):
            assert any(not torch.equal(p, w) for p, w in zip(part.parameters(), weights))
    finally:
        shutdown_service(spec)
