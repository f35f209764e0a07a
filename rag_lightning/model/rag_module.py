"""RagModule: RAG-Sequence / RAG-Token trained with Lightning over our retrieval service.

One training step: encode the questions (gradients flow), ONE search call per shard for
the top K candidates (retriever.candidates, at least n_docs) with their embeddings and
token ids, scores = q . candidate embeddings, and the best n_docs go to the reader, then the
RAG marginal NLL. With a BM25 index the candidates are the union of the dense and BM25 top K,
scored and ranked as retriever.fusion says (rag_lightning/model/fusion.py). A sequence-to-sequence
reader sits in transformers' RAG model and reads
contexts = stored passage ids + question ids (laid out as transformers' RagRetriever does);
a causal LM reads model.prompt filled in with each passage and the question
(rag_lightning/model/prompts.py, built with the retrieval), its losses and generation
rag_lightning/model/causal_reader.py's. With neither encoder training, that retrieval is made one
batch ahead, in the training loader's background thread (rag_lightning/data/retrieval_ahead.py).
With retriever.train_context_encoder the candidates are re-embedded by the current context
encoder, so gradients reach it too, and re-ranked by those fresh scores.
retriever.objective says what the retriever learns from: the RAG loss (marginal) or an
objective of its own (rag_lightning/model/retriever_objectives.py), the RAG loss then
training the generator alone. Validation and test steps generate answers and return each
example's record and scores, retrieval scored at every k; EvaluationMetrics adds them up.

What happens around the steps lives in callbacks (rag_lightning/callbacks/): index
versions in checkpoints, the background refresh, the saved context encoder, metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import cast

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from rag_lightning.config import EncoderConfig, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer, transformer_body
from rag_lightning.errors import UserError
from rag_lightning.evaluation.metrics import contains_answer
from rag_lightning.evaluation.scores import answer_scores, ranked_records
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, tokenizer_fingerprint
from rag_lightning.model import causal_reader
from rag_lightning.model.contexts import AnswerFormat, ContextLayout, join_contexts
from rag_lightning.model.folder_settings import fill_model_settings, fill_score_scale, own_generator_tokenizer
from rag_lightning.model.fusion import check_fusion_index, fused, rank_union
from rag_lightning.model.generator import CAUSAL, build_causal_rag, build_rag, decoder_prefix, generator_family
from rag_lightning.model.lora import with_frozen, without_frozen
from rag_lightning.model.prompts import PromptLayout
from rag_lightning.model.rag_folder import load_rag_folder
from rag_lightning.model.retriever_objectives import answer_log_likelihoods, distant_loss, emdr2_loss, pdist_loss
from retrieval_workers import (
    POOLER,
    Manifest,
    PassageTable,
    RetrievalClient,
    SearchResult,
    ServiceSpec,
    TextEncoder,
    read_manifest,
)

log = logging.getLogger(__name__)


class RagModule(L.LightningModule):
    """model, retriever, optim and service are plain dicts (of ModelConfig, RetrieverConfig, OptimConfig,
    ServiceSpec) so checkpoints hold no custom classes; the generator tokenizer is the one saved in the
    knowledge base. data_dir, the QA files it trains on, is what the evaluate command reads by default.
    evaluate_answers=False makes validation and test rank passages only (the train config's evaluate_answers).

    The process must be attached to the Ray cluster of the service (retrieval_workers.ray_runtime.connect)
    before the module is set up.
    """

    def __init__(
        self,
        model: dict,
        retriever: dict,
        optim: dict,
        service: dict,
        data_dir: str | None = None,
        evaluate_answers: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg: ModelConfig = fill_model_settings(_structured(ModelConfig, model))
        self.optim_cfg: OptimConfig = _structured(OptimConfig, optim)
        self.service_spec = ServiceSpec(**service)
        manifest = read_manifest(self.service_spec.kb_dir)
        self.retriever_cfg: RetrieverConfig = fill_score_scale(
            _structured(RetrieverConfig, retriever), self.model_cfg, kb_encoder_config(manifest)
        )
        # what fill_model_settings and fill_score_scale set where the config left null
        self.n_docs = cast(int, self.model_cfg.n_docs)
        self.max_context_tokens = cast(int, self.model_cfg.max_context_tokens)
        self.score_scale = cast(float, self.retriever_cfg.score_scale)
        self.hparams.retriever = {**retriever, "score_scale": self.score_scale}  # checkpoints keep it
        self.passages_file = manifest.passages_file
        check_fusion_index(self.retriever_cfg.fusion, manifest, self.service_spec.kb_dir)
        self.kb_has_sparse = manifest.sparse is not None
        self.generator_tokenizer = self._generator_tokenizer(
            f"{self.service_spec.kb_dir}/{manifest.encoder['generator_tokenizer']}"
        )
        self.causal = generator_family(self.model_cfg.generator.pretrained) == CAUSAL
        if self.model_cfg.init_from is None:
            self.question_tokenizer = load_encoder_tokenizer(self.model_cfg.question_encoder, "model.question_encoder")
            self.question_encoder = build_encoder(
                self.model_cfg.question_encoder, self.question_tokenizer, "model.question_encoder"
            )
            build = build_causal_rag if self.causal else build_rag
            self.rag = build(self.model_cfg, self.question_encoder, self.generator_tokenizer)
        else:  # a whole RAG folder: its DPR question encoder scores passages by its pooler output
            self.rag, self.question_tokenizer = load_rag_folder(self.model_cfg, self.generator_tokenizer)
            self.question_encoder = TextEncoder(
                self.rag.question_encoder,
                POOLER,
                self.question_tokenizer.pad_token_id,
                self.question_tokenizer.sep_token_id,
            )
        if self.causal:
            self.prompt_layout = PromptLayout.of(
                self.generator_tokenizer, self.model_cfg.prompt, self.model_cfg.chat_template
            )
            self.answer_format = AnswerFormat([], self.prompt_layout.answer_lead)
        else:
            start = self.rag.generator.config.decoder_start_token_id
            self.answer_format = AnswerFormat(decoder_prefix(self.generator_tokenizer, start))
            self.context_layout = ContextLayout.of(
                self.generator_tokenizer, getattr(self.rag.generator.config, "prefix", None)
            )
        self.question_encoder.requires_grad_(self.retriever_cfg.train_question_encoder)
        if not (self.uses_lora and self.model_cfg.generator.train):  # with_lora froze all but the adapters
            self.rag.generator.requires_grad_(self.model_cfg.generator.train)
        self.context_encoder: TextEncoder | None = None
        if self.retriever_cfg.train_context_encoder:  # the knowledge base's encoder, from the weights that built it
            self.context_encoder_cfg = kb_encoder_config(manifest)
            self.context_tokenizer = load_encoder_tokenizer(self.context_encoder_cfg, "kb.context_encoder")
            self.context_encoder = build_encoder(self.context_encoder_cfg, self.context_tokenizer, "kb.context_encoder")
        for encoder in (self.question_encoder, self.context_encoder):
            if encoder is not None and self.retriever_cfg.freeze_embeddings:
                encoder.model.get_input_embeddings().requires_grad_(False)
        if self.model_cfg.gradient_checkpointing:
            encoders = [e for e in (self.question_encoder, self.context_encoder) if e is not None]
            for part in (self.rag.generator, *(transformer_body(e.model) for e in encoders)):
                # non-reentrant: correct when a checkpointed block's inputs need no gradient (frozen embeddings)
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # made by setup(), once the process is attached to the service's Ray cluster
        self.retrieval_client: RetrievalClient
        self.passages: PassageTable
        self.train()  # from_pretrained leaves a model in eval mode, and Lightning keeps the modes it finds

    @property
    def uses_lora(self) -> bool:
        return self.causal and self.model_cfg.generator.lora.rank > 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, a checkpoint holds the adapters, not the frozen base model its folder holds."""
        if self.uses_lora:
            checkpoint["state_dict"] = without_frozen(checkpoint["state_dict"], self.rag.generator, "rag.generator")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, the base model's weights are those this module was built with, from the folder."""
        if self.uses_lora:
            checkpoint["state_dict"] = with_frozen(checkpoint["state_dict"], self.rag.generator, "rag.generator")

    def train(self, mode: bool = True) -> RagModule:
        """Training mode (dropout on) for the parts that train; a frozen part stays in eval mode, so a fixed
        retriever or reader behaves in training as it does at evaluation."""
        super().train(mode)
        for part, trains in (
            (self.question_encoder, self.retriever_cfg.train_question_encoder),
            (self.context_encoder, self.retriever_cfg.train_context_encoder),
            (self.rag.generator, self.model_cfg.generator.train),
        ):
            if part is not None and not trains:
                part.eval()
        return self

    def _generator_tokenizer(self, kb_tokenizer_dir: str):
        """The knowledge base's generator tokenizer, which made the passages' ids; a pretrained generator brings
        its own, and the two must be one."""
        kb_tokenizer = load_generator_tokenizer(kb_tokenizer_dir)
        own_dir = own_generator_tokenizer(self.model_cfg)
        if own_dir is None:
            return kb_tokenizer
        own = load_generator_tokenizer(own_dir)
        if tokenizer_fingerprint(own) != tokenizer_fingerprint(kb_tokenizer):
            key = "model.init_from" if self.model_cfg.init_from is not None else "model.generator.pretrained"
            raise UserError(
                f"{key}: {own_dir} tokenizes with {tokenizer_fingerprint(own)}, the knowledge base "
                f"{self.service_spec.kb_dir} with {tokenizer_fingerprint(kb_tokenizer)} "
                f"({kb_tokenizer_dir}); build it with kb.generator_tokenizer.path={own_dir}"
            )
        return own

    def setup(self, stage: str) -> None:
        """Attach to the service's shard actors and open the passage table."""
        if not hasattr(self, "retrieval_client"):
            self.retrieval_client = RetrievalClient(self.service_spec, replica_offset=self.global_rank)
            self.passages = PassageTable(f"{self.service_spec.kb_dir}/{self.passages_file}")

    # --- retrieval ---------------------------------------------------------------------------------------

    @property
    def candidates(self) -> int:
        """Passages asked of the service per question and scored by the current encoders (at least n_docs)."""
        return self.retriever_cfg.candidates_of(self.n_docs)

    @property
    def searches_bm25(self) -> bool:
        """Whether the service is asked for BM25 candidates beside the dense ones: a knowledge base with a sparse
        index, and a fusion that reads their scores or distant supervision (which finds positives among them)."""
        cfg = self.retriever_cfg
        return self.kb_has_sparse and (cfg.fusion != "dense" or cfg.objective == "distant")

    @property
    def eval_k(self) -> list[int]:
        """The ranks at which validation and test score retrieval: retriever.eval_k and n_docs."""
        return sorted({*self.retriever_cfg.eval_k, self.n_docs})

    def retrieve(self, batch: dict, depth: int = 0, with_prompts: bool = True) -> Retrieved:
        """The batch's passages, best first: the top `candidates` scored by the current encoders (differentiable in
        them), then the service's ranks below down to `depth` (for evaluation at larger k). Where searches_bm25,
        the candidates are the union of the dense and the BM25 top `candidates` (twice as many), ranked and scored
        as retriever.fusion says. A causal reader's prompts of the candidates come with them unless with_prompts is
        false (nothing is to be read)."""
        cfg = self.retriever_cfg
        questions = self.question_encoder(batch["question_ids"])
        k = min(self.candidates, len(self.passages))
        texts = batch["questions"] if self.searches_bm25 else None
        result = self.retrieval_client.search(
            questions.detach().float().cpu().numpy(), min(max(depth, k), len(self.passages)), texts
        )
        sparse_logits = None
        if texts is not None:  # the union of the dense and BM25 candidates, ranked by the fusion: twice as many
            result, sparse_logits = rank_union(result, self.score_scale, cfg.fusion, cfg.sparse_weight, k)
            k = min(2 * k, result.ids.shape[1])
        ids, token_ids, lengths, reranked = result.ids, result.token_ids[:, :k], result.lengths[:, :k], 0.0
        if self.context_encoder is not None:
            embeddings = self.embed_passages(ids[:, :k]).to(questions)
        else:
            embeddings = torch.from_numpy(result.embeddings[:, :k]).to(questions)
        scores = self.score_scale * torch.einsum("bd,bkd->bk", questions, embeddings)
        if sparse_logits is not None:
            scores = fused(scores, torch.from_numpy(sparse_logits[:, :k]).to(scores), cfg.fusion)
        if self.context_encoder is not None:  # the index holds older embeddings than today's: re-rank
            order = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)
            n = self.n_docs
            reranked = float(
                (order[:, :n].sort(1).values != torch.arange(n, device=order.device)).any(1).float().mean()
            )
            rows, cpu_order = np.arange(len(ids))[:, None], order.cpu().numpy()
            ids = np.concatenate([ids[:, :k][rows, cpu_order], ids[:, k:]], axis=1)
            scores, embeddings = scores.gather(1, order), embeddings[torch.from_numpy(rows).to(order.device), order]
            token_ids, lengths = token_ids[rows, cpu_order], lengths[rows, cpu_order]
        prompts = self.prompts(batch, ids[:, :k]) if self.causal and with_prompts else None
        return Retrieved(questions, ids, scores, embeddings, token_ids, lengths, prompts, reranked, result)

    @property
    def retrieval_ahead(self) -> Callable[[dict], Retrieved] | None:
        """What the training loader runs on each batch ahead of its step, in the background
        (rag_lightning/data/retrieval_ahead.py): retrieval, when retriever.retrieve_ahead and no encoder trains (a
        batch's retrieval then depends on nothing the steps change, so it is what the step would get). Else None."""
        cfg = self.retriever_cfg
        ahead = cfg.retrieve_ahead and not (cfg.train_question_encoder or cfg.train_context_encoder)
        return self._retrieve_ahead if ahead else None

    def _retrieve_ahead(self, batch: dict) -> Retrieved:
        """retrieve() for a batch as the loader made it (on the CPU), without gradients."""
        with torch.no_grad():
            return self.retrieve({**batch, "question_ids": batch["question_ids"].to(self.device)})

    def reader_inputs(self, batch: dict, retrieved: Retrieved) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sequence-to-sequence reader's n_docs best passages: doc_scores [B, n_docs], contexts [B * n_docs, L]
        and their mask."""
        n = self.n_docs
        context_ids, context_mask = join_contexts(
            retrieved.token_ids[:, :n],
            retrieved.lengths[:, :n],
            batch["question_generator_ids"],
            self.context_layout,
            self.max_context_tokens,
        )
        return retrieved.scores[:, :n], context_ids.to(self.device), context_mask.to(self.device)

    def prompts(self, batch: dict, passage_ids: np.ndarray) -> list[list[int]]:
        """A causal reader's prompts for the passages passage_ids [B, k]: B * k, question by question."""
        return self.prompt_layout.prompts(
            self.generator_tokenizer,
            batch["questions"],
            self.passages.titles_and_texts(passage_ids),
            self.max_context_tokens,
            self.model_cfg.max_question_tokens,
        )

    def causal_log_probs(self, batch: dict, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A causal reader's log-probabilities of each answer token after each of the prompts, k per question
        (Retrieved.prompts_of): [B, k, T], and which of the T positions hold answer tokens [B, T]."""
        answers = [row[:length].tolist() for row, length in zip(batch["labels"], batch["label_lengths"])]
        k = len(prompts) // len(answers)
        return causal_reader.answer_token_log_probs(
            self.rag.generator, prompts, answers, k, self.generator_tokenizer.pad_token_id
        )

    def reader_nll(
        self, batch: dict, retrieved: Retrieved, doc_scores: torch.Tensor, with_answer_ll: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The RAG loss of each example [B]: the answer's NLL marginalised over the n_docs best passages as
        model.kind says, with the prior doc_scores [B, n_docs]; and with with_answer_ll each passage's answer
        log-likelihood, without gradient (what pdist and emdr2 learn from): [B, n_docs], or from a causal reader
        [B, K] over every candidate."""
        n = self.n_docs
        if self.causal:
            token_log_probs, answer_mask = self.causal_log_probs(batch, retrieved.prompts_of(0, n))
            marginalised = (
                causal_reader.rag_sequence_nll if self.model_cfg.kind == "rag_sequence" else causal_reader.rag_token_nll
            )
            nll = marginalised(doc_scores, token_log_probs, answer_mask)
            if not with_answer_ll:
                return nll, None
            answer_ll = causal_reader.answer_log_likelihoods(token_log_probs.detach(), answer_mask)
            k = retrieved.scores.shape[1]
            if k > n:  # the candidates it does not read: scored once more, without gradient
                with torch.no_grad():
                    unread = causal_reader.answer_log_likelihoods(
                        *self.causal_log_probs(batch, retrieved.prompts_of(n, k))
                    )
                answer_ll = torch.cat([answer_ll, unread], dim=1)
            return nll, answer_ll
        _, context_ids, context_mask = self.reader_inputs(batch, retrieved)
        out = self.rag(
            context_input_ids=context_ids,
            context_attention_mask=context_mask,
            doc_scores=doc_scores,
            labels=batch["labels"],
            n_docs=n,
            reduce_loss=False,
        )
        if not with_answer_ll:
            return out.loss, None
        return out.loss, answer_log_likelihoods(out.logits, batch["labels"], n, self.generator_tokenizer.pad_token_id)

    def embed_passages(self, ids: np.ndarray) -> torch.Tensor:
        """Embed the passages with these ids [B, k] by the current context encoder: [B, k, D], with gradients."""
        assert self.context_encoder is not None  # called when retriever.train_context_encoder made one
        token_ids = self.passages.padded_token_ids("encoder_ids", ids, self.context_encoder.pad_token_id)
        return self.context_encoder(torch.from_numpy(token_ids).to(self.device)).view(*ids.shape, -1)

    # --- training -----------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        retrieved = batch["retrieved"].result() if "retrieved" in batch else self.retrieve(batch)
        doc_scores = retrieved.scores[:, : self.n_docs]
        marginal = self.retriever_cfg.objective == "marginal"
        # under another objective the RAG loss trains the reader alone: the objective trains the retriever
        nll, answer_ll = self.reader_nll(
            batch, retrieved, doc_scores if marginal else doc_scores.detach(), with_answer_ll=not marginal
        )
        loss = nll.mean()
        batch_size = len(batch["answers"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if not marginal:
            objective = self.retriever_objective(batch, retrieved, cast(torch.Tensor, answer_ll))
            self.log("train/retriever_loss", objective, batch_size=batch_size, sync_dist=True)
            loss = loss + self.retriever_cfg.objective_weight * objective
        if self.context_encoder is not None:
            self.log("retrieval/reranked", retrieved.reranked, batch_size=batch_size)
        return {
            "loss": loss,
            "retrieved_ids": retrieved.ids[:, : self.n_docs],
            "index_version": retrieved.result.version,
            "search_ms": self.retrieval_client.last_search_ms,
        }

    def retriever_objective(self, batch: dict, retrieved: Retrieved, answer_ll: torch.Tensor) -> torch.Tensor:
        """The loss the retriever learns from under a retriever.objective other than marginal; answer_ll [B, n_docs]
        (a causal reader's: [B, K]) is the reader's answer log-likelihood after each passage (reader_nll's)."""
        cfg = self.retriever_cfg
        if cfg.objective == "distant":
            ids = retrieved.ids[:, : retrieved.scores.shape[1]]
            positive = torch.from_numpy(self.positive_candidates(batch, ids)).to(self.device)
            loss, without_positive = distant_loss(
                retrieved.questions,
                retrieved.embeddings,
                torch.from_numpy(ids).to(self.device),
                positive,
                self.score_scale,
                cfg.temperature,
            )
            self.log("retrieval/without_positive", without_positive / len(ids), batch_size=len(ids))
            return loss
        doc_scores = retrieved.scores[:, : answer_ll.shape[1]]  # a causal reader's answer_ll covers every candidate
        if cfg.objective == "pdist":
            return pdist_loss(doc_scores, answer_ll, cfg.temperature)
        return emdr2_loss(doc_scores, answer_ll)

    def positive_candidates(self, batch: dict, ids: np.ndarray) -> np.ndarray:
        """Which candidates [B, K] are distant supervision's positives: those holding a gold answer, and unless
        retriever.positives=answer those of a gold title."""
        k, titles_count = ids.shape[1], self.retriever_cfg.positives == "answer_or_title"
        passages = self.passages.titles_and_texts(ids)
        return np.array(
            [
                [
                    contains_answer(text, answers) or (titles_count and title in gold_titles)
                    for title, text in passages[i * k : (i + 1) * k]
                ]
                for i, (answers, gold_titles) in enumerate(zip(batch["answers"], batch["gold_titles"]))
            ],
            dtype=bool,
        ).reshape(ids.shape)

    def configure_optimizers(self):
        """AdamW over the trainable parameters only (a frozen part holds no optimizer state), one learning rate
        for the generator and one for each encoder."""
        groups = []
        for part, lr in (
            (self.rag.generator, self.optim_cfg.lr),
            (self.question_encoder, self.optim_cfg.question_encoder_lr),
            (self.context_encoder, self.optim_cfg.context_encoder_lr),
        ):
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
    def predict_answers(self, batch: dict) -> tuple[list[str], Retrieved]:
        retrieved = self.retrieve(batch)
        return self.generate_answers(batch, retrieved), retrieved

    def generate_answers(self, batch: dict, retrieved: Retrieved) -> list[str]:
        """The answer generated for each question from its n_docs best passages (model.num_beams beams)."""
        if self.causal:
            generate = (
                causal_reader.generate_rag_sequence
                if self.model_cfg.kind == "rag_sequence"
                else causal_reader.generate_rag_token
            )
            generated = generate(
                self.rag.generator,
                retrieved.prompts_of(0, self.n_docs),
                retrieved.scores[:, : self.n_docs],
                self.n_docs,
                self.generator_tokenizer.pad_token_id,
                self.generator_tokenizer.eos_token_id,
                self.model_cfg.num_beams,
                self.model_cfg.max_answer_tokens,
            )
            return [
                answer.strip() for answer in self.generator_tokenizer.batch_decode(generated, skip_special_tokens=True)
            ]
        doc_scores, context_ids, context_mask = self.reader_inputs(batch, retrieved)
        if self.model_cfg.kind == "rag_sequence":
            # transformers 5's RAG-Sequence generate gives its generator no attention mask, so the generator reads
            # the contexts' padding: padded as transformers' RagRetriever pads them (to max_context_tokens), the
            # answers are those of the exported model, and the same whatever else is in the batch
            extra = max(self.max_context_tokens - context_ids.shape[1], 0)
            context_ids = F.pad(context_ids, (0, extra), value=self.context_layout.pad)
            context_mask = F.pad(context_mask, (0, extra), value=0)
        generated = self.rag.generate(
            context_input_ids=context_ids,
            context_attention_mask=context_mask,
            doc_scores=doc_scores,
            n_docs=self.n_docs,
            num_beams=self.model_cfg.num_beams,
            max_new_tokens=self.model_cfg.max_answer_tokens,
        )
        return self.generator_tokenizer.batch_decode(generated, skip_special_tokens=True)

    @torch.no_grad()
    def evaluate_batch(self, batch: dict, ks: list[int], answers: bool = True) -> list[dict]:
        """A record of each example (rag_lightning/evaluation/scores.py): its ranked passages scored at every k
        of ks, and with `answers` its generated answer's EM, F1 and the gold answer's NLL."""
        retrieved = self.retrieve(batch, depth=max(ks), with_prompts=answers)
        n = self.n_docs
        records = ranked_records(batch, retrieved.ids, retrieved.scores[:, :n].float().cpu().numpy(), self.passages, ks)
        if answers:
            predictions = self.generate_answers(batch, retrieved)
            nll, _ = self.reader_nll(batch, retrieved, retrieved.scores[:, :n])
            for record, prediction, loss in zip(records, predictions, nll.tolist()):
                record["prediction"] = prediction
                record["scores"].update(answer_scores(prediction, record["answers"], loss))
        return records

    def on_validation_epoch_start(self) -> None:
        """Say in the log how the passages are ranked (dense, BM25 or both)."""
        cfg = self.retriever_cfg
        if self.global_rank == 0:
            weight = f" (retriever.sparse_weight={cfg.sparse_weight})" if cfg.fusion != "dense" else ""
            log.info("validation: passages ranked by retriever.fusion=%s%s", cfg.fusion, weight)

    def validation_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self.evaluate_batch(batch, self.eval_k, answers=self.hparams.evaluate_answers)

    def test_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return self.evaluate_batch(batch, self.eval_k, answers=self.hparams.evaluate_answers)


@dataclass
class Retrieved:
    """A batch's retrieved passages, best first. The first K (retriever.candidates, at least n_docs) carry the
    current encoders' scores and vectors, re-ranked by them when the context encoder trains (the index holds
    older embeddings); ranks below K, asked for by evaluation at larger k, are in the service's order."""

    questions: torch.Tensor  # [B, D] question vectors
    ids: np.ndarray  # [B, depth] passage ids
    scores: torch.Tensor  # [B, K] the logits of the prior over passages: score_scale x (q . d), or fused with BM25
    embeddings: torch.Tensor  # [B, K, D] the candidates' vectors (today's when the context encoder trains)
    token_ids: np.ndarray  # [B, K, L] the candidates' generator ids, PAD_TOKEN-padded
    lengths: np.ndarray  # [B, K]
    prompts: list[list[int]] | None  # a causal reader's prompt of each candidate, question by question [B * K]
    reranked: float  # share of questions whose n_docs best passages the re-ranking changed
    result: SearchResult  # the service's answer, as it came

    def prompts_of(self, start: int, end: int) -> list[list[int]]:
        """The prompts of each question's candidates start..end-1, question by question."""
        assert self.prompts is not None  # made by retrieve() for a causal reader, unless asked not to
        k = self.scores.shape[1]
        return [self.prompts[row * k + z] for row in range(len(self.ids)) for z in range(start, end)]


def kb_encoder_config(manifest: Manifest) -> EncoderConfig:
    """The encoder that built the knowledge base, as its manifest records it."""
    return _structured(
        EncoderConfig, {f.name: manifest.encoder[f.name] for f in fields(EncoderConfig) if f.name in manifest.encoder}
    )


def _structured(schema, values: dict):
    """A config dataclass from a plain dict, checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
