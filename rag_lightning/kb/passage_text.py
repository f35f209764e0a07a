"""How a passage reads to the generator: `title / text //`, the question following (transformers' RagRetriever).

The separators are RagConfig's defaults. As RagRetriever does, one pair of quotes around a
title is dropped and double spaces become one. PASSAGE_FORMAT is part of the knowledge base's
fingerprint, so a knowledge base built with an earlier form is rebuilt.
"""

from __future__ import annotations

TITLE_SEP, DOC_SEP = " / ", " // "
PASSAGE_FORMAT = 2  # 2: no space after "//" (the question's first token carries it), quotes dropped


def passage_text(title: str, text: str) -> str:
    """The text whose generator token ids the knowledge base stores for a passage; the question follows it."""
    title = title.removeprefix('"').removesuffix('"')
    return (title + TITLE_SEP + text + DOC_SEP.rstrip()).replace("  ", " ")
