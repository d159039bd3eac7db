"""Continuous batching of decode: concurrent requests share one batched decoder step.

Decode on a CPU or an edge GPU is bound by reading the weights, and a batched step reads them
once for every row, so requests that decode together each go almost as fast as one alone.

    scheduler = BatchScheduler(batch)             # batch = backend.open_batch(max_batch, capacity)
    row = DecodeRow(state, first_token, on_logits)
    scheduler.submit(row); row.done.wait()

A request prefills on its own thread (prefill is compute-bound and runs beside the decode
steps), samples its first token there, then hands its cache to the scheduler. The scheduler's
thread admits waiting requests into free slots in arrival order (FIFO) between steps, and each
step advances every admitted request by exactly one token: rows join and leave without waiting
for each other, and no request can take more than its share. The per-request work after a step
(sampling, stop tokens and strings, detokenization, cancellation) is the row's `on_logits`
callback, run on the scheduler's thread; it returns the next token to feed or None when the
request is finished. A row takes part in a step only while fewer than `ahead` of its text pieces
wait for its reader: a slow reader holds back its own request, never the others. A request
cancelled by its reader ends with exactly the tokens of the pieces it read, as when it decodes
alone (the pipeline trims what was decoded ahead). A request whose cache does not fit the batch's capacity, or arrives while
batching is off, decodes on its own as before.

Fairness rule: first come, first admitted; one token per admitted request per step; at most
`max_batch` rows per step. The thread stops when no request is left and starts again on the
next submit.

Prefill first (the default, `prefill_first=True`): while another request encodes its images or
prefills its prompt (the pipeline holds :meth:`BatchScheduler.prefilling` from its first visual
stage to its first token), decode steps wait for it instead of sharing the cores with it. On a
CPU a prefill and a decode step running side by side slow each other down, so every step during
a prefill is a long gap for the requests already decoding, and the new request's first token
comes later; waiting instead gives the decoding requests one gap per arriving request (its
prefill), the new request the whole machine, and then all of them decode in one batch. A
request waits at most for the prefills that begin while it waits, and no more than `max_batch`
of them: when more have begun since the last step, one step runs beside them (so a stream of
arrivals cannot starve the requests that decode). `prefill_first=False` steps as soon as rows
are ready, beside any prefill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from maven_edge.runtime.backends.base import DecodeBatch, DecodeState


@dataclass(eq=False)
class DecodeRow:
    """One request inside the scheduler."""

    state: DecodeState  # the request's cache after prefill (copied into a slot on admission)
    next_token: int  # the token the next step feeds
    #: logits -> (next token or None when finished, whether it handed text to the reader)
    on_logits: Callable[[np.ndarray], tuple[int | None, bool]]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False  # set by the request's own thread (client gone); dropped at the next step
    #: text pieces handed over but not yet taken by the request's reader; a row takes part in a
    #: step only while this is below the scheduler's `ahead`, so a request decodes at most that
    #: many pieces ahead of its reader
    buffered: int = 0
    #: called on the scheduler's thread with (batch, slot) when the row finishes normally, before its
    #: slot is freed (the pipeline copies the conversation's KV out for the prefix cache)
    on_finish: Callable[[DecodeBatch, int], None] | None = None
    slot: int | None = None
    steps: int = 0
    occupancy_sum: int = 0  # rows in the steps this request took part in, summed
    step_ms: list[float] = field(default_factory=list)

    @property
    def occupancy(self) -> float:
        return self.occupancy_sum / self.steps if self.steps else 0.0


@dataclass
class BatchStats:
    steps: int = 0
    rows: int = 0  # summed over steps
    admitted: int = 0
    waiting: int = 0
    active: int = 0
    prefills: int = 0  # requests encoding or prefilling now
    held_s: float = 0.0  # time the ready rows waited for other requests' prefills (prefill first)

    def to_dict(self) -> dict[str, float]:
        return {"batch_steps": self.steps, "batch_rows": self.rows, "batch_admitted": self.admitted,
                "batch_waiting": self.waiting, "batch_active": self.active, "batch_prefills": self.prefills,
                "batch_held_s": self.held_s, "batch_occupancy": self.rows / self.steps if self.steps else 0.0}


class PrefillHold:
    """One request's prefill as the scheduler sees it (see :meth:`BatchScheduler.prefilling`);
    `release()` ends it, once, and is also called by leaving a ``with`` block."""

    def __init__(self, scheduler: BatchScheduler):
        self._scheduler: BatchScheduler | None = scheduler

    def release(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler._prefill_done()

    def __enter__(self) -> PrefillHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BatchScheduler:
    """Runs :class:`DecodeRow`s through a :class:`DecodeBatch`, one step for all rows at a time."""

    def __init__(self, batch: DecodeBatch, call: Callable[..., object] | None = None, ahead: int = 2,
                 prefill_first: bool = True):
        self.batch = batch
        self.ahead = ahead
        self.prefill_first = prefill_first
        self._begun = 0  # prefills begun since the last step while rows were waiting or decoding
        self._call = call or (lambda fn, *a: fn(*a))
        self._cond = threading.Condition()
        self._waiting: deque[DecodeRow] = deque()
        self._active: dict[int, DecodeRow] = {}
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()

    def fits(self, state: DecodeState, remaining_tokens: int) -> bool:
        """Whether a request with this cache and this many tokens still to feed fits a slot."""
        return state.length + remaining_tokens <= self.batch.capacity

    def took(self, row: DecodeRow) -> None:
        """The row's reader took one piece of text."""
        with self._cond:
            row.buffered -= 1
            self._cond.notify_all()

    def prefilling(self) -> PrefillHold:
        """A request starts its visual stages and prefill; release the hold at its first token."""
        with self._cond:
            self.stats.prefills += 1
            self._begun = self._begun + 1 if (self._active or self._waiting) else self.stats.prefills
        return PrefillHold(self)

    def _prefill_done(self) -> None:
        with self._cond:
            self.stats.prefills -= 1
            self._cond.notify_all()

    def _held(self) -> bool:
        """Whether ready rows wait for prefills now (the prefill-first rule in the module docstring)."""
        return self.prefill_first and self.stats.prefills > 0 and self._begun <= self.batch.max_batch

    def submit(self, row: DecodeRow) -> None:
        with self._cond:
            self._waiting.append(row)
            self.stats.waiting = len(self._waiting)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="maven-decode-batch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    # ---- the scheduler thread ------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and self.batch.free_slots():
            row = self._waiting.popleft()
            if row.cancelled:
                row.done.set()
                continue
            row.slot = self.batch.join(row.state)
            row.state.release()  # its cache now lives in the slot
            self._active[row.slot] = row
            self.stats.admitted += 1
        self.stats.waiting, self.stats.active = len(self._waiting), len(self._active)

    def _finish(self, row: DecodeRow, error: BaseException | None = None) -> None:
        if row.slot is not None and self._active.get(row.slot) is row:
            if error is None and not row.cancelled and row.on_finish is not None:
                try:
                    row.on_finish(self.batch, row.slot)
                except Exception:  # noqa: BLE001 - a cache that could not be filled costs nothing but reuse
                    pass
            del self._active[row.slot]
            self.batch.leave(row.slot)
        row.error = error
        row.done.set()

    def _loop(self) -> None:
        while True:
            with self._cond:
                for row in [r for r in self._active.values() if r.cancelled]:
                    self._finish(row)
                self._admit()
                if not self._active:
                    if not self._waiting:
                        self._thread = None
                        return
                    self._cond.wait(0.05)
                    continue
                rows = sorted((slot, row) for slot, row in self._active.items() if row.buffered < self.ahead)
                if not rows:  # every admitted request waits for its reader
                    self._cond.wait(0.05)
                    continue
                if self._held():  # another request prefills: let it have the cores
                    t_hold = time.perf_counter()
                    self._cond.wait(0.05)
                    self.stats.held_s += time.perf_counter() - t_hold
                    continue
                self._begun = 0
            feed = [(slot, row.next_token) for slot, row in rows]
            t0 = time.perf_counter()
            try:
                logits = self._call(self.batch.step, feed)
            except BaseException as exc:  # noqa: BLE001 - every row learns of it, the thread stays healthy
                with self._cond:
                    for _, row in rows:
                        self._finish(row, exc)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            self.stats.steps += 1
            self.stats.rows += len(rows)
            for (_, row), row_logits in zip(rows, logits, strict=True):
                row.steps += 1
                row.occupancy_sum += len(rows)
                row.step_ms.append(ms)
                try:
                    nxt, emitted = (None, False) if row.cancelled else row.on_logits(row_logits)
                except BaseException as exc:  # noqa: BLE001 - handed to the request's own thread
                    with self._cond:
                        self._finish(row, exc)
                    continue
                if emitted:
                    with self._cond:
                        row.buffered += 1
                if nxt is None:
                    with self._cond:
                        self._finish(row)
                else:
                    row.next_token = int(nxt)
