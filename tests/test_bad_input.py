"""Bad files, rows and config values: one clear message naming the file and line or the key, a non-zero exit,
no traceback, and nothing written before changed. Each case runs the real command line in a subprocess; user
errors are found before Ray or training start, so these are quick (only a damaged index of an existing knowledge
base, found by the shard actors, and a checkpoint of another model config, found once the model is built, come
after Ray has started)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import cli_env

from retrieval_workers.kb_store import MANIFEST, sha256_file

TINY_KB_ENCODER = ["kb.context_encoder.pretrained=null", "kb.context_encoder.hidden_size=32",
                   "kb.context_encoder.num_layers=1", "kb.context_encoder.num_heads=2"]
TINY_MODEL = ["model.question_encoder.pretrained=null", "model.question_encoder.hidden_size=32",
              "model.question_encoder.num_layers=1", "model.question_encoder.num_heads=2",
              "model.generator.d_model=32", "model.generator.layers=1", "model.generator.heads=2",
              "model.generator.ffn_dim=64"]
QA_ROWS = [{"question": "where does ana live ?", "answers": ["paris"]},
           {"question": "where does bo live ?", "answers": ["rome"]},
           {"question": "where does cy live ?", "answers": ["oslo"]}]
KB_ROWS = [{"title": "ana", "text": "ana lives in paris ."},
           {"title": "bo", "text": "bo lives in rome ."},
           {"title": "cy", "text": "cy lives in oslo ."}]


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


def _run(module: str, overrides: list[str], cwd: Path, env: dict, run_dir: Path | None = None
         ) -> subprocess.CompletedProcess:
    # the timeout only guards against a hang; nothing is asserted about time
    return subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir or cwd / 'run'}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _train(overrides, cwd, env, run_dir=None):
    return _run("rag_lightning.train", overrides, cwd, env, run_dir)


def _build_kb(overrides, cwd, env):
    return _run("rag_lightning.build_kb", [*TINY_KB_ENCODER, *overrides], cwd, env)


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, exactly one `error:` line on stderr holding every fragment, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under folder: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built_kb(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, knowledge base dir): a valid data dir and its 3-passage KB in one shard, built once by the
    build_kb command line with the settings `_train_on_a_copy_of` trains with, so training reuses it."""
    root = tmp_path_factory.mktemp("built")
    data = _qa_dir(root)
    proc = _build_kb([f"kb.source={data / 'kb.jsonl'}", f"kb.dir={root / 'kb'}", "index.shards=1"], root, cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, root / "kb"


def _build_over_a_copy_of(built_kb, tmp_path: Path, env: dict, source: Path) -> subprocess.CompletedProcess:
    """Run build_kb from `source` into a copy of the built knowledge base; checks the copy is left as it was."""
    kb = Path(shutil.copytree(built_kb[1], tmp_path / "kb"))
    before = _files(kb)
    proc = _build_kb([f"kb.source={source}", f"kb.dir={kb}", "index.shards=1"], tmp_path, env)
    assert _files(kb) == before, "a refused build must leave the existing knowledge base as it was"
    return proc


def _train_on_a_copy_of(built_kb, tmp_path: Path, env: dict, damage) -> tuple[Path, subprocess.CompletedProcess]:
    """Train on a copy of the built knowledge base after damage(kb dir); checks the run changed nothing in it.

    The copy keeps the source file where it was, so the build's fingerprint matches and training reuses it.
    """
    data, built = built_kb
    kb = Path(shutil.copytree(built, tmp_path / "kb"))
    damage(kb)
    before = _files(kb)
    proc = _train(["data=files", f"data.dir={data}", f"kb.source={data / 'kb.jsonl'}", f"kb.dir={kb}",
                   "kb.generator_tokenizer.extra_texts=[]", "index.shards=1", "model.n_docs=2", *TINY_KB_ENCODER,
                   *TINY_MODEL], tmp_path, env)
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


def test_missing_kb_source_file(tmp_path, subprocess_env):
    missing = tmp_path / "nowhere" / "passages.tsv"
    proc = _build_kb([f"kb.source={missing}", f"kb.dir={tmp_path / 'kb'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, "kb.source", str(missing), "not found")
    assert not (tmp_path / "kb" / "manifest.json").exists()


def test_missing_qa_files(tmp_path, subprocess_env):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _train(["data=files", f"data.dir={empty}", *TINY_KB_ENCODER], tmp_path, subprocess_env)
    _assert_user_error(proc, "data.dir", "train.jsonl", str(empty))


def test_malformed_kb_jsonl_row(tmp_path, subprocess_env):
    source = _write_jsonl(tmp_path / "kb.jsonl", [*KB_ROWS[:2], '{"title": "cy", "text": "cy lives in', KB_ROWS[2]])
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{source}:3:", "not valid JSON")


def test_kb_row_without_text(tmp_path, subprocess_env):
    source = _write_jsonl(tmp_path / "kb.jsonl", [KB_ROWS[0], {"title": "bo"}, KB_ROWS[2]])
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{source}:2:", "'text'")


def test_malformed_kb_tsv_row(tmp_path, subprocess_env):
    source = tmp_path / "passages.tsv"
    source.write_text("title\ttext\nana\tana lives in paris .\nbo\tbo lives\tin rome .\ncy\tcy lives in oslo .\n")
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{source}:3:", "expected 2 fields, found 3")


def test_kb_source_not_utf8(tmp_path, subprocess_env):
    source = tmp_path / "kb.jsonl"
    source.write_bytes(b'{"title": "a", "text": "fine"}\n{"title": "b", "text": "caf\xe9"}\n')
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{source}:2:", "UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["no-rows", "blank-lines"])
def test_empty_kb_source(tmp_path, subprocess_env, built_kb, content):
    source = tmp_path / "kb.jsonl"
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, subprocess_env, source)
    _assert_user_error(proc, str(source), "no documents")


def test_duplicate_document_in_kb_source(tmp_path, subprocess_env, built_kb):
    """The same title and text twice is refused, naming both lines; the same title with another text (line 4: a
    further passage of one article) is not."""
    source = _write_jsonl(tmp_path / "kb.jsonl", [*KB_ROWS, {"title": "ana", "text": "ana was born in lyon ."},
                                                  KB_ROWS[1]])
    proc = _build_over_a_copy_of(built_kb, tmp_path, subprocess_env, source)
    _assert_user_error(proc, f"{source}:5:", "duplicate document", "line 2")


@pytest.mark.parametrize("name, content, line", [
    ("kb.jsonl", '{"title": "ana", "text": "ana lives in paris ."}\n{"title": "", "text": "a passage without a '
                 'title"}\n{"title": "cy", "text": " \\t "}\n', 3),
    ("kb.tsv", "title\ttext\nana\tana lives in paris .\n\ta passage without a title\ncy\t   \n", 4),
    ("kb.csv", 'title,text\nana,ana lives in paris .\n,a passage without a title\ncy,""\n', 4),
])
def test_empty_passage_text(tmp_path, subprocess_env, built_kb, name, content, line):
    """A blank text is refused in every format; an empty title is allowed (the row before it passes)."""
    source = tmp_path / name
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, subprocess_env, source)
    _assert_user_error(proc, f"{source}:{line}:", "empty text")


@pytest.mark.parametrize("content, line, fragments", [
    ("ana\tana lives in paris .\nbo\tbo lives\tin rome .\n", 2, ["expected 2 fields, found 3", "stray tab"]),
    ("title\ttext\nana\tana lives in paris .\nbo\tbo lives\nin rome .\ncy\tcy lives in oslo .\n", 4,
     ["expected 2 fields, found 1", "line break"]),
    # an unclosed quote would otherwise swallow every later row into this one's text
    ('title\ttext\nana\t"ana lives in paris .\nbo\tbo lives in rome .\n', 2, ["bad quoting"]),
], ids=["stray-tab-no-header", "stray-newline", "unclosed-quote"])
def test_malformed_tsv_rows(tmp_path, subprocess_env, built_kb, content, line, fragments):
    source = tmp_path / "passages.tsv"
    source.write_text(content)
    proc = _build_over_a_copy_of(built_kb, tmp_path, subprocess_env, source)
    _assert_user_error(proc, f"{source}:{line}:", *fragments)


def test_malformed_qa_row(tmp_path, subprocess_env):
    data = _qa_dir(tmp_path)
    _write_jsonl(data / "val.jsonl", [QA_ROWS[0], "{not json", QA_ROWS[1]])
    proc = _train(["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{data / 'val.jsonl'}:2:", "not valid JSON")


def test_qa_line_without_answers(tmp_path, subprocess_env):
    data = _qa_dir(tmp_path)
    _write_jsonl(data / "train.jsonl", [QA_ROWS[0], QA_ROWS[1], {"question": "where does di live ?"}])
    proc = _train(["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path, subprocess_env)
    _assert_user_error(proc, f"{data / 'train.jsonl'}:3:", "answers")


def _train_with_test_pair(tmp_path, env, source: str, target: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Run training on a data dir whose test split is a .source/.target pair with the given contents."""
    data = _qa_dir(tmp_path)
    (data / "test.jsonl").unlink()
    (data / "test.source").write_text(source)
    (data / "test.target").write_text(target)
    return data, _train(["data=files", f"data.dir={data}", *TINY_KB_ENCODER], tmp_path, env)


def test_source_and_target_of_different_lengths(tmp_path, subprocess_env):
    data, proc = _train_with_test_pair(tmp_path, subprocess_env,
                                       "where does ana live ?\nwhere does bo live ?\nwhere does cy live ?\n",
                                       "paris\nrome\n")
    _assert_user_error(proc, str(data / "test.source"), str(data / "test.target"), "3 lines", "2")


def test_target_line_without_answer(tmp_path, subprocess_env):
    data, proc = _train_with_test_pair(tmp_path, subprocess_env, "where does ana live ?\nwhere does bo live ?\n",
                                       "paris\n\t\n")
    _assert_user_error(proc, f"{data / 'test.target'}:2:", "no answer")


# --- config values ------------------------------------------------------------------------------------------


def test_unknown_index_factory(tmp_path, subprocess_env):
    source = _write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}", "index.factory=NoSuchIndex",
                      "index.shards=1"], tmp_path, subprocess_env)
    _assert_user_error(proc, "index.factory", "'NoSuchIndex'")
    assert not (tmp_path / "kb" / "manifest.json").exists()


def test_pq_index_with_too_few_passages(tmp_path, subprocess_env):
    """IVF2,PQ8 trains 256 centroids per sub-vector: 3 passages are refused with the key named, not a crash."""
    source = _write_jsonl(tmp_path / "kb.jsonl", KB_ROWS)
    proc = _build_kb([f"kb.source={source}", f"kb.dir={tmp_path / 'kb'}", "index.factory='IVF2,PQ8'",
                      "index.shards=1"], tmp_path, subprocess_env)
    _assert_user_error(proc, "index.factory", "IVF2,PQ8")


def test_n_docs_larger_than_the_knowledge_base(tmp_path, subprocess_env):
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}", "model.n_docs=5", "index.shards=1", *TINY_KB_ENCODER,
                   *TINY_MODEL], tmp_path, subprocess_env)
    _assert_user_error(proc, "model.n_docs=5", "3 passages")


def test_unknown_model_kind(tmp_path, subprocess_env):
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}", "model.kind=rag_paragraph"], tmp_path, subprocess_env)
    _assert_user_error(proc, "model.kind", "'rag_paragraph'")


@pytest.mark.parametrize("override, fragments", [
    ("model.nonexistent=1", ["model.nonexistent"]),
    ("model.n_docs=abc", ["model.n_docs", "abc"]),
    ("index.shards=two", ["index.shards", "two"]),
])
def test_unknown_key_or_wrong_type(tmp_path, subprocess_env, override, fragments):
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}", override], tmp_path, subprocess_env)
    _assert_config_error(proc, *fragments)
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"


def test_question_encoder_dimension_differs_from_the_knowledge_base(tmp_path, subprocess_env):
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}", "model.n_docs=2", "index.shards=1", *TINY_KB_ENCODER,
                   *TINY_MODEL, "model.question_encoder.hidden_size=48"], tmp_path, subprocess_env)
    _assert_user_error(proc, "model.question_encoder", "48", "32")


@pytest.mark.parametrize("overrides, fragments", [
    (["retriever.train_ctx_encoder=true", "refresh=background", "refresh.every_n_steps=0"],
     ["refresh.every_n_steps", ">= 1", "got 0"]),
    (["retriever.train_ctx_encoder=true", "refresh=background", "refresh.every_n_steps=-5"],
     ["refresh.every_n_steps", "got -5"]),
    (["refresh=background"], ["refresh.every_n_steps", "retriever.train_ctx_encoder=false"]),
    (["stage=launch"], ["stage", "'launch'", "all, prepare, train"]),
    (["stage=train"], ["stage=train", "retrieval.ray_address"]),
    (["trainer.checkpoint_every_n_steps=0"], ["trainer.checkpoint_every_n_steps", ">= 1"]),
    (["ckpt_path=/nowhere/last.ckpt"], ["ckpt_path", "/nowhere/last.ckpt"]),
])
def test_bad_settings_are_refused_before_anything_is_built(tmp_path, subprocess_env, overrides, fragments):
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}", *overrides], tmp_path, subprocess_env)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "run" / "kb").exists(), "nothing may be built for a refused config"


# --- an existing knowledge base, output folders -------------------------------------------------------------


def test_index_of_another_dimension_than_the_manifest(tmp_path, subprocess_env, built_kb):
    """A shard index of another dimension (its checksum updated, so only the dimension is wrong) is refused by
    the shard actor, and training reports it in one line, without Ray's traceback."""
    def other_dimension(kb: Path) -> None:
        index = faiss.IndexFlatIP(48)
        index.add(np.zeros((3, 48), np.float32))
        faiss.write_index(index, str(kb / "v0" / "shard_000.faiss"))
        manifest = json.loads((kb / MANIFEST).read_text())
        manifest["files"]["v0/shard_000.faiss"] = sha256_file(kb / "v0" / "shard_000.faiss")
        (kb / MANIFEST).write_text(json.dumps(manifest))

    kb, proc = _train_on_a_copy_of(built_kb, tmp_path, subprocess_env, other_dimension)
    _assert_user_error(proc, str(kb / "v0" / "shard_000.faiss"), "dimension 48", "dimension 32")


def test_truncated_index_file(tmp_path, subprocess_env, built_kb):
    def truncate(kb: Path) -> None:
        index_file = kb / "v0" / "shard_000.faiss"
        index_file.write_bytes(index_file.read_bytes()[:-100])

    kb, proc = _train_on_a_copy_of(built_kb, tmp_path, subprocess_env, truncate)
    _assert_user_error(proc, str(kb / "v0" / "shard_000.faiss"), "checksum")


@pytest.mark.parametrize("module", ["rag_lightning.build_kb", "rag_lightning.train"])
def test_kb_dir_that_cannot_be_created(tmp_path, subprocess_env, module):
    """kb.dir below a regular file (running as root, a chmod would not stop the write)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's")
    data = _qa_dir(tmp_path)
    overrides = [f"kb.source={data / 'kb.jsonl'}", f"kb.dir={blocker / 'kb'}", *TINY_KB_ENCODER]
    if module == "rag_lightning.train":
        overrides += ["data=files", f"data.dir={data}"]
    proc = _run(module, overrides, tmp_path, subprocess_env)
    _assert_user_error(proc, "kb.dir", str(blocker / "kb"), "not writable")
    assert blocker.read_text() == "the user's"


def test_run_dir_that_cannot_be_created(tmp_path, subprocess_env):
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's")
    data = _qa_dir(tmp_path)
    proc = _train(["data=files", f"data.dir={data}"], tmp_path, subprocess_env, run_dir=blocker / "run")
    _assert_user_error(proc, "hydra.run.dir", str(blocker / "run"))
    assert blocker.read_text() == "the user's"


# --- checkpoints and the evaluate / generate / export commands -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a tiny training run (mean-pooled question encoder, like the default)."""
    root = tmp_path_factory.mktemp("trained")
    proc = _train(["experiment=tiny", "trainer.max_steps=2", "trainer.val_check_interval=2"], root, cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


def test_resuming_a_checkpoint_of_another_model_config(tmp_path, subprocess_env, tiny_checkpoint):
    saved = tiny_checkpoint.read_bytes()
    proc = _train(["experiment=tiny", f"ckpt_path={tiny_checkpoint}", "model.generator.d_model=48"], tmp_path,
                  subprocess_env)
    _assert_user_error(proc, f"ckpt_path: {tiny_checkpoint}", "model.generator.d_model (32 there, 48 here)")
    assert tiny_checkpoint.read_bytes() == saved


def test_truncated_checkpoint(tmp_path, subprocess_env, tiny_checkpoint):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:4096])
    proc = _run("rag_lightning.evaluate", [f"ckpt_path={truncated}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"ckpt_path: {truncated} is not a readable checkpoint")
    assert not (tmp_path / "run" / "results.json").exists()


def test_evaluate_a_missing_checkpoint(tmp_path, subprocess_env):
    proc = _run("rag_lightning.evaluate", [f"ckpt_path={tmp_path / 'none.ckpt'}"], tmp_path, subprocess_env)
    _assert_user_error(proc, "ckpt_path: no checkpoint file at", "none.ckpt")


def test_generate_without_a_question(tmp_path, subprocess_env, tiny_checkpoint):
    proc = _run("rag_lightning.generate", [f"ckpt_path={tiny_checkpoint}"], tmp_path, subprocess_env)
    _assert_user_error(proc, 'question="..." or questions=FILE')


def test_generate_from_a_malformed_questions_file(tmp_path, subprocess_env, tiny_checkpoint):
    questions = _write_jsonl(tmp_path / "questions.jsonl", [{"question": "who ?"}, {"query": "where ?"}])
    proc = _run("rag_lightning.generate", [f"ckpt_path={tiny_checkpoint}", f"questions={questions}"], tmp_path,
                subprocess_env)
    _assert_user_error(proc, f"{questions}:2:", "'question'")


def test_export_of_a_mean_pooled_question_encoder(tmp_path, subprocess_env, tiny_checkpoint):
    proc = _run("rag_lightning.export", [f"ckpt_path={tiny_checkpoint}", f"out={tmp_path / 'exported'}"], tmp_path,
                subprocess_env)
    _assert_user_error(proc, "model.question_encoder.pooling=mean", "pooling=cls")
    assert not (tmp_path / "exported").exists() and not list(tmp_path.glob(".exported*"))


def test_export_into_a_folder_that_is_not_empty(tmp_path, subprocess_env, tiny_checkpoint):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run("rag_lightning.export", [f"ckpt_path={tiny_checkpoint}", f"out={out}"], tmp_path, subprocess_env)
    _assert_user_error(proc, f"out: {out} exists and is not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
