"""QADataModule: question-answer splits, tokenized once, padded per batch to the longest.

Batches do not depend on the number of processes: training batches are slices of global
batches shared by every process (GlobalBatchSampler) and each process evaluates its own share of a split,
without the repeated examples a DistributedSampler pads with, so the metrics summed over
processes are those of the whole split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rag_lightning.config import DataConfig, ModelConfig
from rag_lightning.data.qa_files import QAExample, read_split
from rag_lightning.data.retrieval_ahead import RetrievalAhead
from rag_lightning.model.contexts import AnswerFormat, question_ids


class TokenizedQA(Dataset):
    """Examples with their question ids for both tokenizers and the target ids of the first answer, written as
    answer_format says."""

    def __init__(
        self,
        examples: list[QAExample],
        encoder_tokenizer,
        generator_tokenizer,
        answer_format: AnswerFormat,
        max_question_tokens: int,
        max_answer_tokens: int,
    ):
        self.examples = examples
        self.encoder_ids, self.generator_ids = tokenize_questions(
            [e.question for e in examples], encoder_tokenizer, generator_tokenizer, max_question_tokens
        )
        prefix, eos = answer_format.prefix, generator_tokenizer.eos_token_id
        answers = generator_tokenizer(
            [answer_format.lead + e.answers[0] for e in examples],
            add_special_tokens=False,
            truncation=True,
            max_length=max_answer_tokens - len(prefix) - 1,
        )["input_ids"]
        self.target_ids = [[*prefix, *ids, eos] for ids in answers]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> int:
        return i


def tokenize_questions(
    questions: list[str], encoder_tokenizer, generator_tokenizer, max_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Each question's ids for the question encoder (with its special tokens) and for the generator (as they read
    after a passage, without)."""
    encoder_ids = encoder_tokenizer(questions, truncation=True, max_length=max_tokens)["input_ids"]
    return encoder_ids, question_ids(generator_tokenizer, questions, max_tokens)


def question_batch(
    questions: list[str], encoder_ids: list[list[int]], generator_ids: list[list[int]], encoder_pad_id: int
) -> dict:
    """What retrieval and generation need of a batch of questions: padded encoder ids, generator ids, and the
    texts (a causal generator's prompts tokenize them)."""
    return {
        "question_ids": pad(encoder_ids, encoder_pad_id),
        "question_generator_ids": generator_ids,
        "questions": questions,
    }


def collate(dataset: TokenizedQA, rows: list[int], encoder_pad_id: int, generator_pad_id: int) -> dict:
    """A batch of examples: the question batch, the padded target ids with their lengths, and the examples'
    texts."""
    examples = [dataset.examples[i] for i in rows]
    return {
        **question_batch(
            [e.question for e in examples],
            [dataset.encoder_ids[i] for i in rows],
            [dataset.generator_ids[i] for i in rows],
            encoder_pad_id,
        ),
        "labels": pad([dataset.target_ids[i] for i in rows], generator_pad_id),
        "label_lengths": [len(dataset.target_ids[i]) for i in rows],
        "answers": [e.answers for e in examples],
        "gold_titles": [e.gold_titles for e in examples],
    }


def eval_loader(
    dataset: TokenizedQA,
    batch_size: int,
    encoder_pad_id: int,
    generator_pad_id: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Every world_size-th example from rank on, in order: each example is evaluated exactly once."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(rank, len(dataset), world_size),
        collate_fn=functools.partial(
            collate, dataset, encoder_pad_id=encoder_pad_id, generator_pad_id=generator_pad_id
        ),
    )


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's part of each training batch, the same global batches for any number of processes.

    Every epoch, one permutation is cut into global batches of batch_size x world_size
    examples, and the process of rank r takes every world_size-th example of each from the
    r-th. The permutation's seed is drawn from torch's global generator exactly as a
    shuffling DataLoader draws it (so one process keeps PyTorch's usual order) and rank 0's
    draw is sent to every rank. Two processes with batch 4 thus train on the same examples,
    step by step, as one process with batch 8. A last global batch too small to give every
    process an example is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        seed = [int(torch.empty((), dtype=torch.int64).random_().item())]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(seed, src=0)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(seed[0])).tolist()
        global_batch = self.batch_size * self.world_size
        for start in range(0, len(order) - self.world_size + 1, global_batch):
            yield order[start : start + global_batch][self.rank :: self.world_size]

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        full, rest = divmod(self.num_examples, global_batch)
        return full + int(rest >= self.world_size)


class QADataModule(L.LightningDataModule):
    """The train/val/test files of `data.dir`, batched as `data` says, tokenized within `model`'s lengths, each
    answer written as the generator reads it (RagModule.answer_format). With retrieval_ahead
    (RagModule.retrieval_ahead), each training batch's retrieval runs in the background before its step."""

    def __init__(
        self,
        data: DataConfig,
        model: ModelConfig,
        encoder_tokenizer,
        generator_tokenizer,
        answer_format: AnswerFormat,
        retrieval_ahead: Callable[[dict], Any] | None = None,
    ):
        super().__init__()
        self.data_cfg = data
        self.model_cfg = model
        self.encoder_tokenizer = encoder_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.answer_format = answer_format
        self.retrieval_ahead = retrieval_ahead
        self.splits: dict[str, TokenizedQA] = {}

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):  # every file read and checked before any training
            self._load(split)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            self._load(split)

    def _load(self, split: str) -> TokenizedQA:
        if split not in self.splits:
            examples = read_split(self.data_cfg.dir, split)
            if split != "train" and self.data_cfg.max_eval_examples:
                examples = examples[: self.data_cfg.max_eval_examples]
            self.splits[split] = TokenizedQA(
                examples,
                self.encoder_tokenizer,
                self.generator_tokenizer,
                self.answer_format,
                self.model_cfg.max_question_tokens,
                self.model_cfg.max_answer_tokens,
            )
        return self.splits[split]

    def train_dataloader(self) -> DataLoader | RetrievalAhead:
        dataset = self._load("train")
        sampler = GlobalBatchSampler(len(dataset), self.data_cfg.batch_size, *self._rank_and_world_size())
        collate_fn = functools.partial(
            collate,
            dataset,
            encoder_pad_id=self.encoder_tokenizer.pad_token_id,
            generator_pad_id=self.generator_tokenizer.pad_token_id,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)
        return loader if self.retrieval_ahead is None else RetrievalAhead(loader, self.retrieval_ahead)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return eval_loader(
            self._load(split),
            self.data_cfg.eval_batch_size,
            self.encoder_tokenizer.pad_token_id,
            self.generator_tokenizer.pad_token_id,
            *self._rank_and_world_size(),
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)


def pad(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        out[row, : len(ids)] = torch.tensor(ids)
    return out
