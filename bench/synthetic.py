"""Made-up data for the benchmarks: words of random letters, passages and questions of them, a word-level tokenizer.

Nothing here means anything; it gives every benchmark side the same text of known sizes, made offline and seeded.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS_PER_PASSAGE, WORDS_PER_QUESTION, WORDS_PER_ANSWER = 60, 12, 3
QUESTIONS = 1000
VOCABULARY_WORDS = 3000
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def made_up_words(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct lowercase words of 3 to 9 random letters, sorted."""
    words: set[str] = set()
    while len(words) < count:
        length = int(rng.integers(3, 10))
        words.add("".join(chr(97 + c) for c in rng.integers(0, 26, length)))
    return np.array(sorted(words))


def sentences(words: np.ndarray, count: int, length: int, rng: np.random.Generator) -> list[str]:
    """`count` strings of `length` words drawn from `words`."""
    return [" ".join(row) for row in words[rng.integers(0, len(words), (count, length))]]


def passages_and_qa(passages: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(title, text) of `passages` passages, and QUESTIONS (question, answer) pairs, all of made-up words."""
    rng = np.random.default_rng(seed)
    words = made_up_words(VOCABULARY_WORDS, rng)
    texts = sentences(words, passages, WORDS_PER_PASSAGE, rng)
    questions = sentences(words, QUESTIONS, WORDS_PER_QUESTION, rng)
    answers = sentences(words, QUESTIONS, WORDS_PER_ANSWER, rng)
    return [(f"passage {i}", text) for i, text in enumerate(texts)], list(zip(questions, answers))


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with a word for each distinct word of `texts`, and SPECIAL_TOKENS."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values())))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
