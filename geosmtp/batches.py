"""Small disk jobs of many greenlets, done in one threadpool job: whatever is queued when a
job ends goes into the next one.

Each hand-off to the threadpool costs a wake-up of a thread, a wake-up of the hub and a
handover of the GIL each way; the queue manager's own disk work per message (read an entry,
remove one) is smaller than that. A burst of N deliveries finishing or starting together
thus costs one or two hand-offs, not N, and nothing of it runs on the hub.
"""
from __future__ import annotations

from typing import Callable, Generic, Sequence, TypeVar

from gevent.event import AsyncResult, Event

from geosmtp import handlers

Item = TypeVar("Item")
Result = TypeVar("Result")

LIMIT = 256  # items in one job: a batch of slow items must not hold up the next for long


class Batches(Generic[Item, Result]):
    """`work(items)` in the threadpool (`run`), for the items of many callers at once.
    `work` returns one outcome per item, in order: (True, its result) or (False, the
    exception that item alone raised). An exception out of `work` fails its whole batch.
    `after(items, outcomes)`, if given, runs on the hub once a batch is done (what posted
    items, which nobody waits for, lead to)."""

    def __init__(self, run: Callable, work: Callable[[Sequence[Item]], list[tuple[bool, object]]],
                 after: Callable[[Sequence[Item], list[tuple[bool, object]]], None] | None = None,
                 limit: int = LIMIT):
        self._run = run
        self._work = work
        self._after = after
        self._limit = limit
        self._queued: list[tuple[Item, AsyncResult | None]] = []
        self._idle = Event()
        self._idle.set()

    def call(self, item: Item) -> Result:
        """The item's result, once its batch is done (or what it raised)."""
        result = AsyncResult()
        self._add(item, result)
        return result.get()

    def post(self, item: Item) -> None:
        """The item is done in a coming batch; nobody waits (its failure is the work's to
        log)."""
        self._add(item, None)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is done; whether it was, in time."""
        return self._idle.wait(timeout)

    def _add(self, item: Item, result: AsyncResult | None) -> None:
        self._queued.append((item, result))
        if self._idle.is_set():
            self._idle.clear()
            handlers.spawn(self._jobs)

    def _jobs(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued[:self._limit], self._queued[self._limit:]
                items = [item for item, _ in batch]
                try:
                    outcomes = self._run(self._work, items)
                except BaseException as exc:  # the whole batch failed (or we are killed)
                    outcomes = [(False, exc)] * len(batch)
                    if not isinstance(exc, Exception):
                        self._answer(batch, outcomes)
                        raise
                self._answer(batch, outcomes)
                if self._after is not None:
                    self._after(items, outcomes)
        finally:
            self._idle.set()

    @staticmethod
    def _answer(batch: list, outcomes: list[tuple[bool, object]]) -> None:
        for (_, result), (ok, value) in zip(batch, outcomes):
            if result is not None:
                if ok:
                    result.set(value)
                else:
                    result.set_exception(value)


def each(fn: Callable[[Item], Result]) -> Callable[[Sequence[Item]], list[tuple[bool, object]]]:
    """A batch's work that is fn(item) for every item, each item's exception its own."""
    def work(items: Sequence[Item]) -> list[tuple[bool, object]]:
        out: list[tuple[bool, object]] = []
        for item in items:
            try:
                out.append((True, fn(item)))
            except Exception as exc:
                out.append((False, exc))
        return out
    return work
