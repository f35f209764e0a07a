"""How a passage reads to the generator: `title / text //`, then the question (transformers' RagConfig defaults)."""
from __future__ import annotations

TITLE_SEP, DOC_SEP = " / ", " // "


def passage_text(title: str, text: str) -> str:
    """The text whose generator token ids the knowledge base stores for a passage; the question follows it."""
    return title + TITLE_SEP + text + DOC_SEP
