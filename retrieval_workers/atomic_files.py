"""Writing files so that a reader never sees half of one: a temporary name beside the target, fsync, rename.

The knowledge base's files (kb_store), index versions, tokenizer folders, results.json
and predictions.jsonl are all written this way.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the caller has written it, fsync it and rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; once filled, it replaces `final` in one rename.

    If the body raises (a signal turned into an exception included), the staging folder is removed and
    nothing is renamed. Only for folders this package owns (a KB's version or tokenizer folder),
    never a user's path.
    """
    final = Path(final)
    staging = final.with_name(f".{final.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)       # our own leftover from a process killed outright (SIGKILL)
    staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)     # an uncommitted folder of ours, never one the manifest points to
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
