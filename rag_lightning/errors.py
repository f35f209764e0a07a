"""User errors: bad files, rows and config values, reported as one clear line and exit code 2."""
from __future__ import annotations

import functools
import logging
import sys

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
