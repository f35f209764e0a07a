"""rag_lightning/model/causal_reader.py against brute force, on tiny random Llama-style and GPT-2 models written with
save_pretrained and loaded back with AutoModelForCausalLM: the RAG losses and their gradients against a hand
computation from each prompt + answer run alone, padding and batch order changing nothing, and RAG-Token and
RAG-Sequence generation against decodings that recompute everything, without caches or padding, at every step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from rag_lightning.model.causal_reader import (
    answer_log_likelihoods,
    answer_token_log_probs,
    generate_rag_sequence,
    generate_rag_token,
    rag_sequence_nll,
    rag_token_nll,
)

from helpers import tiny_causal_lm_config

VOCAB, PAD, N_DOCS, MAX_NEW_TOKENS = 64, 0, 3, 6
NEVER = VOCAB  # an eos id outside the vocabulary: no step can choose it, so every hypothesis runs to the end
# weights of a larger scale than transformers' default make the tiny models' next-token distributions peaked (the
# default gives all but uniform ones, whose near-ties would make the generation comparisons fragile)
INITIALIZER_RANGE = 0.5
# prompts of very different lengths (2 to 30 tokens), so that every batch is padded
PROMPT_LENGTHS = [[5, 30, 2], [12, 3, 21], [8, 8, 26]]
ANSWERS = [[7, 9, 4, 2], [11, 2], [5, 6, 7, 8, 13, 2]]


def _config(family: str):
    return tiny_causal_lm_config(
        family, VOCAB, initializer_range=INITIALIZER_RANGE, bos_token_id=1, eos_token_id=2, pad_token_id=PAD
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request, tmp_path_factory):
    """A tiny random causal LM of the family, saved and loaded back by transformers' own code, in eval mode."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """N_DOCS prompts for each question (question by question), of the lengths PROMPT_LENGTHS gives."""
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(3, VOCAB, (length,), generator=generator).tolist() for row in PROMPT_LENGTHS for length in row
    ]


@pytest.fixture(scope="module")
def doc_scores() -> torch.Tensor:
    """The prior's logits [B, N_DOCS]: spread enough that every passage counts, none dominating."""
    return torch.tensor([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.0], [0.2, 0.2, -0.3]])


def _questions(prompts: list[list[int]], order: list[int]) -> list[list[int]]:
    """The prompts of the questions in `order`, question by question."""
    return [prompts[b * N_DOCS + z] for b in order for z in range(N_DOCS)]


# --- brute force ------------------------------------------------------------------------------------------------


def _alone(lm, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(y_i | prompt, y_<i) of each answer token [len(answer)], from a plain call on this one sequence."""
    logits = lm(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(answer).unsqueeze(-1)).squeeze(-1)


def _hand_losses(lm, prompts, answers, doc_scores) -> tuple[torch.Tensor, torch.Tensor]:
    """RAG-Sequence's and RAG-Token's losses [B] from the formulas, each prompt + answer run alone."""
    log_prior = torch.log_softmax(doc_scores, dim=-1)
    sequence, token = [], []
    for b, answer in enumerate(answers):
        per_passage = torch.stack([_alone(lm, prompts[b * N_DOCS + z], answer) for z in range(N_DOCS)])  # [n, T]
        sequence.append(-torch.logsumexp(log_prior[b] + per_passage.sum(-1), dim=0))
        token.append(-torch.logsumexp(log_prior[b].unsqueeze(-1) + per_passage, dim=0).sum())
    return torch.stack(sequence), torch.stack(token)


def _next_token_mixture(lm, prompts: list[list[int]], log_prior: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """RAG-Token's log sum_z p(z | x) p(. | x, z, prefix) [V] for one question, every passage's prompt + prefix run
    alone and whole."""
    per_passage = torch.stack(
        [torch.log_softmax(lm(torch.tensor([prompt + prefix])).logits[0, -1].float(), dim=-1) for prompt in prompts]
    )
    return torch.logsumexp(log_prior.unsqueeze(-1) + per_passage, dim=0)


def _brute_force_greedy(lm, prompts, log_prior, eos: int) -> list[int]:
    """Greedy decoding of the mixture, recomputed whole at every step."""
    answer: list[int] = []
    for _ in range(MAX_NEW_TOKENS):
        token = int(_next_token_mixture(lm, prompts, log_prior, answer).argmax())
        if token == eos:
            break
        answer.append(token)
    return answer


def _brute_force_beam(lm, prompts, log_prior, eos: int, num_beams: int) -> list[int]:
    """Beam search by generate_rag_token's rule, with the mixture recomputed whole for every hypothesis."""
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(MAX_NEW_TOKENS):
        extensions = [
            (score + log_prob, prefix + [token])
            for score, prefix in beams
            for token, log_prob in enumerate(_next_token_mixture(lm, prompts, log_prior, prefix).tolist())
        ]
        beams = []
        for score, sequence in sorted(extensions, key=lambda extension: -extension[0]):
            if len(beams) == num_beams:
                break
            if sequence[-1] == eos:
                finished.append((score, sequence[:-1]))
            else:
                beams.append((score, sequence))
        if len(finished) >= num_beams:
            break
    return max(finished)[1] if finished else beams[0][1]


def _brute_force_rag_token(lm, prompts, doc_scores, eos: int, num_beams: int) -> list[list[int]]:
    """generate_rag_token's answers, by brute force."""
    log_prior = torch.log_softmax(doc_scores, dim=-1)
    answers = []
    with torch.no_grad():
        for b in range(len(doc_scores)):
            question = prompts[b * N_DOCS : (b + 1) * N_DOCS]
            if num_beams == 1:
                answers.append(_brute_force_greedy(lm, question, log_prior[b], eos))
            else:
                answers.append(_brute_force_beam(lm, question, log_prior[b], eos, num_beams))
    return answers


@pytest.fixture(scope="module")
def eos(lm, prompts, doc_scores) -> int:
    """The token RAG-Token's greedy answers hold most often after their first: as eos, it ends some answers."""
    answers = _brute_force_rag_token(lm, prompts, doc_scores, NEVER, 1)
    return Counter(token for answer in answers for token in answer[1:]).most_common(1)[0][0]


# --- losses -----------------------------------------------------------------------------------------------------


def test_losses_equal_the_hand_computation_from_each_sequence_alone(lm, prompts, doc_scores):
    token_log_probs, answer_mask = answer_token_log_probs(lm, prompts, ANSWERS, N_DOCS, PAD)
    assert token_log_probs.dtype == torch.float32
    longest = max(len(answer) for answer in ANSWERS)
    assert token_log_probs.shape == (len(ANSWERS), N_DOCS, longest)
    assert answer_mask.tolist() == [[i < len(answer) for i in range(longest)] for answer in ANSWERS]
    assert (token_log_probs[~answer_mask.unsqueeze(1).expand_as(token_log_probs)] == 0).all()
    with torch.no_grad():
        sequence, token = _hand_losses(lm, prompts, ANSWERS, doc_scores)
    torch.testing.assert_close(rag_sequence_nll(doc_scores, token_log_probs, answer_mask), sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(rag_token_nll(doc_scores, token_log_probs, answer_mask), token, atol=1e-5, rtol=0)
    assert not torch.allclose(sequence, token, atol=1e-3)  # the two marginalisations differ


def test_answer_log_likelihoods_equal_the_sums_alone(lm, prompts):
    with torch.no_grad():
        likelihoods = answer_log_likelihoods(*answer_token_log_probs(lm, prompts, ANSWERS, N_DOCS, PAD))
        alone = [
            [_alone(lm, prompts[b * N_DOCS + z], answer).sum().item() for z in range(N_DOCS)]
            for b, answer in enumerate(ANSWERS)
        ]
    torch.testing.assert_close(likelihoods, torch.tensor(alone), atol=1e-5, rtol=0)


def test_losses_do_not_depend_on_padding_or_batch_order(lm, prompts, doc_scores):
    """Each question's losses are the same alone (no padding) as batched with questions of other prompt lengths, in
    another order, with its passages (and their scores) permuted."""
    with torch.no_grad():
        batched = answer_token_log_probs(lm, prompts, ANSWERS, N_DOCS, PAD)
        losses = [loss(doc_scores, *batched) for loss in (rag_sequence_nll, rag_token_nll)]
        order, passage_order = [2, 0, 1], [2, 0, 1]
        permuted_prompts = [prompts[b * N_DOCS + z] for b in order for z in passage_order]
        permuted_scores = doc_scores[order][:, passage_order]
        permuted = answer_token_log_probs(lm, permuted_prompts, [ANSWERS[b] for b in order], N_DOCS, PAD)
        for loss, expected in zip((rag_sequence_nll, rag_token_nll), losses):
            torch.testing.assert_close(loss(permuted_scores, *permuted), expected[order], atol=1e-5, rtol=0)
        for b, answer in enumerate(ANSWERS):
            alone = answer_token_log_probs(lm, _questions(prompts, [b]), [answer], N_DOCS, PAD)
            for loss, expected in zip((rag_sequence_nll, rag_token_nll), losses):
                torch.testing.assert_close(loss(doc_scores[b : b + 1], *alone), expected[b : b + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", [rag_sequence_nll, rag_token_nll], ids=["rag_sequence", "rag_token"])
def test_gradients_equal_the_hand_computations(lm, prompts, doc_scores, loss):
    """The gradient of the summed loss in doc_scores and in every LM weight is the hand computation's."""
    scores = doc_scores.clone().requires_grad_()
    weights = [parameter for parameter in lm.parameters() if parameter.requires_grad]
    total = loss(scores, *answer_token_log_probs(lm, prompts, ANSWERS, N_DOCS, PAD)).sum()
    gradients = torch.autograd.grad(total, [scores, *weights])
    hand_scores = doc_scores.clone().requires_grad_()
    hand_sequence, hand_token = _hand_losses(lm, prompts, ANSWERS, hand_scores)
    hand_total = (hand_sequence if loss is rag_sequence_nll else hand_token).sum()
    hand_gradients = torch.autograd.grad(hand_total, [hand_scores, *weights])
    assert gradients[0].abs().sum() > 1e-3  # the prior gets a gradient that is not zero
    torch.testing.assert_close(gradients[0], hand_gradients[0], atol=1e-5, rtol=0)
    # the weights' gradients are large (the models' weights are): float32 rounding differs by more than 1e-5
    for gradient, hand_gradient in zip(gradients[1:], hand_gradients[1:]):
        torch.testing.assert_close(gradient, hand_gradient, atol=1e-4, rtol=1e-3)


# --- generation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
@pytest.mark.parametrize("ends", [True, False], ids=["eos", "no_eos"])
def test_rag_token_generation_equals_brute_force(lm, prompts, doc_scores, eos, num_beams, ends):
    """Generation over cached, left-padded rows gives what recomputing the whole mixture at every step gives; with an
    eos the model often picks (some answers end early) or one it can never pick (every answer runs to the end)."""
    end = eos if ends else NEVER
    expected = _brute_force_rag_token(lm, prompts, doc_scores, end, num_beams)
    answers = generate_rag_token(lm, prompts, doc_scores, N_DOCS, PAD, end, num_beams, MAX_NEW_TOKENS)
    assert answers == expected
    lengths = [len(answer) for answer in answers]
    assert min(lengths) < MAX_NEW_TOKENS if ends else set(lengths) == {MAX_NEW_TOKENS}


def test_rag_token_mixes_the_passages(lm, prompts, doc_scores):
    """The fixtures make the mixture matter: some greedy answer differs from what its most probable passage alone
    would give (where a passage dominated, RAG-Token would only read that one)."""
    mixed = _brute_force_rag_token(lm, prompts, doc_scores, NEVER, 1)
    dominant = doc_scores.argmax(-1)
    one_hot = torch.full_like(doc_scores, -1e9).scatter(1, dominant.unsqueeze(1), 0.0)
    assert mixed != _brute_force_rag_token(lm, prompts, one_hot, NEVER, 1)


def _plain_candidates(lm, prompt: list[int], eos: int, num_beams: int) -> list[list[int]]:
    """The answers (without eos) that transformers' generate returns after this one prompt, unpadded."""
    generated = lm.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        max_new_tokens=MAX_NEW_TOKENS,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )[:, len(prompt) :].tolist()
    return [tokens[: tokens.index(eos)] if eos in tokens else tokens for tokens in generated]


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_rag_sequence_generation_equals_brute_force_rescoring(lm, prompts, doc_scores, eos, num_beams):
    """The answer is the candidate (from any passage's own beam search) of the highest marginal likelihood, every
    candidate + eos scored under every passage alone."""
    answers = generate_rag_sequence(lm, prompts, doc_scores, N_DOCS, PAD, eos, num_beams, MAX_NEW_TOKENS)
    log_prior = torch.log_softmax(doc_scores, dim=-1)
    rescored = 0
    with torch.no_grad():
        for b, answer in enumerate(answers):
            question = prompts[b * N_DOCS : (b + 1) * N_DOCS]
            candidates = {tuple(c) for prompt in question for c in _plain_candidates(lm, prompt, eos, num_beams)}
            rescored += len(candidates) > 1
            marginal = {
                candidate: torch.logsumexp(
                    log_prior[b] + torch.stack([_alone(lm, prompt, [*candidate, eos]).sum() for prompt in question]),
                    dim=0,
                ).item()
                for candidate in candidates
            }
            assert answer == list(max(marginal, key=marginal.get))
    assert rescored  # some question chose among several candidates


@pytest.mark.parametrize("generate", [generate_rag_token, generate_rag_sequence], ids=["rag_token", "rag_sequence"])
@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_generation_does_not_depend_on_left_padding(lm, prompts, doc_scores, eos, generate, num_beams):
    """A question batched with others of longer prompts (its own then left-padded) gets the answer it gets alone."""
    batched = generate(lm, prompts, doc_scores, N_DOCS, PAD, eos, num_beams, MAX_NEW_TOKENS)
    alone = [
        generate(lm, _questions(prompts, [b]), doc_scores[b : b + 1], N_DOCS, PAD, eos, num_beams, MAX_NEW_TOKENS)[0]
        for b in range(len(doc_scores))
    ]
    assert batched == alone


@pytest.mark.parametrize("generate", [generate_rag_token, generate_rag_sequence], ids=["rag_token", "rag_sequence"])
def test_generation_runs_in_eval_mode_and_restores_each_modules_mode(lm, prompts, doc_scores, eos, generate):
    """A model in training (GPT-2's dropout on), its output layer in eval, generates what it generates in eval mode,
    and is left as it was."""
    expected = generate(lm, prompts, doc_scores, N_DOCS, PAD, eos, 2, MAX_NEW_TOKENS)
    lm.train()
    lm.get_output_embeddings().eval()
    modes = {name: module.training for name, module in lm.named_modules()}
    try:
        assert generate(lm, prompts, doc_scores, N_DOCS, PAD, eos, 2, MAX_NEW_TOKENS) == expected
        assert {name: module.training for name, module in lm.named_modules()} == modes
    finally:
        lm.eval()
