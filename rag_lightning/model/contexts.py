"""Generator inputs, laid out as transformers' RagRetriever lays them out: the generator tokenizer's special
tokens around `prefix title / text // question` ("<s> ... </s>" for BART, "... </s>" for T5, "[CLS] ... [SEP]"
for a BERT decoder).

Passages are tokenized once when the knowledge base is built (kb/passage_text.py) and questions
once when the data is loaded, so a training step only concatenates integers. A question is
tokenized after the "//" that precedes it in the joined text, so that its first token is the one
the joined text gives (a byte-level BPE marks a word after a space). For tokenizers that split at
spaces the pieces' ids are then the joined text's ids. Two differences are deliberate (README):
a context over max_context_tokens loses the end of its passage, not its question, and a prefix
is tokenized on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rag_lightning.kb.passage_text import DOC_SEP


@dataclass(frozen=True)
class AnswerFormat:
    """How the generator's target answers are written: these ids first (a sequence-to-sequence decoder's start,
    BART's "</s> <s>"), then the answer's text after `lead` (" " after a causal prompt that ends in a word),
    then the generator tokenizer's eos."""

    prefix: list[int]
    lead: str = ""


@dataclass(frozen=True)
class ContextLayout:
    """The ids a generator's contexts are made of, besides the passage and the question."""

    before: list[int]  # the tokenizer's special tokens before a text
    prefix: list[int]  # the generator's prefix (T5's task prefix)
    after: list[int]  # the tokenizer's special tokens after a text
    pad: int

    @classmethod
    def of(cls, tokenizer, prefix: str | None) -> ContextLayout:
        with_special = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain)
        prefix_ids = tokenizer(prefix.rstrip(), add_special_tokens=False)["input_ids"] if prefix else []
        return cls(
            before=with_special[:start],
            prefix=prefix_ids,
            after=with_special[start + len(plain) :],
            pad=tokenizer.pad_token_id,
        )


def question_ids(tokenizer, questions: list[str], max_tokens: int) -> list[list[int]]:
    """Each question's generator ids as they read after a passage, at most max_tokens."""
    separator = DOC_SEP.strip()
    skip = len(tokenizer(separator, add_special_tokens=False)["input_ids"])
    joined = tokenizer(
        [(f"{separator} {q}").replace("  ", " ") for q in questions],
        add_special_tokens=False,
        truncation=True,
        max_length=max_tokens + skip,
    )["input_ids"]
    return [ids[skip:] for ids in joined]


def join_contexts(
    passage_ids: np.ndarray,
    passage_lengths: np.ndarray,
    question_ids: list[list[int]],
    layout: ContextLayout,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts [B * k, L] and their attention mask, rows ordered question by question.

    passage_ids [B, k, P] and passage_lengths [B, k] come from the retrieval service; each context is
    before + prefix + passage + question + after, the passage cut first when over max_tokens.
    """
    batch, k = passage_lengths.shape
    fixed = layout.before + layout.prefix
    rows = []
    for b in range(batch):
        question = list(question_ids[b])[: max(max_tokens - len(fixed) - len(layout.after), 0)] + layout.after
        room = max(max_tokens - len(fixed) - len(question), 0)
        for j in range(k):
            n = min(int(passage_lengths[b, j]), room)
            rows.append(fixed + passage_ids[b, j, :n].tolist() + question)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), layout.pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
