"""One bad item must not fail the items batched with it: a batch call that raises is bisected until the items that
fail on their own are found (a pure helper; the teacher backends, student generation and the server use it)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class ResultCountError(RuntimeError):
    """``run`` returned another number of results than it was given items."""


def isolate_failures(run: Callable[[list[T]], Sequence[R]], items: Sequence[T], *, attempts: int = 1,
                     catch: type[BaseException] | tuple[type[BaseException], ...] = Exception) -> list[R | BaseException]:
    """``run(items)``, one result per item, in order. When it raises one of ``catch``, the items are bisected and
    each half run again, so only an item that fails on its own gets an exception for a result: its last one, after
    ``attempts`` tries alone. One call when all is well; about 2·log2(n) more per failing item."""
    items = list(items)
    tries = attempts if len(items) == 1 else 1  # a batch is bisected at its first failure, a lone item retried
    for attempt in range(1, tries + 1):
        try:
            results = list(run(items))
        except catch as e:
            error = e
            if attempt > 1:
                log.warning("item failed alone (attempt %d of %d): %s: %s", attempt, tries, type(e).__name__, e)
            continue
        if len(results) != len(items):  # a broken contract, not a bad item: bisecting would hide it
            raise ResultCountError(f"{len(items)} items gave {len(results)} results")
        return results
    if len(items) == 1:
        return [error]
    mid = len(items) // 2
    return (isolate_failures(run, items[:mid], attempts=attempts, catch=catch)
            + isolate_failures(run, items[mid:], attempts=attempts, catch=catch))
