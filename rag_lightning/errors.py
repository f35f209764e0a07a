"""User errors: bad files, rows and config values, reported as one clear line and exit code 2."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("rag_lightning")


class UserError(Exception):
    """A mistake in the user's input; the message names the file and line, or the config key."""


def exit_on_user_error(main):
    """Run main; a UserError (or a corrupted knowledge base) prints one line and exits 2, no traceback."""
    from retrieval_workers.kb_store import KnowledgeBaseError

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, KnowledgeBaseError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


class CheckOutputDir(Callback):
    """Refuse a run or sweep dir that cannot be created with one error line, before Hydra tries to create it
    (and fails with a traceback). Every entry config lists it under hydra.callbacks."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_output_dir("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_output_dir("hydra.sweep.dir", config.hydra.sweep.dir)


def _check_output_dir(key: str, path: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: {key}: {path} is not writable ({e.strerror})", file=sys.stderr)
        sys.exit(2)
