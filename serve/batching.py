"""Dynamic batching for the student server: when to take the next batch (a pure policy) and the asyncio queue
that applies it (no Ray, no torch, so both are tested without a server).

Why not ``@serve.batch``: Ray Serve 2.60 forms the next batch while the previous one is still generating, so
requests arriving during a 0.4-1.4 s generation were cut into ``batch_wait_timeout_s`` slices (batches of 1-5
at 16 clients with a 10 ms window), and a window long enough to gather them cost a lone client its whole wait.

Here a batch is taken only when the model is free, and the window adapts to the load:

- the replica estimates how many requests it is serving at once: the batch that just finished plus what queued
  meanwhile (with closed-loop clients, exactly the number of clients; capped by ``max_batch_size``);
- a batch is taken as soon as that many are queued: a lone client never waits, and 16 clients are gathered
  into one batch while the ones just answered come back;
- it never waits more than ``max_wait_s`` for them (a client that left costs one wait, then the estimate
  drops), and an estimate older than ``max_wait_s`` of idle time is stale: the next request goes at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Awaitable, Callable

logger = logging.getLogger("qcrd.serve")


class BatchWindow:
    """The window policy, on explicit times (seconds): :meth:`wait` says how long to hold the queue before
    taking a batch, :meth:`finished` updates the load estimate when a batch is done."""

    def __init__(self, max_batch_size: int, max_wait_s: float):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.expected = 1  # requests served at once, as last seen
        self.free_since = float("-inf")  # when the model last finished a batch

    def finished(self, batch_size: int, queued: int, now: float) -> None:
        """A batch of ``batch_size`` finished at ``now`` with ``queued`` requests waiting: those, and the clients
        just answered (if they come back), make the next batch."""
        self.expected = batch_size + queued
        self.free_since = now

    def target(self, first_arrival: float) -> int:
        """How many queued requests make a batch worth taking without further wait."""
        if first_arrival - self.free_since > self.max_wait_s:
            return 1  # idle longer than any return trip: the clients of the last batch are gone
        return max(1, min(self.max_batch_size, self.expected))

    def wait(self, queued: int, first_arrival: float, now: float) -> float:
        """Seconds to hold ``queued`` (≥ 1) requests before taking a batch; 0 = take it now. The wait is
        counted from when the model was free and the first of them had arrived."""
        if queued >= self.target(first_arrival):
            return 0.0
        start = max(first_arrival, self.free_since)
        return max(0.0, start + self.max_wait_s - now)


class Batcher:
    """An asyncio queue in front of ``process`` (a list of items → one result per item, in order): items
    submitted concurrently are processed together, one batch at a time, as :class:`BatchWindow` decides.

    A result may be an exception object: it is handed to that item's caller as a value, like any result. If
    ``process`` itself raises, every item of the batch gets the exception raised at its caller."""

    def __init__(self, process: Callable[[list], Awaitable[list]], max_batch_size: int, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.window = BatchWindow(max_batch_size, max_wait_s)
        self._process = process
        self._clock = clock
        self._queue: collections.deque[tuple[Any, asyncio.Future, float]] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, self._clock()))
        self._arrived.set()
        if self._task is None or self._task.done():  # started in the serving event loop, on first use
            self._task = asyncio.create_task(self._run())
        return await future

    def check(self) -> None:
        """Raise if the batching loop has died (it only ends on an error it could not hand to a caller): nothing
        queued from now on would ever be answered."""
        if self._task is not None and self._task.done() and not self._task.cancelled():
            raise RuntimeError(f"the batching loop stopped: {self._task.exception()!r}")

    def _drop_cancelled(self) -> None:
        # a client that disconnected cancels its future: its item is not generated for nobody
        self._queue = collections.deque(entry for entry in self._queue if not entry[1].done())

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future, float]]:
        while True:
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            delay = self.window.wait(len(self._queue), self._queue[0][2], self._clock())
            if delay <= 0:
                size = min(len(self._queue), self.window.max_batch_size)
                return [self._queue.popleft() for _ in range(size)]
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                results = await self._process([item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} items gave {len(results)} results")
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets it; the loop keeps serving
                logger.error("batch of %d failed", len(batch), exc_info=e)
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future, _), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            self._drop_cancelled()
            self.window.finished(len(batch), len(self._queue), self._clock())
