"""The generator's tokenizer: a saved Hugging Face tokenizer, or a small one trained on the KB.

A small vocabulary trained on the knowledge base (plus optional QA files) keeps a
from-scratch generator fast and lets it learn to copy. It is saved in the KB directory,
since the passages' generator token ids were made with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rag_lightning.config import GeneratorTokenizerConfig
from rag_lightning.errors import UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(cfg: GeneratorTokenizerConfig, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    if cfg.kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer: trainers.WordLevelTrainer | trainers.BpeTrainer = trainers.WordLevelTrainer(
            vocab_size=cfg.vocab_size, special_tokens=list(SPECIAL_TOKENS.values())
        )
    elif cfg.kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise UserError(f"kb.generator_tokenizer.kind: {cfg.kind!r} is not one of wordlevel, bpe")
    tokenizer.train_from_iterator(texts, trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(  # BART's: a context reads "<s> ... </s>"
        single=f"{bos} $A {eos}", special_tokens=[(token, tokenizer.token_to_id(token)) for token in (bos, eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def extra_texts(paths: list[str]) -> Iterable[str]:
    """Questions and answers of QA JSONL files, to give the generator vocabulary their words."""
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"kb.generator_tokenizer.extra_texts: file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    yield " ".join([row.get("question", "")] + list(row.get("answers", [])))


def load_generator_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A saved generator tokenizer; a BERT-style one ends its texts with [SEP], which becomes its eos, and one
    without a pad token (a causal LM's, as GPT-2's) pads with its eos (padding is masked wherever it is read)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"kb.generator_tokenizer.path: {path} needs a pad and an eos token")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """What identifies a tokenizer's ids: its vocabulary and special tokens (12 hex digits)."""
    identity = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted((name, str(token)) for name, token in tokenizer.special_tokens_map.items()),
    }
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
