"""RagModule: Hugging Face RAG-Sequence / RAG-Token trained with Lightning over our retrieval service.

One training step: encode the questions (gradients flow), ONE search call per shard for
the top-k passages with their embeddings and token ids, doc_scores = q . doc embeddings,
contexts = stored passage ids + question ids (laid out as transformers' RagRetriever does), then
the RAG marginal NLL. With retriever.train_ctx_encoder the retrieved passages are re-embedded by
the current context encoder, so gradients reach it too. Validation and test steps generate answers and return
each example's record and scores; the EvaluationMetrics callback adds them up.

What happens around the steps lives in callbacks (rag_lightning/callbacks/): index
versions in checkpoints, the background refresh, the saved context encoder, metrics.
"""
from __future__ import annotations

from dataclasses import fields

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from rag_lightning.config import EncoderConfig, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.errors import UserError
from rag_lightning.evaluation.scores import example_scores
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, tokenizer_fingerprint
from rag_lightning.model.contexts import ContextLayout, join_contexts
from rag_lightning.model.encoders import build_encoder, load_encoder_tokenizer, transformer_body
from rag_lightning.model.generator import build_rag, decoder_prefix
from rag_lightning.model.rag_folder import load_rag_folder
from retrieval_workers.encoding import POOLER, TextEncoder
from retrieval_workers.kb_store import PassageTable, read_manifest
from retrieval_workers.service import RetrievalClient
from retrieval_workers.types import SearchResult, ServiceSpec


class RagModule(L.LightningModule):
    """model, retriever, optim and service are plain dicts (of ModelConfig, RetrieverConfig, OptimConfig,
    ServiceSpec) so checkpoints hold no custom classes; the generator tokenizer is the one saved in the
    knowledge base. data_dir, the QA files it trains on, is what the evaluate command reads by default.

    The process must be attached to the Ray cluster of the service (retrieval_workers.ray_runtime.connect)
    before the module is set up.
    """

    def __init__(self, model: dict, retriever: dict, optim: dict, service: dict, data_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg: ModelConfig = _structured(ModelConfig, model).fill_unset()
        self.retriever_cfg: RetrieverConfig = _structured(RetrieverConfig, retriever)
        self.optim_cfg: OptimConfig = _structured(OptimConfig, optim)
        self.service_spec = ServiceSpec(**service)
        manifest = read_manifest(self.service_spec.kb_dir)
        self.passages_file = manifest.passages_file
        self.generator_tokenizer = self._generator_tokenizer(f"{self.service_spec.kb_dir}/"
                                                             f"{manifest.encoder['generator_tokenizer']}")
        if self.model_cfg.init_from is None:
            self.question_tokenizer = load_encoder_tokenizer(self.model_cfg.question_encoder, "model.question_encoder")
            self.question_encoder = build_encoder(self.model_cfg.question_encoder, self.question_tokenizer,
                                                  "model.question_encoder")
            self.rag = build_rag(self.model_cfg, self.question_encoder, self.generator_tokenizer)
        else:       # a whole RAG folder: its DPR question encoder scores passages by its pooler output
            self.rag, self.question_tokenizer = load_rag_folder(self.model_cfg, self.generator_tokenizer)
            self.question_encoder = TextEncoder(self.rag.question_encoder, POOLER, self.question_tokenizer.pad_token_id,
                                                self.question_tokenizer.sep_token_id)
        self.decoder_prefix = decoder_prefix(self.generator_tokenizer, self.rag.generator.config.decoder_start_token_id)
        self.context_layout = ContextLayout.of(self.generator_tokenizer,
                                               getattr(self.rag.generator.config, "prefix", None))
        self.question_encoder.requires_grad_(self.retriever_cfg.train_question_encoder)
        self.rag.generator.requires_grad_(self.model_cfg.generator.train)
        self.context_encoder: TextEncoder | None = None
        if self.retriever_cfg.train_ctx_encoder:     # the knowledge base's encoder, from the weights that built it
            self.context_encoder_cfg = _structured(EncoderConfig, {f.name: manifest.encoder[f.name]
                                                                   for f in fields(EncoderConfig)
                                                                   if f.name in manifest.encoder})
            self.context_tokenizer = load_encoder_tokenizer(self.context_encoder_cfg, "kb.context_encoder")
            self.context_encoder = build_encoder(self.context_encoder_cfg, self.context_tokenizer,
                                                 "kb.context_encoder")
        for encoder in (self.question_encoder, self.context_encoder):
            if encoder is not None and self.retriever_cfg.freeze_embeddings:
                encoder.model.get_input_embeddings().requires_grad_(False)
        if self.model_cfg.gradient_checkpointing:
            encoders = [e for e in (self.question_encoder, self.context_encoder) if e is not None]
            for model in (self.rag.generator, *(transformer_body(e.model) for e in encoders)):
                # non-reentrant: correct when a checkpointed block's inputs need no gradient (frozen embeddings)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.retrieval_client: RetrievalClient | None = None
        self.passages: PassageTable | None = None
        self.train()        # from_pretrained leaves a model in eval mode, and Lightning keeps the modes it finds

    def train(self, mode: bool = True) -> RagModule:
        """Training mode (dropout on) for the parts that train; a frozen part stays in eval mode, so a fixed
        retriever or reader behaves in training as it does at evaluation."""
        super().train(mode)
        for part, trains in ((self.question_encoder, self.retriever_cfg.train_question_encoder),
                             (self.context_encoder, self.retriever_cfg.train_ctx_encoder),
                             (self.rag.generator, self.model_cfg.generator.train)):
            if part is not None and not trains:
                part.eval()
        return self

    def _generator_tokenizer(self, kb_tokenizer_dir: str):
        """The knowledge base's generator tokenizer, which made the passages' ids; a pretrained generator brings
        its own, and the two must be one."""
        kb_tokenizer = load_generator_tokenizer(kb_tokenizer_dir)
        own_dir = self.model_cfg.own_generator_tokenizer()
        if own_dir is None:
            return kb_tokenizer
        own = load_generator_tokenizer(own_dir)
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(kb_tokenizer):
            key = "model.init_from" if self.model_cfg.init_from is not None else "model.generator.pretrained"
            raise UserError(f"{key}: {own_dir} tokenizes with {tokenizer_fingerprint(own)}, the knowledge base "
                            f"{self.service_spec.kb_dir} with {tokenizer_fingerprint(kb_tokenizer)} "
                            f"({kb_tokenizer_dir}); build it with kb.generator_tokenizer.path={own_dir}")
        return own

    def setup(self, stage: str) -> None:
        """Attach to the service's shard actors and open the passage table."""
        if self.retrieval_client is None:
            self.retrieval_client = RetrievalClient(self.service_spec, replica_offset=self.global_rank)
            self.passages = PassageTable(f"{self.service_spec.kb_dir}/{self.passages_file}")

    # --- retrieval ---------------------------------------------------------------------------------------

    def retrieve(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SearchResult]:
        """doc_scores [B, k] (differentiable in the question encoder), contexts [B*k, L] and their mask."""
        q = self.question_encoder(batch["question_ids"])
        result = self.retrieval_client.search(q.detach().float().cpu().numpy(), self.model_cfg.n_docs)
        doc_embeddings = self.embed_passages(result.ids).to(q) if self.context_encoder is not None \
            else torch.from_numpy(result.embeddings).to(q)
        doc_scores = self.retriever_cfg.score_scale * torch.einsum("bd,bkd->bk", q, doc_embeddings)
        context_ids, context_mask = join_contexts(result.token_ids, result.lengths, batch["question_generator_ids"],
                                                  self.context_layout, self.model_cfg.max_context_tokens)
        return doc_scores, context_ids.to(self.device), context_mask.to(self.device), result

    def embed_passages(self, ids: np.ndarray) -> torch.Tensor:
        """Embed the passages with these ids [B, k] by the current context encoder: [B, k, D], with gradients."""
        token_ids = self.passages.padded_token_ids("encoder_ids", ids, self.context_encoder.pad_token_id)
        return self.context_encoder(torch.from_numpy(token_ids).to(self.device)).view(*ids.shape, -1)

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        doc_scores, context_ids, context_mask, result = self.retrieve(batch)
        out = self.rag(context_input_ids=context_ids, context_attention_mask=context_mask, doc_scores=doc_scores,
                       labels=batch["labels"], n_docs=self.model_cfg.n_docs, reduce_loss=False)
        loss = out.loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["answers"]))
        return {"loss": loss, "retrieved_ids": result.ids, "index_version": result.version,
                "search_ms": self.retrieval_client.last_search_ms}

    def configure_optimizers(self):
        """AdamW over the trainable parameters only (a frozen part holds no optimizer state), one learning rate
        for the generator and one for each encoder."""
        groups = []
        for part, lr in ((self.rag.generator, self.optim_cfg.lr),
                         (self.question_encoder, self.optim_cfg.question_encoder_lr),
                         (self.context_encoder, self.optim_cfg.ctx_encoder_lr)):
            params = [p for p in part.parameters() if p.requires_grad] if part is not None else []
            if params:
                groups.append({"params": params, "lr": lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=self.optim_cfg.weight_decay, fused=True)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self.optim_cfg.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.optim_cfg.schedule == "constant":
                return 1.0
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- evaluation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict_answers(self, batch: dict) -> tuple[list[str], SearchResult]:
        doc_scores, context_ids, context_mask, result = self.retrieve(batch)
        return self.generate_answers(doc_scores, context_ids, context_mask), result

    def generate_answers(self, doc_scores: torch.Tensor, context_ids: torch.Tensor,
                         context_mask: torch.Tensor) -> list[str]:
        generated = self.rag.generate(context_input_ids=context_ids, context_attention_mask=context_mask,
                                      doc_scores=doc_scores, n_docs=self.model_cfg.n_docs,
                                      num_beams=self.model_cfg.num_beams,
                                      max_new_tokens=self.model_cfg.max_answer_tokens)
        return self.generator_tokenizer.batch_decode(generated, skip_special_tokens=True)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict) -> list[dict]:
        """A record of each example: question, prediction, gold answers and titles, the retrieved passages, and
        its scores (EM, F1, answer recall@k, answer NLL, gold-passage recall where the gold titles are known)."""
        doc_scores, context_ids, context_mask, result = self.retrieve(batch)
        predictions = self.generate_answers(doc_scores, context_ids, context_mask)
        nll = self.rag(context_input_ids=context_ids, context_attention_mask=context_mask, doc_scores=doc_scores,
                       labels=batch["labels"], n_docs=self.model_cfg.n_docs, reduce_loss=False).loss
        k = self.model_cfg.n_docs
        passages = self.passages.titles_and_texts(result.ids)
        records = []
        for i, (prediction, answers, gold_titles) in enumerate(zip(predictions, batch["answers"],
                                                                   batch["gold_titles"])):
            retrieved = passages[i * k:(i + 1) * k]
            scores = example_scores(prediction, answers, gold_titles, retrieved, float(nll[i]))
            records.append({
                "question": batch["questions"][i], "prediction": prediction, "answers": answers,
                "gold_titles": gold_titles,
                "retrieved": [{"id": int(result.ids[i, j]), "title": title, "score": float(result.scores[i, j])}
                              for j, (title, _) in enumerate(retrieved)],
                "scores": scores})
        return records

    def validation_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self.evaluate_batch(batch)

    def test_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self.evaluate_batch(batch)


def _structured(schema, values: dict):
    """A config dataclass from a plain dict, checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
