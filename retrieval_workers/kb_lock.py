"""One writing job at a time for a knowledge base folder, under an OS lock that the holder's end releases.

A job that builds or refreshes a knowledge base holds `<kb_dir>/.writer.lock` (flock, exclusive) for as long as
it may write there. A second job given the same folder is refused at once, with who holds it: it used to rebuild
the folder under the first job, deleting the version files that job's shard actors served. The file names its
holder (pid, host, since when); the kernel drops the lock when the holder exits, however it exits, so a killed
job leaves no stale lock, and the holder removes the file when it is done. Readers (shard actors, evaluate,
generate, export) take no lock: they read committed versions, which a writer never changes in place.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval_workers.kb_store import KnowledgeBaseError

LOCK_NAME = ".writer.lock"


class KnowledgeBaseBusy(KnowledgeBaseError):
    """Another job holds the knowledge base folder; the message names the folder and the holder."""


@contextmanager
def writer_lock(kb_dir: str | Path, setting: str | None = None) -> Iterator[None]:
    """Hold kb_dir's writer lock while the body runs (the folder is created if need be): KnowledgeBaseBusy at
    once if another process holds it, KnowledgeBaseError if the folder cannot be written. `setting`, the caller's
    name for the folder (rag_lightning: kb.dir), begins those messages."""
    kb_dir = Path(kb_dir)
    path = kb_dir / LOCK_NAME
    named = f"{setting}: {kb_dir}" if setting else str(kb_dir)
    try:
        kb_dir.mkdir(parents=True, exist_ok=True)
        fd = _locked(path, named)
    except OSError as e:
        raise KnowledgeBaseError(f"{named} is not writable ({e.strerror})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so no one locks a file about to vanish
        os.close(fd)


def _locked(path: Path, named: str) -> int:
    """A descriptor of the lock file at path, locked. The holder before may remove the file between our open and
    our lock: then the lock is on a file no longer there, and the one now at path is tried."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "starting"
            os.close(fd)
            raise KnowledgeBaseBusy(
                f"{named} is in use by another job ({holder}): a knowledge base has one "
                "writer at a time; wait for that job to end, or give this one a folder of its "
                "own"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
