"""RagModule: Hugging Face RAG-Sequence / RAG-Token trained with Lightning over our retrieval service.

One training step: encode the questions (gradients flow), ONE search call per shard for
the top-k passages with their embeddings and token ids, doc_scores = q . doc embeddings,
contexts = stored passage ids + question ids, then the RAG marginal NLL. With
retriever.train_ctx_encoder the retrieved passages are re-embedded by the current context
encoder, so gradients reach it too. Validation and test generate answers and report
exact match, F1, retrieval recall@k, gold-passage recall (where the data names the gold
passages) and the answers' NLL, summed over every process's share of the split, so the
figures are the whole split's.

A checkpoint records the index version it trained against; loading it makes that
version active again (if it is still on disk).
"""
from __future__ import annotations

import logging
import time
from dataclasses import fields
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from rag_lightning.callbacks.index_refresh import IndexRefresh
from rag_lightning.config import EncoderConfig, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.evaluation.metrics import answer_in_passages, exact_match, f1_score
from rag_lightning.evaluation.scores import eval_metrics, eval_sum_names
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer
from rag_lightning.model.contexts import join_contexts
from rag_lightning.model.encoders import build_encoder, load_encoder_tokenizer
from rag_lightning.model.generator import build_rag
from retrieval_workers.encoding import TextEncoder
from retrieval_workers.kb_store import (
    KnowledgeBaseError,
    PassageTable,
    activate_kept_version,
    read_manifest,
    staged_directory,
)
from retrieval_workers.ray_runtime import connect
from retrieval_workers.service import RetrievalClient, switch_version
from retrieval_workers.types import SearchResult, ServiceSpec

log = logging.getLogger(__name__)



class RagModule(L.LightningModule):
    """model, retriever, optim and service are plain dicts (of ModelConfig, RetrieverConfig, OptimConfig,
    ServiceSpec) so checkpoints hold no custom classes; the generator tokenizer is the one saved in the
    knowledge base. data_dir, the QA files it trains on, is what the evaluate command reads by default."""

    def __init__(self, model: dict, retriever: dict, optim: dict, service: dict, ray_address: str | None = None,
                 data_dir: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg: ModelConfig = _structured(ModelConfig, model)
        self.retriever_cfg: RetrieverConfig = _structured(RetrieverConfig, retriever)
        self.optim_cfg: OptimConfig = _structured(OptimConfig, optim)
        self.service_spec = ServiceSpec(**service)
        manifest = read_manifest(self.service_spec.kb_dir)
        self.passages_file = manifest.passages_file
        self.index_version = manifest.active_version     # the index version the last training step used
        self.generator_tokenizer = load_generator_tokenizer(
            f"{self.service_spec.kb_dir}/{manifest.encoder['generator_tokenizer']}")
        self.question_encoder = build_encoder(self.model_cfg.question_encoder,
                                              load_encoder_tokenizer(self.model_cfg.question_encoder))
        self.rag = build_rag(self.model_cfg, self.question_encoder, self.generator_tokenizer)
        self.question_encoder.requires_grad_(self.retriever_cfg.train_question_encoder)
        self.context_encoder: TextEncoder | None = None
        if self.retriever_cfg.train_ctx_encoder:
            self.context_encoder_cfg = _structured(EncoderConfig, {f.name: manifest.encoder[f.name]
                                                                   for f in fields(EncoderConfig)})
            self.context_encoder = build_encoder(self.context_encoder_cfg,
                                                 load_encoder_tokenizer(self.context_encoder_cfg))
        for encoder in (self.question_encoder, self.context_encoder):
            if encoder is not None and self.retriever_cfg.freeze_embeddings:
                encoder.model.get_input_embeddings().requires_grad_(False)
        self.retriever: RetrievalClient | None = None
        self.passages: PassageTable | None = None
        self.version_to_restore: tuple[int, int] | None = None    # (index version, global step) of a checkpoint
        self.saved_context_encoder_step = -1
        self.last_search_ms = 0.0                  # wall time of the last search call
        self.eval_sums: dict[str, float] = {}     # per-metric sums over this process's evaluated examples
        self.eval_examples = 0
        self.eval_records: list[dict] = []         # one per evaluated example: question, prediction, retrieved, ...

    # --- retrieval ---------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Attach to the job's shard actors (started by the launching process) and open the passage table."""
        if self.retriever is None:
            connect(self.hparams.ray_address, namespace=self.service_spec.namespace)
            self.retriever = RetrievalClient(self.service_spec, replica_offset=self.global_rank)
            self.passages = PassageTable(f"{self.service_spec.kb_dir}/{self.passages_file}")

    def retrieve(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SearchResult]:
        """doc_scores [B, k] (differentiable in the question encoder), contexts [B*k, L] and their mask."""
        q = self.question_encoder(batch["question_ids"])
        started = time.perf_counter()
        result = self.retriever.search(q.detach().float().cpu().numpy(), self.model_cfg.n_docs)
        self.last_search_ms = 1000 * (time.perf_counter() - started)
        doc_embeddings = self.embed_passages(result.ids).to(q) if self.context_encoder is not None \
            else torch.from_numpy(result.embeddings).to(q)
        doc_scores = torch.einsum("bd,bkd->bk", q, doc_embeddings)
        context_ids, context_mask = join_contexts(result.token_ids, result.lengths, batch["question_generator_ids"],
                                                  self.generator_tokenizer.eos_token_id,
                                                  self.generator_tokenizer.pad_token_id,
                                                  self.model_cfg.max_context_tokens)
        return doc_scores, context_ids.to(self.device), context_mask.to(self.device), result

    def embed_passages(self, ids: np.ndarray) -> torch.Tensor:
        """Embed the passages with these ids [B, k] by the current context encoder: [B, k, D], with gradients."""
        token_ids = self.passages.padded_token_ids("encoder_ids", ids, self.context_encoder.pad_token_id)
        return self.context_encoder(torch.from_numpy(token_ids).to(self.device)).view(*ids.shape, -1)

    def on_train_start(self) -> None:
        self._restore_index_version()

    def on_test_start(self) -> None:
        self._restore_index_version()

    def _restore_index_version(self) -> None:
        """After a checkpoint was loaded, serve the index version it trained against (rank 0 switches).

        If that version was pruned meanwhile and the checkpoint holds a trained context encoder, the
        knowledge base is re-encoded with it (when the job has an IndexRefresh); else the active version
        stays, with a warning.
        """
        restore, self.version_to_restore = self.version_to_restore, None
        if restore is None or restore[0] == read_manifest(self.service_spec.kb_dir).active_version:
            return
        version, checkpoint_step = restore
        if self.trainer.is_global_zero:
            try:
                activate_kept_version(self.service_spec.kb_dir, version)
                switch_version(self.service_spec, version)
                log.info("index version %d, which the checkpoint trained against, is active again", version)
            except KnowledgeBaseError as e:
                refresh = next((c for c in self.trainer.callbacks if isinstance(c, IndexRefresh)), None)
                if self.context_encoder is not None and refresh is not None:
                    log.warning("%s; re-encoding the knowledge base with the checkpoint's context encoder", e)
                    refresh.refresh_now(self, checkpoint_step)
                else:
                    log.warning("%s; going on with the active version", e)
        self.trainer.strategy.barrier()

    # --- checkpoints --------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["index_version"] = self.index_version
        if self.context_encoder is not None and self.trainer.is_global_zero \
                and self.global_step != self.saved_context_encoder_step:
            self._save_context_encoder()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "index_version" in checkpoint:
            self.version_to_restore = (checkpoint["index_version"], checkpoint["global_step"])

    def _save_context_encoder(self) -> None:
        """The trained context encoder in Hugging Face format (with its tokenizer) beside the checkpoints."""
        folder = Path(self.trainer.checkpoint_callback.dirpath if self.trainer.checkpoint_callback
                      else self.trainer.default_root_dir) / "context_encoder"
        folder.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(folder) as staging:
            self.context_encoder.model.save_pretrained(str(staging))
            load_encoder_tokenizer(self.context_encoder_cfg).save_pretrained(str(staging))
        self.saved_context_encoder_step = self.global_step

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        doc_scores, context_ids, context_mask, result = self.retrieve(batch)
        self.index_version = result.version       # what a checkpoint records: the version training used last
        out = self.rag(context_input_ids=context_ids, context_attention_mask=context_mask, doc_scores=doc_scores,
                       labels=batch["labels"], n_docs=self.model_cfg.n_docs, reduce_loss=False)
        loss = out.loss.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["answers"]))
        self.log("retrieval/latency_ms", self.last_search_ms, batch_size=1)
        return {"loss": loss, "retrieved_ids": result.ids, "index_version": result.version}

    def configure_optimizers(self):
        encoder_ids = {id(p) for p in self.question_encoder.parameters()}
        generator_params = [p for p in self.rag.parameters() if p.requires_grad and id(p) not in encoder_ids]
        groups = [{"params": generator_params, "lr": self.optim_cfg.lr}]
        for encoder, lr in ((self.question_encoder, self.optim_cfg.question_encoder_lr),
                            (self.context_encoder, self.optim_cfg.ctx_encoder_lr)):
            params = [p for p in encoder.parameters() if p.requires_grad] if encoder is not None else []
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

    def evaluate_batch(self, batch: dict) -> None:
        """Score the batch's answers (EM, F1, recall@k, answer NLL, gold-passage recall where the gold titles are
        known), add the scores to the epoch's sums, and keep a record of each example."""
        doc_scores, context_ids, context_mask, result = self.retrieve(batch)
        predictions = self.generate_answers(doc_scores, context_ids, context_mask)
        nll = self.rag(context_input_ids=context_ids, context_attention_mask=context_mask, doc_scores=doc_scores,
                       labels=batch["labels"], n_docs=self.model_cfg.n_docs, reduce_loss=False).loss
        k = self.model_cfg.n_docs
        passages = self.passages.titles_and_texts(result.ids)
        for i, (prediction, answers, gold_titles) in enumerate(zip(predictions, batch["answers"],
                                                                   batch["gold_titles"])):
            retrieved = passages[i * k:(i + 1) * k]
            scores = {"em": exact_match(prediction, answers), "f1": f1_score(prediction, answers),
                      f"recall@{k}": answer_in_passages([text for _, text in retrieved], answers),
                      "loss": float(nll[i])}
            if gold_titles:
                scores[f"gold_recall@{k}"] = float(any(title in gold_titles for title, _ in retrieved))
                scores["gold_examples"] = 1.0
            for name, value in scores.items():
                self.eval_sums[name] = self.eval_sums.get(name, 0.0) + value
            self.eval_records.append({
                "question": batch["questions"][i], "prediction": prediction, "answers": answers,
                "gold_titles": gold_titles, "em": scores["em"], "f1": scores["f1"],
                "retrieved": [{"id": int(result.ids[i, j]), "title": title, "score": float(result.scores[i, j])}
                              for j, (title, _) in enumerate(retrieved)]})
        self.eval_examples += len(predictions)

    def _log_evaluation(self, prefix: str) -> None:
        """Metrics over the whole split: every process's sums added up, then divided by the example count."""
        names = eval_sum_names(self.model_cfg.n_docs)       # every rank, even one without examples
        totals = torch.tensor([self.eval_sums.get(n, 0.0) for n in names] + [self.eval_examples], dtype=torch.float64,
                              device=self.device)          # nccl reduces GPU tensors only
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        metrics = eval_metrics(prefix, dict(zip(names, totals)), totals[-1], self.model_cfg.n_docs)
        # the values are equal on every rank already; sync_dist only keeps Lightning from warning otherwise
        self.log_dict(metrics, sync_dist=True)
        self.eval_sums, self.eval_examples = {}, 0

    def on_validation_epoch_start(self) -> None:
        self.eval_sums, self.eval_examples, self.eval_records = {}, 0, []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")


def _structured(schema, values: dict):
    """A config dataclass from a plain dict, checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
