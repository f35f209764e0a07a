"""QADataModule: question-answer splits, tokenized once, padded per batch to the longest."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from rag_lightning.qa_files import QAExample, read_split


class TokenizedQA(Dataset):
    """Examples with their question ids for both tokenizers and the target ids of the first answer."""

    def __init__(self, examples: list[QAExample], encoder_tokenizer, generator_tokenizer,
                 max_question_tokens: int, max_answer_tokens: int):
        self.examples = examples
        questions = [e.question for e in examples]
        self.encoder_ids = encoder_tokenizer(questions, truncation=True, max_length=max_question_tokens)["input_ids"]
        self.generator_ids = generator_tokenizer(questions, add_special_tokens=False, truncation=True,
                                                 max_length=max_question_tokens)["input_ids"]
        answers = generator_tokenizer([e.answers[0] for e in examples], add_special_tokens=False, truncation=True,
                                      max_length=max_answer_tokens - 2)["input_ids"]
        bos, eos = generator_tokenizer.bos_token_id, generator_tokenizer.eos_token_id
        self.target_ids = [[bos, *ids, eos] for ids in answers]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> int:
        return i


class QADataModule(L.LightningDataModule):
    def __init__(self, data_dir: str, encoder_tokenizer, generator_tokenizer, batch_size: int = 8,
                 eval_batch_size: int = 32, max_question_tokens: int = 32, max_answer_tokens: int = 24,
                 max_eval_examples: int = 0):
        super().__init__()
        self.data_dir = data_dir
        self.encoder_tokenizer = encoder_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_question_tokens = max_question_tokens
        self.max_answer_tokens = max_answer_tokens
        self.max_eval_examples = max_eval_examples
        self.splits: dict[str, TokenizedQA] = {}

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):   # every file read and checked before any training
            self._load(split)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            self._load(split)

    def _load(self, split: str) -> TokenizedQA:
        if split not in self.splits:
            examples = read_split(self.data_dir, split)
            if split != "train" and self.max_eval_examples:
                examples = examples[:self.max_eval_examples]
            self.splits[split] = TokenizedQA(examples, self.encoder_tokenizer, self.generator_tokenizer,
                                             self.max_question_tokens, self.max_answer_tokens)
        return self.splits[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self._load(split)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False,
                          collate_fn=lambda rows: self.collate(dataset, rows))

    def collate(self, dataset: TokenizedQA, rows: list[int]) -> dict:
        return {
            "question_ids": _pad([dataset.encoder_ids[i] for i in rows], self.encoder_tokenizer.pad_token_id),
            "question_generator_ids": [dataset.generator_ids[i] for i in rows],
            "labels": _pad([dataset.target_ids[i] for i in rows], self.generator_tokenizer.pad_token_id),
            "answers": [dataset.examples[i].answers for i in rows],
            "questions": [dataset.examples[i].question for i in rows],
        }


def _pad(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        out[row, :len(ids)] = torch.tensor(ids)
    return out
