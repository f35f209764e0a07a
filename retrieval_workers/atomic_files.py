"""Writing files so that a reader never sees half of one: a temporary name beside the target, fsync, rename.

The knowledge base's files (kb_store), index versions, tokenizer folders, results.json
and predictions.jsonl are all written this way.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the caller has written it, fsync it and rename it over `path`.

    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600. A write that
    fails on a full disk raises OSError(ENOSPC) naming `path`, also where the writer (faiss, torch) raised
    another error or an OSError without a file name; the temp file is removed and `path` left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(e, path)
        raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    """Raise OSError(ENOSPC or the like) naming `path` where `error` came from a full disk, whatever the writer
    raised (faiss and torch raise RuntimeError, a library's write an OSError naming no file)."""
    code = _disk_full(error, path.parent)
    if code:
        raise OSError(code, os.strerror(code), str(path)) from error


def _disk_full(error: BaseException, folder: Path) -> int | None:
    """The errno of a write that failed for want of space, else None."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return error.errno
    try:
        full = isinstance(error, Exception) and os.statvfs(folder).f_bavail == 0
    except OSError:
        full = False
    return errno.ENOSPC if full else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        shutil.rmtree(staging)  # our own leftover from a process killed outright (SIGKILL)
    staging.mkdir(parents=True)
    try:
        yield staging
        if final.exists():
            shutil.rmtree(final)  # an uncommitted folder of ours, never one the manifest points to
        staging.rename(final)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_if_disk_full(e, final)
        raise


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
