"""Admission control: at most ``max_concurrency`` generations run, at most ``max_queue`` wait.

A request that finds every slot busy and the queue full is refused at once (HTTP 429 with a
``Retry-After`` estimated from recent service times); one that waits longer than its time limit
is refused with 503. Waiters are served first come, first served. A slot is held from admission
until the generation's worker thread has stopped (finished, failed or cancelled), so the number
of running generations never exceeds the limit, even while cancelled ones wind down.

Every method runs on the event loop's thread; worker threads release through
``loop.call_soon_threadsafe(admission.release)``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class Overloaded(Exception):
    """Every slot is busy and the queue is full."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._service_s = 1.0  # moving average of how long a slot is held
        self._seen = 0

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a request that arrives now."""
        return max(1, math.ceil(self._service_s * (self.waiting + 1) / self.max_concurrency))

    async def acquire(self, timeout_s: float | None) -> float:
        """Take a slot, waiting in the queue if needed; returns the seconds waited. Raises
        Overloaded when the queue is full, TimeoutError after `timeout_s`."""
        if self.active < self.max_concurrency and not self.waiting:
            self.active += 1
            return 0.0
        if self.waiting >= self.max_queue:
            raise Overloaded(self.retry_after())
        loop = asyncio.get_running_loop()
        start = loop.time()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return loop.time() - start

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back: to the first waiter, else to the pool."""
        if held_s is not None:
            self._seen += 1
            weight = max(0.1, 1.0 / self._seen)
            self._service_s += weight * (held_s - self._service_s)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter: `active` is unchanged
                return
        self.active -= 1
