"""Bad files, rows and config values: one clear message naming the file and line or the key, a non-zero exit,
no traceback. Each case runs the real command line in a subprocess; user errors are found before Ray or training
start, so these are quick."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _run(module: str, overrides: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    # the timeout only guards against a hang; nothing is asserted about time
    return subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={cwd / 'run'}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _train(overrides, cwd, env):
    return _run("rag_lightning.train", overrides, cwd, env)


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
