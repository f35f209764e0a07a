"""Bad files, rows and config values: one clear message naming the file and line or the key, a non-zero exit,
no traceback, and nothing written before changed; and a stop signal: one line, exit code 128 + its number, no
file left behind.

Most cases call the command's entry point in this process (the `run` fixture of conftest.py: its Hydra `main()`,
with sys.argv patched), which composes the config, runs Hydra's callbacks and reports exactly as the command line
does, without starting an interpreter and importing torch, Lightning and transformers again for each case. The
process boundary is still tested: each command (train, build_kb, evaluate, generate, export) has at least one case
that runs the real command line in a subprocess (the `cli` fixture), and so do the cases that get past the checks
and start Ray or build a model beside it (a damaged index found by the shard actors, a checkpoint of another model
config, a question encoder of another dimension), whose Ray and Lightning state would outlive the call in this
process, and the signal tests, which signal a real process.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval_workers.kb_lock import LOCK_NAME
from retrieval_workers.kb_store import MANIFEST, PassageTable, read_manifest, sha256_file, verify_file

from helpers import REPO_ROOT, TINY, TINY_DIM, TINY_KB_ENCODER, TINY_MODEL, call_main, cli_env

QA_ROWS = [
    {"question": "where does ana live ?", "answers": ["paris"]},
    {"question": "where does bo live ?", "answers": ["rome"]},
    {"question": "where does cy live ?", "answers": ["oslo"]},
]
KB_ROWS = [
    {"title": "ana", "text": "ana lives in paris ."},
    {"title": "bo", "text": "bo lives in rome ."},
    {"title": "cy", "text": "cy lives in oslo ."},
]
UNREACHABLE_RAY = "127.0.0.1:1"  # port 1: nothing listens there
OTHER_SIZE = TINY_DIM + 16  # a dimension (or width) that is not the tiny models'


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _qa_dir(root: Path) -> Path:
    """A valid data dir: train/val/test.jsonl and a 3-passage kb.jsonl."""
    data = root / "data"
    for split in ("train", "val", "test"):
        _write_jsonl(data / f"{split}.jsonl", QA_ROWS)
    _write_jsonl(data / "kb.jsonl", KB_ROWS)
    return data


def _train(run, overrides, cwd, run_dir=None):
    return run("rag_lightning.train", overrides, cwd, run_dir)


def _build_kb(run, overrides, cwd):
    return run("rag_lightning.build_kb", [*TINY_KB_ENCODER, *overrides], cwd)


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one `error:` line on stderr holding every fragment, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    return _assert_one_error_line(proc, *fragments)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under folder: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _entries(folder: Path) -> list[str]:
    """Every file and folder under folder (an empty staging folder too)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def built_kb(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, knowledge base dir): a valid data dir and its 3-passage KB in one shard, built once by the
    build_kb command with the settings `_train_on_a_copy_of` trains with, so training reuses it."""
    root = tmp_path_factory.mktemp("built")
    data = _qa_dir(root)
    code = call_main(
        "rag_lightning.build_kb",
        [*TINY_KB_ENCODER, f"kb.source={data / 'kb.jsonl'}", f"kb.dir={root / 'kb'}", "index.shards=1"],
        root,
    )
    assert code == 0
    return data, root / "kb"


def _build_over_a_copy_of(built_kb, tmp_path: Path, run, source: Path) -> subprocess.CompletedProcess:
    """Run build_kb from `source` into a copy of the built knowledge base; checks the copy is left as it was."""
    kb = Path(shutil.copytree(built_kb[1], tmp_path / "kb"))
    before = _files(kb)
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={kb}", "index.shards=1"], tmp_path)
    assert _files(kb) == before, "a refused build must leave the existing knowledge base as it was"
    return proc


def _train_on_a_copy_of(built_kb, tmp_path: Path, run, damage) -> tuple[Path, subprocess.CompletedProcess]:
    """Train on a copy of the built knowledge base after damage(kb dir); checks the run changed nothing in it.

    The copy keeps the source file where it was, so the build's fingerprint matches and training reuses it.
    """
    data, built = built_kb
    kb = Path(shutil.copytree(built, tmp_path / "kb"))
    damage(kb)
    before = _files(kb)
    proc = _train(
        run,
        [
            "data=files",
            f"data.dir={data}",
            f"kb.source={data / 'kb.jsonl'}",
            f"kb.dir={kb}",
            "kb.generator_tokenizer.extra_texts=[]",
            "index.shards=1",
            "model.n_docs=2",
            *TINY_KB_ENCODER,
            *TINY_MODEL,
        ],
        tmp_path,
    )
    assert _files(kb) == before, "training must neither rebuild nor change the knowledge base"
    assert not (tmp_path / "run" / "results.json").exists()
    return kb, proc


def _assert_config_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Hydra refuses the override: non-zero exit, the key named, no traceback."""
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])


# --- files and rows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["run", pytest.param("cli", marks=pytest.mark.slow)])
def test_missing_kb_source_file(tmp_path, request, runner):
    """Also on the real command line: build_kb's process boundary."""
    missing = tmp_path / "nowhere" / "passages.tsv"
    proc = _build_kb(request.getfixturevalue(runner), [f"kb.source={missing}", f"kb.dir={tmp_path / 'kb'}"], tmp_path)
    _assert_user_error(proc, "kb.source", str(missing), "not found")
    assert not (tmp_path / "kb" / "manifest.json").exists()


@pytest.mark.slow
def test_the_console_script_finds_its_config(tmp_path):
    """`rag-build-kb` (pyproject's console script, run from another folder) reads conf/ like `python -m`."""
    missing = tmp_path / "passages.tsv"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "rag-build-kb"),
            f"kb.source={missing}",
            f"kb.dir={tmp_path / 'kb'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_user_error(proc, "kb.source", str(missing), "not found")


def test_missing_qa_files(tmp_path, run):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _train(run, ["data=files", f"data.dir={empty}", *TINY_KB_ENCODER], tmp_path)
    _assert_user_error(proc, "data.dir", "train.jsonl", str(empty))


def test_malformed_kb_jsonl_row(tmp_path, run):
    source = _write_jsonl(tmp_path / "kb.jsonl", [*KB_ROWS[:2], '{"title": "cy", "text": "cy lives in', KB_ROWS[2]])
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path)
    _assert_user_error(proc, f"{source}:3:", "not valid JSON")


def test_kb_row_without_text(tmp_path, run):
    source = _write_jsonl(tmp_path / "kb.jsonl", [KB_ROWS[0], {"title": "bo"}, KB_ROWS[2]])
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path)
    _assert_user_error(proc, f"{source}:2:", "'text'")


def test_malformed_kb_tsv_row(tmp_path, run):
    source = tmp_path / "passages.tsv"
    source.write_text("title\ttext\nana\tana lives in paris .\nbo\tbo lives\tin rome .\ncy\tcy lives in oslo .\n")
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path)
    _assert_user_error(proc, f"{source}:3:", "expected 2 fields, found 3")


def test_kb_source_not_utf8(tmp_path, run):
    source = tmp_path / "kb.jsonl"
    source.write_bytes(b'{"title": "a", "text": "fine"}\n{"title": "b", "text": "caf\xe9"}\n')
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path)
    _assert_user_error(proc, f"{source}:2:", "UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["no-rows", "blank-lines"])
def test_empty_kb_source(tmp_path, run, built_kb, content):
    source = tmp_path / "kb.jsonl"
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, run, source)
    _assert_user_error(proc, str(source), "no documents")


def test_duplicate_document_in_kb_source(tmp_path, run, built_kb):
    """The same title and text twice is refused, naming both lines; the same title with another text (line 4: a
    further passage of one article) is not."""
    source = _write_jsonl(
        tmp_path / "kb.jsonl", [*KB_ROWS, {"title": "ana", "text": "ana was born in lyon ."}, KB_ROWS[1]]
    )
    proc = _build_over_a_copy_of(built_kb, tmp_path, run, source)
    _assert_user_error(proc, f"{source}:5:", "duplicate document", "line 2")


@pytest.mark.parametrize(
    "name, content, line",
    [
        (
            "kb.jsonl",
            '{"title": "ana", "text": "ana lives in paris ."}\n{"title": "", "text": "a passage without a '
            'title"}\n{"title": "cy", "text": " \\t "}\n',
            3,
        ),
        ("kb.tsv", "title\ttext\nana\tana lives in paris .\n\ta passage without a title\ncy\t   \n", 4),
        ("kb.csv", 'title,text\nana,ana lives in paris .\n,a passage without a title\ncy,""\n', 4),
    ],
)
def test_empty_passage_text(tmp_path, run, built_kb, name, content, line):
    """A blank text is refused in every format; an empty title is allowed (the row before it passes)."""
    source = tmp_path / name
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, run, source)
    _assert_user_error(proc, f"{source}:{line}:", "empty text")


@pytest.mark.parametrize(
    "content, line, fragments",
    [
        ("ana\tana lives in paris .\nbo\tbo lives\tin rome .\n", 2, ["expected 2 fields, found 3", "stray tab"]),
        (
            "title\ttext\nana\tana lives in paris .\nbo\tbo lives\nin rome .\ncy\tcy lives in oslo .\n",
            4,
            ["expected 2 fields, found 1", "line break"],
        ),
        # an unclosed quote would otherwise swallow every later row into this one's text
        ('title\ttext\nana\t"ana lives in paris .\nbo\tbo lives in rome .\n', 2, ["bad quoting"]),
    ],
    ids=["stray-tab-no-header", "stray-newline", "unclosed-quote"],
)
def test_malformed_tsv_rows(tmp_path, run, built_kb, content, line, fragments):
    source = tmp_path / "passages.tsv"
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, run, source)
    _assert_user_error(proc, f"{source}:{line}:", *fragments)


@pytest.mark.parametrize("name, delimiter", [("long.tsv", "\t"), ("long.csv", ",")])
def test_a_document_longer_than_the_csv_field_limit_builds(tmp_path, run, name, delimiter):
    """A document of any length builds from TSV and CSV as from JSONL: Python's csv refuses a field over
    csv.field_size_limit() (131,072 characters) unless told otherwise, which the source reader does."""
    words = [f"w{i % 997}" for i in range(40_000)]
    text = " ".join(words)
    assert len(text) > 131_072
    source = tmp_path / name
    source.write_text(f"title{delimiter}text\nlong{delimiter}{text}\nshort{delimiter}a short document .\n")
    kb = tmp_path / "kb"
    proc = _build_kb(
        run, [f"kb.source={source}", f"kb.dir={kb}", "kb.words_per_passage=10000", "index.shards=1"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = PassageTable(kb / read_manifest(kb).passages_file)
    assert len(table) == 5  # 4 passages of the long document, 1 of the short
    assert " ".join(text for _, text in table.titles_and_texts(range(4))) == text


def test_malformed_qa_row(tmp_path, run):
    data = _qa_dir(tmp_path)
    _write_jsonl(data / "val.jsonl", [QA_ROWS[0], "{not json", QA_ROWS[1]])
    proc = _train(run, ["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path)
    _assert_user_error(proc, f"{data / 'val.jsonl'}:2:", "not valid JSON")


def test_qa_line_without_answers(tmp_path, run):
    data = _qa_dir(tmp_path)
    _write_jsonl(data / "train.jsonl", [QA_ROWS[0], QA_ROWS[1], {"question": "where does di live ?"}])
    proc = _train(run, ["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path)
    _assert_user_error(proc, f"{data / 'train.jsonl'}:3:", "answers")


def _train_with_test_pair(tmp_path, run, source: str, target: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Run training on a data dir whose test split is a .source/.target pair with the given contents."""
    data = _qa_dir(tmp_path)
    (data / "test.jsonl").unlink()
    (data / "test.source").write_text(source)
    (data / "test.target").write_text(target)
    return data, _train(run, ["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path)


def test_source_and_target_of_different_lengths(tmp_path, run):
    data, proc = _train_with_test_pair(
        tmp_path, run, "where does ana live ?\nwhere does bo live ?\nwhere does cy live ?\n", "paris\nrome\n"
    )
    _assert_user_error(proc, str(data / "test.source"), str(data / "test.target"), "3 lines", "2")


def test_target_line_without_answer(tmp_path, run):
    data, proc = _train_with_test_pair(tmp_path, run, "where does ana live ?\nwhere does bo live ?\n", "paris\n\t\n")
    _assert_user_error(proc, f"{data / 'test.target'}:2:", "no answer")


# --- config values ------------------------------------------------------------------------------------------


def test_unknown_index_factory(tmp_path, run):
    source = _write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    proc = _build_kb(
        run,
        [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}", "index.factory=NoSuchIndex", "index.shards=1"],
        tmp_path,
    )
    _assert_user_error(proc, "index.factory", "'NoSuchIndex'")
    assert not (tmp_path / "kb" / "manifest.json").exists()


def test_pq_index_with_too_few_passages(tmp_path, run):
    """IVF2,PQ8 trains 256 centroids per sub-vector: 3 passages are refused with the key named, not a crash."""
    source = _write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    proc = _build_kb(
        run,
        [f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}", "index.factory='IVF2,PQ8'", "index.shards=1"],
        tmp_path,
    )
    _assert_user_error(proc, "index.factory", "IVF2,PQ8")


def test_n_docs_larger_than_the_knowledge_base(tmp_path, run):
    data = _qa_dir(tmp_path)
    proc = _train(
        run,
        ["data=files", f"data.dir={data}", "model.n_docs=5", "index.shards=1", *TINY_KB_ENCODER, *TINY_MODEL],
        tmp_path,
    )
    _assert_user_error(proc, "model.n_docs=5", "3 passages")


@pytest.mark.parametrize(
    "gold_titles, overrides, fragment",
    [
        (False, [], "no question names gold titles"),
        (True, ["retriever.positives=answer"], "(retriever.positives=answer)"),  # the titles do not count then
    ],
)
def test_distant_supervision_without_any_positive_in_the_data(tmp_path, run, gold_titles, overrides, fragment):
    """No training answer occurs in a passage (and no gold title counts): refused once the knowledge base is read,
    before any model is built."""
    data = _qa_dir(tmp_path)
    _write_jsonl(
        data / "train.jsonl",
        [{**row, "answers": ["lisbon"], **({"gold_titles": ["ana"]} if gold_titles else {})} for row in QA_ROWS],
    )
    proc = _train(
        run,
        [
            "data=files",
            f"data.dir={data}",
            "model.n_docs=2",
            "index.shards=1",
            *TINY_KB_ENCODER,
            *TINY_MODEL,
            "retriever.objective=distant",
            "retriever.train_question_encoder=true",
            *overrides,
        ],
        tmp_path,
    )
    _assert_user_error(
        proc, "retriever.objective=distant: no passage of", "holds an answer of the first 3 training", fragment
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_model_kind(tmp_path, run):
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", "model.kind=rag_paragraph"], tmp_path)
    _assert_user_error(proc, "model.kind", "'rag_paragraph'")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.nonexistent=1", ["model.nonexistent"]),
        ("model.n_docs=abc", ["model.n_docs", "abc"]),
        ("index.shards=two", ["index.shards", "two"]),
    ],
)
def test_unknown_key_or_wrong_type(tmp_path, run, override, fragments):
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", override], tmp_path)
    _assert_config_error(proc, *fragments)
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"


# --- the BM25 index -----------------------------------------------------------------------------------------


def test_a_fusion_that_reads_bm25_on_a_knowledge_base_without_it(tmp_path, run, built_kb):
    """Refused before anything is built (train) or served (evaluate), with the setting that adds the index."""
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", "retriever.fusion=hybrid"], tmp_path)
    _assert_user_error(proc, "retriever.fusion=hybrid", "index.sparse=bm25")
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"
    data, kb = built_kb
    proc = run(
        "rag_lightning.evaluate",
        [f"kb.dir={kb}", "mode=retrieval", "data=files", f"data.dir={data}", "retriever.fusion=sparse"],
        tmp_path,
    )
    _assert_user_error(proc, "retriever.fusion=sparse", str(kb), "built without a sparse index", "index.sparse=bm25")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("retriever.fusion=rrf", ["retriever.fusion", "'rrf'"]),
        ("retriever.sparse_weight=-0.5", ["retriever.sparse_weight", "-0.5"]),
        ("index.sparse=tfidf", ["index.sparse", "'tfidf'"]),
    ],
)
def test_unknown_fusion_or_sparse_index_and_a_negative_sparse_weight(tmp_path, run, override, fragments):
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", "index.sparse=bm25", override], tmp_path)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"


def test_a_bm25_index_whose_passage_count_disagrees_with_the_manifest(tmp_path, run):
    """The 3 passages in 2 shards of 2 and 1; the two shards' BM25 files swapped. Refused, naming the file, before
    Ray starts."""
    source = _write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    kb = tmp_path / "kb"
    proc = _build_kb(run, [f"kb.source={source}", f"kb.dir={kb}", "index.shards=2", "index.sparse=bm25"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(kb)
    first, second = (kb / manifest.sparse_file(shard) for shard in (0, 1))
    swapped = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(swapped)
    data = _qa_dir(tmp_path)
    proc = run(
        "rag_lightning.evaluate",
        [f"kb.dir={kb}", "mode=retrieval", "data=files", f"data.dir={data}", "retriever.fusion=hybrid"],
        tmp_path,
    )
    _assert_user_error(proc, str(first), "a BM25 index of 1 passages", "shard 0 2", "index.sparse=bm25")


@pytest.mark.slow
def test_question_encoder_dimension_differs_from_the_knowledge_base(tmp_path, cli):
    """Found once the model is built, with Ray and the shard actors running: a subprocess."""
    data = _qa_dir(tmp_path)
    proc = _train(
        cli,
        [
            "data=files",
            f"data.dir={data}",
            "model.n_docs=2",
            "index.shards=1",
            *TINY_KB_ENCODER,
            *TINY_MODEL,
            f"model.question_encoder.hidden_size={OTHER_SIZE}",
        ],
        tmp_path,
    )
    _assert_user_error(proc, "model.question_encoder", str(OTHER_SIZE), str(TINY_DIM))


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            ["retriever.train_context_encoder=true", "index_refresh=background", "index_refresh.every_n_steps=0"],
            ["index_refresh.every_n_steps", ">= 1", "got 0"],
        ),
        (
            ["retriever.train_context_encoder=true", "index_refresh=background", "index_refresh.every_n_steps=-5"],
            ["index_refresh.every_n_steps", "got -5"],
        ),
        (["index_refresh=background"], ["index_refresh.every_n_steps", "retriever.train_context_encoder=false"]),
        (["stage=launch"], ["stage", "'launch'", "all, prepare, train"]),
        (["stage=train"], ["stage=train", "service.ray_address"]),
        (["checkpoint_every_n_steps=0"], ["checkpoint_every_n_steps", ">= 1"]),
        (["ckpt_path=/nowhere/last.ckpt"], ["ckpt_path", "/nowhere/last.ckpt"]),
        (["model.generator.train=false"], ["model.generator.train=false", "nothing would train"]),
        (
            ["kb.context_encoder.pretrained=/nowhere/encoder"],
            ["kb.context_encoder.pretrained: /nowhere/encoder is not a Hugging Face model folder"],
        ),
        (
            [f"model.question_encoder.pretrained={REPO_ROOT / 'conf'}"],
            [f"model.question_encoder.pretrained: {REPO_ROOT / 'conf'} is not a Hugging Face model folder"],
        ),
        (["optim.lr=nan"], ["optim.lr: nan is not a finite number"]),
        (["trainer=gpu"], ["trainer.accelerator=gpu: No supported gpu backend found"]),  # this machine has no GPU
        (["trainer.precision=foo"], ["trainer.precision=foo: Precision 'foo' is invalid"]),
        (["trainer.strategy=ddq"], ["trainer.strategy=ddq: You selected an invalid strategy name"]),
        # what Hydra refuses while composing: one line too, not its several
        (["trainer.max_step=5"], ["trainer.max_step: not a setting of trainer; did you mean trainer.max_steps?"]),
        (
            ["model.question_encoder.hidden_sise=3"],
            [
                "model.question_encoder.hidden_sise: not a setting of model.question_encoder; did you mean "
                "model.question_encoder.hidden_size?"
            ],
        ),
        (["trainer.max_steps=abc"], ["trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"]),
        (["model=rag_paragraph"], ["model=rag_paragraph: no such option; model is one of rag_sequence, rag_token"]),
        (["trainer.max_steps=[1"], ["trainer.max_steps=[1: not an override Hydra can read"]),
    ],
)
def test_bad_settings_are_refused_before_anything_is_built(tmp_path, run, overrides, fragments):
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", *overrides], tmp_path)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"


def test_a_ray_address_where_nothing_answers(tmp_path, run):
    """Refused within seconds, naming the key and the address (it used to retry silently until killed)."""
    data = _qa_dir(tmp_path)
    proc = _train(
        run,
        [
            "data=files",
            f"data.dir={data}",
            "model.n_docs=2",
            "index.shards=1",
            *TINY_KB_ENCODER,
            *TINY_MODEL,
            f"service.ray_address={UNREACHABLE_RAY}",
        ],
        tmp_path,
    )
    _assert_user_error(proc, "service.ray_address", UNREACHABLE_RAY)
    assert not (tmp_path / "run" / "kb").exists(), "refused before the data and the knowledge base are built"


def test_a_ray_address_that_answers_but_is_not_ray(tmp_path, run):
    """Something that accepts TCP connections and says nothing (Ray's client used to wait on it for minutes,
    after the knowledge base was built) is refused within seconds, before the build."""
    data = _qa_dir(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = _train(run, ["data=files", f"data.dir={data}", f"service.ray_address={address}"], tmp_path)
    _assert_user_error(proc, f"service.ray_address: {address} accepts connections but is not a Ray cluster")
    assert not (tmp_path / "run" / "kb").exists()


def test_ray_address_auto_with_no_cluster(tmp_path, run, monkeypatch):
    """`auto` is resolved as Ray resolves it; with no cluster to find, one line before anything is built. (Ray
    also looks for the GCS processes running on this machine: the Rays other tests started are hidden from it.)"""
    from ray._private import services

    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}", "service.ray_address=auto"], tmp_path)
    _assert_user_error(proc, "service.ray_address: auto: Could not find any running Ray instance")
    assert not (tmp_path / "run" / "kb").exists()


@pytest.mark.slow
def test_a_hydra_composition_error_on_the_command_line_is_one_line(tmp_path, cli):
    """The process boundary of Hydra's errors: the real command line, exit code 2, one line."""
    proc = cli("rag_lightning.build_kb", ["kb.source=x.jsonl", "index.shard=3"], tmp_path)
    _assert_user_error(proc, "index.shard: not a setting of index; did you mean index.shards?")


# --- an existing knowledge base, output folders -------------------------------------------------------------


# holds the writer lock of the folder argv[1] until killed, as a job building or refreshing it would
LOCK_HOLDER = """
import sys, time
from retrieval_workers.kb_lock import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_job_on_a_knowledge_base_in_use_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, run, built_kb):
    """Another job building or training on the same kb.dir used to rebuild it under the running one (deleting the
    version files its shard actors served): now one line naming the folder and its holder, the knowledge base
    untouched. A holder killed outright (SIGKILL) leaves no stale lock."""
    data, _ = built_kb
    kb = Path(shutil.copytree(built_kb[1], tmp_path / "kb"))
    before = _files(kb)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(kb)], env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        other_source = _write_jsonl(tmp_path / "other.jsonl", [*KB_ROWS, {"title": "di", "text": "di is in lima ."}])
        for proc in (
            _build_kb(run, [f"kb.source={other_source}", f"kb.dir={kb}", "index.shards=1"], tmp_path),
            _train(
                run,
                ["data=files", f"data.dir={data}", f"kb.dir={kb}", "index.shards=1", *TINY_KB_ENCODER, *TINY_MODEL],
                tmp_path,
            ),
        ):
            _assert_user_error(proc, f"kb.dir: {kb} is in use by another job (pid {holder.pid} on ")
        assert {name: data for name, data in _files(kb).items() if name != LOCK_NAME} == before
    finally:
        holder.kill()
        holder.wait()
    proc = _build_kb(run, [f"kb.source={data / 'kb.jsonl'}", f"kb.dir={kb}", "index.shards=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(kb) == before, "the same build is reused, and the lock file is gone with its holder"


@pytest.mark.slow
def test_index_of_another_dimension_than_the_manifest(tmp_path, cli, built_kb):
    """A shard index of another dimension (its checksum updated, so only the dimension is wrong) is refused by
    the shard actor, and training reports it in one line, without Ray's traceback. A subprocess: Ray starts."""

    def other_dimension(kb: Path) -> None:
        index = faiss.IndexFlatIP(OTHER_SIZE)
        index.add(np.zeros((3, OTHER_SIZE), np.float32))
        faiss.write_index(index, str(kb / "v0" / "shard_000.faiss"))
        manifest = json.loads((kb / MANIFEST).read_text())
        manifest["files"]["v0/shard_000.faiss"] = sha256_file(kb / "v0" / "shard_000.faiss")
        (kb / MANIFEST).write_text(json.dumps(manifest))

    kb, proc = _train_on_a_copy_of(built_kb, tmp_path, cli, other_dimension)
    _assert_user_error(proc, str(kb / "v0" / "shard_000.faiss"), f"dimension {OTHER_SIZE}", f"dimension {TINY_DIM}")


@pytest.mark.slow
def test_truncated_index_file(tmp_path, cli, built_kb):
    """Found by the shard actor, after Ray has started: a subprocess."""

    def truncate(kb: Path) -> None:
        index_file = kb / "v0" / "shard_000.faiss"
        index_file.write_bytes(index_file.read_bytes()[:-100])

    kb, proc = _train_on_a_copy_of(built_kb, tmp_path, cli, truncate)
    _assert_user_error(proc, str(kb / "v0" / "shard_000.faiss"), "checksum")


@pytest.mark.parametrize("module", ["rag_lightning.build_kb", "rag_lightning.train"])
def test_kb_dir_that_cannot_be_created(tmp_path, run, module):
    """kb.dir below a regular file (running as root, a chmod would not stop the write)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's")
    data = _qa_dir(tmp_path)
    overrides = [f"kb.source={data / 'kb.jsonl'}", f"kb.dir={blocker / 'kb'}", *TINY_KB_ENCODER]
    if module == "rag_lightning.train":
        overrides += ["data=files", f"data.dir={data}"]
    proc = run(module, overrides, tmp_path)
    _assert_user_error(proc, "kb.dir", str(blocker / "kb"), "not writable")
    assert blocker.read_text() == "the user's"


def test_run_dir_that_cannot_be_created(tmp_path, run):
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's")
    data = _qa_dir(tmp_path)
    proc = _train(run, ["data=files", f"data.dir={data}"], tmp_path, run_dir=blocker / "run")
    _assert_user_error(proc, "hydra.run.dir", str(blocker / "run"))
    assert blocker.read_text() == "the user's"


# --- checkpoints and the evaluate / generate / export commands -----------------------------------------------


@pytest.fixture
def tiny_checkpoint(tiny_run) -> Path:
    """last.ckpt of the session's tiny training run (conftest.py; mean-pooled question encoder, like the default),
    which the tests only read."""
    return tiny_run / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_config(tmp_path, cli, tiny_checkpoint):
    """Found once the model is built, after Ray has started: a subprocess."""
    saved = tiny_checkpoint.read_bytes()
    proc = _train(
        cli, ["experiment=tiny", f"ckpt_path={tiny_checkpoint}", f"model.generator.d_model={OTHER_SIZE}"], tmp_path
    )
    mismatch = f"model.generator.d_model ({TINY.model.generator.d_model} there, {OTHER_SIZE} here)"
    _assert_user_error(proc, f"ckpt_path: {tiny_checkpoint}", mismatch)
    assert tiny_checkpoint.read_bytes() == saved


def test_truncated_checkpoint(tmp_path, run, tiny_checkpoint):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:4096])
    proc = run("rag_lightning.evaluate", [f"ckpt_path={truncated}"], tmp_path)
    _assert_user_error(proc, f"ckpt_path: {truncated} is not a readable checkpoint")
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_evaluate_a_missing_checkpoint(tmp_path, cli):
    """On the real command line: evaluate's process boundary."""
    proc = cli("rag_lightning.evaluate", [f"ckpt_path={tmp_path / 'none.ckpt'}"], tmp_path)
    _assert_user_error(proc, "ckpt_path: no checkpoint file at", "none.ckpt")


@pytest.mark.slow
def test_generate_without_a_question(tmp_path, cli, tiny_checkpoint):
    """On the real command line: generate's process boundary."""
    proc = cli("rag_lightning.generate", [f"ckpt_path={tiny_checkpoint}"], tmp_path)
    _assert_user_error(proc, 'question="..." or questions=FILE')


def test_generate_from_a_malformed_questions_file(tmp_path, run, tiny_checkpoint):
    questions = _write_jsonl(tmp_path / "questions.jsonl", [{"question": "who ?"}, {"query": "where ?"}])
    proc = run("rag_lightning.generate", [f"ckpt_path={tiny_checkpoint}", f"questions={questions}"], tmp_path)
    _assert_user_error(proc, f"{questions}:2:", "'question'")


def test_generate_with_a_ray_address_where_nothing_answers(tmp_path, run, tiny_checkpoint):
    proc = run(
        "rag_lightning.generate",
        [f"ckpt_path={tiny_checkpoint}", "question='where does ana live ?'", f"service.ray_address={UNREACHABLE_RAY}"],
        tmp_path,
    )
    _assert_user_error(proc, "service.ray_address", UNREACHABLE_RAY)


def test_export_of_a_mean_pooled_question_encoder(tmp_path, run, tiny_checkpoint):
    proc = run("rag_lightning.export", [f"ckpt_path={tiny_checkpoint}", f"out={tmp_path / 'exported'}"], tmp_path)
    _assert_user_error(proc, "model.question_encoder.pooling=mean", "pooling=cls")
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".exported*"))


@pytest.mark.slow
def test_export_into_a_folder_that_is_not_empty(tmp_path, cli, tiny_checkpoint):
    """On the real command line: export's process boundary."""
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("rag_lightning.export", [f"ckpt_path={tiny_checkpoint}", f"out={out}"], tmp_path)
    _assert_user_error(proc, f"out: {out} exists and is not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# --- a stop signal during a build ---------------------------------------------------------------------------

# build_kb's main in a real process, held at a chosen point of the build until it is signalled: `held` replaces
# a function of rag_lightning.kb.build, creates the file `held` and sleeps (a signal interrupts the sleep)
HELD_BUILD = """
import pathlib, sys, time
import rag_lightning.kb.build as build
from rag_lightning.build_kb import main

def held(*args, **kwargs):
    pathlib.Path("held").touch()
    time.sleep(600)

setattr(build, sys.argv[1], held)
sys.argv = [sys.argv[0], *sys.argv[2:]]
main()
"""


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _signal_a_held_build(
    cwd: Path, held_at: str, signum: int, overrides: list[str], background: bool
) -> subprocess.CompletedProcess:
    """Start build_kb held at `held_at`, send it `signum` once it is held there, and wait for it to end.
    background: started as a non-interactive shell starts `cmd &`, with SIGINT ignored."""
    with open(cwd / "stdout", "w+") as out, open(cwd / "stderr", "w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", HELD_BUILD, held_at, *TINY_KB_ENCODER, *overrides, f"hydra.run.dir={cwd / 'run'}"],
            cwd=cwd,
            env=cli_env(),
            stdout=out,
            stderr=err,
            text=True,
            preexec_fn=_ignore_sigint if background else None,
        )
        try:
            deadline = time.monotonic() + 300  # only a guard against a hang
            while proc.poll() is None and not (cwd / "held").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (cwd / "held").exists(), (proc.poll(), (cwd / "stderr").read_text()[-3000:])
            proc.send_signal(signum)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, (cwd / "stdout").read_text(), (cwd / "stderr").read_text()
    )


@pytest.mark.parametrize(
    "held_at, signum, earlier, background",
    [
        # over an earlier knowledge base: the tokenizer and the passage table written, a version folder being staged
        ("build_shard", signal.SIGTERM, True, False),
        # into a new kb.dir: the version folder renamed into place, the manifest not yet written
        ("commit_version", signal.SIGINT, False, False),
        # the same, in a process that inherited SIGINT ignored (a script's `cmd &`, some CI harnesses), which the
        # build used to honour, sleeping on
        ("commit_version", signal.SIGINT, False, True),
    ],
    ids=[
        "SIGTERM-while-indexing-over-an-earlier-kb",
        "SIGINT-before-the-commit-into-a-new-dir",
        "SIGINT-to-a-background-process-before-the-commit",
    ],
)
def test_a_signal_during_a_build_leaves_nothing_of_it(tmp_path, built_kb, held_at, signum, earlier, background):
    """A build stopped by a signal: one line naming the signal, exit code 128 + its number, no traceback, and
    none of the build's files left in kb.dir. An earlier knowledge base there (from another source, so everything
    the build writes has a new name) is byte for byte as it was, and still loads."""
    kb = Path(shutil.copytree(built_kb[1], tmp_path / "kb")) if earlier else tmp_path / "kb"
    before, entries = (_files(kb), _entries(kb)) if earlier else ({}, [])
    source = _write_jsonl(tmp_path / "other.jsonl", [*KB_ROWS, {"title": "di", "text": "di lives in lima ."}])
    proc = _signal_a_held_build(
        tmp_path, held_at, signum, [f"kb.source={source}", f"kb.dir={kb}", "index.shards=1"], background
    )
    assert proc.returncode == 128 + signum, (proc.returncode, proc.stderr[-3000:])
    _assert_one_error_line(proc, f"stopped by {signal.Signals(signum).name}")
    assert _entries(kb) == entries and _files(kb) == before
    if earlier:
        manifest = read_manifest(kb)
        for relative in manifest.files:
            verify_file(kb, manifest, relative)
        assert len(PassageTable(kb / manifest.passages_file)) == len(KB_ROWS)
        assert faiss.read_index(str(kb / manifest.shard_index_file(0))).ntotal == len(KB_ROWS)
