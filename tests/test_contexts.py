"""Generator contexts are the ids transformers' RagRetriever makes, for every kind of generator tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from rag_lightning.config import GeneratorTokenizerConfig
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer, train_tokenizer
from rag_lightning.kb.passage_text import passage_text
from rag_lightning.model.contexts import ContextLayout, join_contexts, question_ids

from helpers import GENERATOR_FAMILIES, transformers_context, write_generator_folder

PASSAGES = [
    ("Kabar Celdun", "kabar celdun was born in lobar, a town  of nine kilns."),
    ('"Lofim (band)"', "lofim is a band from pegor; its first record sold well"),
]
QUESTIONS = ["where was kabar celdun born?", " who formed lofim  ?"]
PREFIX = "answer the question: "
TEXTS = [passage_text(title, text) for title, text in PASSAGES] + QUESTIONS + [PREFIX]


def _tokenizer(kind, tmp_path):
    if kind in ("wordlevel", "bpe"):  # trained on the knowledge base, as a from-scratch generator's is
        return train_tokenizer(GeneratorTokenizerConfig(kind=kind, vocab_size=400, extra_texts=[]), TEXTS * 5)
    return load_generator_tokenizer(write_generator_folder(tmp_path / kind, kind, TEXTS * 5))


@pytest.mark.parametrize("kind", ["wordlevel", "bpe", *GENERATOR_FAMILIES])
@pytest.mark.parametrize("prefix", [None, PREFIX])
def test_contexts_are_the_ids_transformers_makes_of_the_joined_text(kind, prefix, tmp_path):
    tokenizer = _tokenizer(kind, tmp_path)
    passages = tokenizer([passage_text(title, text) for title, text in PASSAGES], add_special_tokens=False)["input_ids"]
    width = max(map(len, passages))
    passage_ids = np.zeros((len(QUESTIONS), len(PASSAGES), width), dtype=np.int64)
    lengths = np.zeros((len(QUESTIONS), len(PASSAGES)), dtype=np.int64)
    for b in range(len(QUESTIONS)):
        for j, ids in enumerate(passages):
            passage_ids[b, j, : len(ids)], lengths[b, j] = ids, len(ids)
    layout = ContextLayout.of(tokenizer, prefix)
    context_ids, mask = join_contexts(passage_ids, lengths, question_ids(tokenizer, QUESTIONS, 32), layout, 200)

    for row in range(len(QUESTIONS) * len(PASSAGES)):
        b, j = divmod(row, len(PASSAGES))
        want = transformers_context(tokenizer, *PASSAGES[j], QUESTIONS[b], prefix or "")
        assert context_ids[row, : int(mask[row].sum())].tolist() == want, tokenizer.convert_ids_to_tokens(want)
    assert tokenizer.unk_token_id not in context_ids.flatten().tolist()


def test_a_long_context_loses_the_end_of_its_passage_not_its_question(tmp_path):
    tokenizer = _tokenizer("bart", tmp_path)
    passage = tokenizer(passage_text(*PASSAGES[0]), add_special_tokens=False)["input_ids"]
    question = question_ids(tokenizer, QUESTIONS[:1], 32)[0]
    layout = ContextLayout.of(tokenizer, None)
    max_tokens = len(question) + 5
    context_ids, mask = join_contexts(np.array([[passage]]), np.array([[len(passage)]]), [question], layout, max_tokens)
    assert int(mask.sum()) == max_tokens
    assert context_ids[0].tolist() == [tokenizer.bos_token_id, *passage[:3], *question, tokenizer.eos_token_id]
