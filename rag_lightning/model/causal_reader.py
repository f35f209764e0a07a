"""A decoder-only language model as the reader of RAG: its losses and generation, marginalised over passages.

transformers' RagSequenceForGeneration and RagTokenForGeneration hold a sequence-to-sequence reader; here the
reader is any causal LM (AutoModelForCausalLM: Llama, Qwen, GPT-2, ...), and the same two marginalisations of
Lewis et al. 2020 are computed around it. With x a question, z one of its n passages and y an answer:

    RAG-Sequence   p(y | x) = sum_z p(z | x) prod_i p(y_i | x, z, y_<i)
    RAG-Token      p(y | x) = prod_i sum_z p(z | x) p(y_i | x, z, y_<i)

The prior over passages is p(z | x) = softmax(doc_scores), where doc_scores [B, n] are the retriever's scores;
they may carry gradients (the retriever learns through them), and the losses are differentiable in them and in
the LM's parameters.

Everything here is token ids in, tensors or token ids out: the caller formats and tokenizes. `prompts` always lists
B * n token-id lists question by question (row b * n + z is question b read with passage z), and `answers` the B
answers' token ids, each ending with the eos the caller appends.

Padding never changes a score: every batch carries an attention mask and explicit position ids that count the
real tokens only, so a row scores as it would alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.25 renamed the forward argument past_key_values to cache (the old name is deprecated, to be removed
# in 5.40); earlier 5.x releases know only past_key_values. The output dataclass says which this install uses.
_CACHE_ARGUMENT = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


# --- losses -------------------------------------------------------------------------------------------------------


def answer_token_log_probs(
    lm: nn.Module, prompts: list[list[int]], answers: list[list[int]], n_docs: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_i | x, z, y_<i) of every answer token after every prompt, from one batched forward of the B * n
    sequences prompt + answer: token_log_probs [B, n, T] in float32 (T the longest answer; 0 past an answer's end)
    and answer_mask [B, T], True where an answer has a token. Row b * n + z of `prompts` is read with answers[b].

    The prompts are left-padded and the answers right-padded, so that every answer starts at the same column: the
    LM then computes logits at the T answer positions alone (logits_to_keep), never over the whole sequence, and the
    log-softmax over the vocabulary runs in float32 on those positions only.
    """
    n_rows = len(answers) * n_docs
    if len(prompts) != n_rows:
        raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers of {n_docs} passages each")
    if not all(answers) or not all(prompts):
        raise ValueError("every prompt and every answer needs at least one token (an answer's eos at least)")
    device = _device(lm)
    answer_length = max(len(answer) for answer in answers)
    prompt_length = max(len(prompt) for prompt in prompts)
    # an answer's last token is only ever a target: the input holds the prompt and the answer but its last token
    width = prompt_length + answer_length - 1
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    targets = torch.zeros((len(answers), answer_length), dtype=torch.long)
    answer_mask = torch.zeros((len(answers), answer_length), dtype=torch.bool)
    for b, answer in enumerate(answers):
        targets[b, : len(answer)] = torch.tensor(answer)
        answer_mask[b, : len(answer)] = True
        for row in range(b * n_docs, (b + 1) * n_docs):
            sequence = prompts[row] + answer[:-1]
            start = prompt_length - len(prompts[row])
            input_ids[row, start : start + len(sequence)] = torch.tensor(sequence)
            attention_mask[row, start : start + len(sequence)] = 1
    logits = _forward(lm, input_ids.to(device), attention_mask.to(device), logits_to_keep=answer_length)
    targets, answer_mask = targets.to(device), answer_mask.to(device)
    row_targets = targets.repeat_interleave(n_docs, dim=0)
    logits = logits.float()
    token_log_probs = logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_log_probs = token_log_probs.view(len(answers), n_docs, answer_length)
    return token_log_probs.masked_fill(~answer_mask.unsqueeze(1), 0.0), answer_mask


def answer_log_likelihoods(token_log_probs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log p(y | x, z) of each answer after each passage [B, n]: the sum of its tokens' log-probabilities, from
    answer_token_log_probs' two results (what Atlas' pdist and EMDR2 learn the retriever from)."""
    return token_log_probs.masked_fill(~answer_mask.unsqueeze(1), 0.0).sum(dim=-1)


def rag_sequence_nll(
    doc_scores: torch.Tensor, token_log_probs: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """RAG-Sequence's loss of each question [B]: -log sum_z p(z | x) p(y | x, z), from the prior's logits
    doc_scores [B, n] and answer_token_log_probs' two results."""
    joint = _log_prior(doc_scores) + answer_log_likelihoods(token_log_probs, answer_mask)
    return -torch.logsumexp(joint, dim=-1)


def rag_token_nll(doc_scores: torch.Tensor, token_log_probs: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """RAG-Token's loss of each question [B]: -sum_i log sum_z p(z | x) p(y_i | x, z, y_<i) over the answer's tokens,
    from the prior's logits doc_scores [B, n] and answer_token_log_probs' two results."""
    per_token = torch.logsumexp(_log_prior(doc_scores).unsqueeze(-1) + token_log_probs, dim=1)
    return -per_token.masked_fill(~answer_mask, 0.0).sum(dim=-1)


# --- generation -------------------------------------------------------------------------------------------------


def generate_rag_token(
    lm: nn.Module,
    prompts: list[list[int]],
    doc_scores: torch.Tensor,
    n_docs: int,
    pad_token_id: int,
    eos_token_id: int,
    num_beams: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """The answer of each of the B questions (token ids, without eos) under RAG-Token: each next token from the
    mixture log sum_z p(z | x) p(. | x, z, y_<i) over the question's n passages, with the prior's logits
    doc_scores [B, n].

    num_beams=1 is greedy decoding: the mixture's most probable token each step, until eos or max_new_tokens.
    With num_beams=K > 1, beam search ranks hypotheses by the sum of their tokens' mixture log-probabilities (no
    length penalty). Each step extends the K live beams of a question by every token and walks the extensions
    best first: one ending in eos becomes a finished hypothesis, any other a live beam of the next step, until K
    live beams are found. A question stops when it has K finished hypotheses, or after max_new_tokens steps; its
    answer is its best finished hypothesis or, if none finished, its best live beam. (With K = 1 this is greedy
    decoding.)

    The prompts run through the LM once, left-padded; then each step feeds one token to every (question, beam,
    passage) row over the LM's key-value cache, whose rows follow the beams as they are reselected.
    """
    n_questions = doc_scores.shape[0]
    with _generating(lm):
        device = _device(lm)
        log_prior = _log_prior(doc_scores.detach()).to(device)
        input_ids, attention_mask = _left_padded(prompts, pad_token_id, device)
        cache = DynamicCache(config=lm.config)
        logits = _forward(lm, input_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]
        # one row per (question, beam, passage), each beam starting from its passage's prompt
        rows = torch.arange(n_questions * num_beams * n_docs, device=device)
        prompt_rows = rows // (num_beams * n_docs) * n_docs + rows % n_docs
        cache.reorder_cache(prompt_rows)
        attention_mask, logits = attention_mask[prompt_rows], logits[prompt_rows]
        search = _BeamSearch(n_questions, num_beams, eos_token_id, device)
        for step in range(max_new_tokens):
            parents, tokens = search.advance(_mixture_log_probs(logits, log_prior, num_beams))
            if search.all_done() or step == max_new_tokens - 1:
                break
            # row (b, k, z) continues row (b, parents[b, k], z), with the token beam k chose
            beam_rows = (torch.arange(n_questions, device=device).unsqueeze(1) * num_beams + parents).flatten()
            rows = (beam_rows.unsqueeze(1) * n_docs + torch.arange(n_docs, device=device)).flatten()
            cache.reorder_cache(rows)
            attention_mask = torch.cat([attention_mask[rows], attention_mask.new_ones((len(rows), 1))], dim=1)
            next_ids = tokens.flatten().repeat_interleave(n_docs).unsqueeze(1)
            logits = _forward(lm, next_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]
        return search.answers()


def generate_rag_sequence(
    lm: nn.Module,
    prompts: list[list[int]],
    doc_scores: torch.Tensor,
    n_docs: int,
    pad_token_id: int,
    eos_token_id: int,
    num_beams: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """The answer of each of the B questions (token ids, without eos) under RAG-Sequence, decoded as transformers'
    RAG-Sequence "fast decoding" does: each passage proposes num_beams candidates, by beam search under that passage
    alone (greedy when num_beams=1); the distinct candidates of a question are each scored under every passage of
    the question, log p(y | x) = log sum_z p(z | x) p(y + eos | x, z) with the prior's logits doc_scores [B, n],
    and the most probable is the answer. A candidate that did not end within max_new_tokens is scored with eos
    appended all the same.

    Candidates come from the LM's own generate (so its generation_config's other settings apply), every prompt
    in one left-padded batch.
    """
    with _generating(lm):
        candidates = _per_passage_candidates(lm, prompts, pad_token_id, eos_token_id, num_beams, max_new_tokens)
        log_prior = _log_prior(doc_scores.detach())
        answers = []
        for b in range(doc_scores.shape[0]):
            pooled = _distinct(candidates[b * n_docs : (b + 1) * n_docs])
            question_prompts = prompts[b * n_docs : (b + 1) * n_docs] * len(pooled)
            scored = answer_token_log_probs(
                lm, question_prompts, [[*c, eos_token_id] for c in pooled], n_docs, pad_token_id
            )
            marginal = torch.logsumexp(log_prior[b].to(scored[0].device) + answer_log_likelihoods(*scored), dim=-1)
            answers.append(pooled[int(marginal.argmax())])
        return answers


def _per_passage_candidates(
    lm: nn.Module,
    prompts: list[list[int]],
    pad_token_id: int,
    eos_token_id: int,
    num_beams: int,
    max_new_tokens: int,
) -> list[list[list[int]]]:
    """The num_beams answers (token ids, without eos) that beam search finds after each prompt alone."""
    input_ids, attention_mask = _left_padded(prompts, pad_token_id, _device(lm))
    generated = lm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    new_tokens = generated[:, input_ids.shape[1] :].tolist()
    return [
        [_until_eos(tokens, eos_token_id) for tokens in new_tokens[row * num_beams : (row + 1) * num_beams]]
        for row in range(len(prompts))
    ]


class _BeamSearch:
    """The hypotheses of a RAG-Token beam search over B questions of K beams each (the rule in generate_rag_token):
    the live beams' tokens and scores, and each question's finished hypotheses."""

    def __init__(self, n_questions: int, num_beams: int, eos_token_id: int, device: torch.device):
        self.num_beams, self.eos_token_id = num_beams, eos_token_id
        # a question starts from one empty hypothesis: its other beams, at -inf, are never extended
        self.scores = torch.full((n_questions, num_beams), -torch.inf, device=device)
        self.scores[:, 0] = 0.0
        self.beams: list[list[list[int]]] = [[[] for _ in range(num_beams)] for _ in range(n_questions)]
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_questions)]

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step, from the next token's log-probabilities after each beam [B, K, V]: which beam each new beam
        extends [B, K], and by which token [B, K]."""
        n_questions, num_beams, vocab = log_probs.shape
        extended = (self.scores.unsqueeze(-1) + log_probs).view(n_questions, num_beams * vocab)
        # at most K of the best 2K extensions end in eos (one per beam): K others are always among them
        best_scores, best = extended.topk(2 * num_beams, dim=-1)
        parents, tokens = best // vocab, best % vocab
        chosen: list[list[int]] = []  # the ranks, among the 2K extensions, of each question's K next beams
        for b, (b_parents, b_tokens, b_scores) in enumerate(
            zip(parents.tolist(), tokens.tolist(), best_scores.tolist())
        ):
            # a question already done keeps searching (its rows are in the batch) but records nothing more
            was_done = self.done(b)
            taken: list[int] = []
            for rank, (parent, token, score) in enumerate(zip(b_parents, b_tokens, b_scores)):
                if len(taken) == num_beams:
                    break
                if token != self.eos_token_id:
                    taken.append(rank)
                elif not was_done:
                    self.finished[b].append((score, self.beams[b][parent]))
            chosen.append(taken)
            self.beams[b] = [self.beams[b][b_parents[rank]] + [b_tokens[rank]] for rank in taken]
        ranks = torch.tensor(chosen, device=best.device)
        self.scores = best_scores.gather(1, ranks)
        return parents.gather(1, ranks), tokens.gather(1, ranks)

    def done(self, b: int) -> bool:
        """Whether question b has its K finished hypotheses."""
        return len(self.finished[b]) >= self.num_beams

    def all_done(self) -> bool:
        """Whether every question has its K finished hypotheses."""
        return all(self.done(b) for b in range(len(self.finished)))

    def answers(self) -> list[list[int]]:
        """Each question's best finished hypothesis, or its best live beam where none finished."""
        return [
            max(finished, key=lambda hypothesis: hypothesis[0])[1] if finished else beams[0]
            for finished, beams in zip(self.finished, self.beams)
        ]


# --- helpers ----------------------------------------------------------------------------------------------------


def _log_prior(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(z | x) [B, n] from the retriever's scores, in float32."""
    return torch.log_softmax(doc_scores.float(), dim=-1)


def _mixture_log_probs(logits: torch.Tensor, log_prior: torch.Tensor, num_beams: int) -> torch.Tensor:
    """RAG-Token's next-token log-probabilities log sum_z p(z | x) p(. | x, z, y_<i) [B, K, V], from the next-token
    logits of every (question, beam, passage) row [B * K * n, V] and the prior [B, n]."""
    n_questions, n_docs = log_prior.shape
    per_passage = torch.log_softmax(logits.float(), dim=-1).view(n_questions, num_beams, n_docs, -1)
    return torch.logsumexp(per_passage + log_prior[:, None, :, None], dim=2)


def _left_padded(
    sequences: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists, none empty, as one left-padded batch: input_ids and attention_mask [N, longest]."""
    if not all(sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, -len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, -len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _forward(
    lm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """The LM's logits at the last logits_to_keep positions of input_ids [N, logits_to_keep, V]; attention_mask
    covers the cached tokens too. Each token's position is the number of real tokens before it, whatever the
    padding."""
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
    cache_arguments = {_CACHE_ARGUMENT: cache, "use_cache": True} if cache is not None else {"use_cache": False}
    return lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=logits_to_keep,
        **cache_arguments,
    ).logits


def _distinct(candidates: list[list[list[int]]]) -> list[list[int]]:
    """The distinct candidates of a question's passages, in the order first found."""
    return [list(candidate) for candidate in dict.fromkeys(tuple(c) for passage in candidates for c in passage)]


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """The tokens before the first eos (all of them if none)."""
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def _device(lm: nn.Module) -> torch.device:
    """Where the LM's weights are (its inputs go there)."""
    return next(lm.parameters()).device


@contextmanager
def _generating(lm: nn.Module) -> Iterator[None]:
    """Run generation without gradients and with every module of the LM in eval mode (no dropout), then put each
    module back in the mode it was in."""
    modes = [(module, module.training) for module in lm.modules()]
    lm.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
