"""Data sets the framework can prepare itself: the embedded demo, and NQ-open with gold passages.

Each writes `kb.jsonl` and `train/val/test.jsonl` into data.dir; the rest of the pipeline
reads those files like any user's own.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

from rag_lightning.config import DataConfig
from rag_lightning.data.demo import write_demo_data, write_jsonl
from rag_lightning.errors import UserError

log = logging.getLogger(__name__)

NQ_OPEN_FILE = (
    "the NQ-open oracle file (nq-open-oracle.jsonl.gz of the 'Lost in the Middle' data, or one made "
    "from NQ-open and DPR's gold passages: docs/data.md)"
)


def prepare_data(cfg: DataConfig) -> None:
    if cfg.prepare is None:
        return
    if cfg.prepare == "demo":
        write_demo_data(cfg.dir, num_entities=cfg.demo_entities)
    elif cfg.prepare == "nq_open":
        write_nq_open(cfg.source, cfg.dir)
    else:
        raise UserError(f"data.prepare: {cfg.prepare!r} is not one of demo, nq_open, null")
    log.info("prepared %s data in %s", cfg.prepare, cfg.dir)


def check_nq_open_source(source: str | None) -> str:
    """source, refused in one line naming data.source unless it is a file (preflight checks it before any work)."""
    if source is None:
        raise UserError(f"data.source: data=nq_open needs data.source=PATH, {NQ_OPEN_FILE}")
    if not Path(source).is_file():
        raise UserError(f"data.source: {source} is not a file; it should be {NQ_OPEN_FILE}")
    return source


def write_nq_open(
    source: str | None, out_dir: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> None:
    """NQ-open questions with their gold passages: the passages form the KB, the questions a fixed split.

    source: JSON lines, gzipped if its name ends in .gz, each {"question": str, "answers": [str, ...], "ctxs":
    [{"title": str, "text": str, "isgold": bool}, ...]}; the gold contexts (isgold true, or the first context
    where none is) are the passages.
    """
    source = check_nq_open_source(source)
    passages: dict[tuple[str, str], None] = {}
    questions = []
    try:
        with (gzip.open if str(source).endswith(".gz") else open)(source, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    gold = [c for c in row["ctxs"] if c.get("isgold")] or row["ctxs"][:1]
                    questions.append(
                        {
                            "question": row["question"],
                            "answers": row["answers"],
                            "gold_titles": sorted({ctx["title"].strip() for ctx in gold}),
                        }
                    )
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise UserError(f"{source}:{number}: not an NQ-open oracle row ({e!r})") from None
                for ctx in gold:
                    passages[(ctx["title"].strip(), ctx["text"].strip())] = None
    except (OSError, EOFError) as e:  # not gzip, or cut short
        raise UserError(f"data.source: {source} cannot be read: {e}") from None
    random.Random(seed).shuffle(questions)
    n_val, n_test = round(len(questions) * val_fraction), round(len(questions) * test_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "kb.jsonl", [{"title": t, "text": x} for t, x in passages])
    write_jsonl(out / "test.jsonl", questions[:n_test])
    write_jsonl(out / "val.jsonl", questions[n_test : n_test + n_val])
    write_jsonl(out / "train.jsonl", questions[n_test + n_val :])
