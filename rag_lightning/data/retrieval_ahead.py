"""A training loader whose batches come with their retrieval under way, started before the step ahead of them.

When no encoder trains, a batch's retrieval (its question vectors, the service's search and a causal reader's
prompts) depends on nothing the training steps change, so it can run while earlier steps compute: on a GPU the
search and the tokenization then cost a step nothing, and on a CPU they wait on the service beside the step rather
than before it. Each batch gets "retrieved", the Future of the retrieval (RagModule.retrieval_ahead), run in one
background thread; a batch is handed on once the next one has been made and its retrieval submitted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class RetrievalAhead:
    """The batches of `loader`, each with "retrieved": the Future of retrieve(batch), submitted one batch early."""

    def __init__(self, loader: Iterable[dict], retrieve: Callable[[dict], Any]):
        self.loader = loader
        self.retrieve = retrieve

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-ahead") as pool:
            waiting = None
            for batch in self.loader:
                batch["retrieved"] = pool.submit(self.retrieve, batch)
                if waiting is not None:
                    yield waiting
                waiting = batch
            if waiting is not None:
                yield waiting
