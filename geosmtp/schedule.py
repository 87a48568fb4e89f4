"""When each deferred entry is due: the queue manager's in-memory schedule of deferred/.

A heap of (next attempt, id) and, per id, the time it was last scheduled for. Every
operation costs O(log n) at most, so the queue manager can ask "what is due?" on the hub
whatever the size of the queue, instead of listing and stat-ing deferred/ at every scan.

Items are never searched for: an id scheduled again gets a new heap item, and the old one is
dropped when it comes up (its time is no longer the id's). The schedule may also name entries
that left deferred/ behind the queue manager's back (an operator's flush, hold or delete):
their claim fails when they come due, and that is all.
"""
from __future__ import annotations

import heapq
from typing import Container, Iterable, Iterator


class Schedule:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._when: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, qid: str) -> bool:
        return qid in self._when

    def add(self, qid: str, when: float) -> None:
        """`qid` is due at `when` (replacing any earlier time for it)."""
        self._when[qid] = when
        heapq.heappush(self._heap, (when, qid))

    def discard(self, qid: str) -> None:
        """`qid` is no longer waiting (claimed from incoming/ after a flush, say)."""
        self._when.pop(qid, None)

    def add_missing(self, found: Iterable[tuple[str, float]], busy: Container[str] = ()) -> int:
        """Schedule the (id, time) pairs of ids neither known yet nor `busy`; the number
        added. What is known stays: the queue manager wrote it, and a walk of the directory
        may be older."""
        added = 0
        when_of = self._when
        for qid, when in found:
            if qid not in when_of and qid not in busy:
                self.add(qid, when)
                added += 1
        return added

    def due(self, now: float) -> Iterator[str | None]:
        """Take out, earliest first, every id due at `now` or before. Each old item dropped on
        the way gives a None, so that a caller on the hub can give way every so many items
        (100,000 of them, left by a flush of the whole queue, can come due at once)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, qid = heapq.heappop(heap)
            if self._when.get(qid) == when:
                del self._when[qid]
                yield qid
            else:
                yield None

    def next_due(self) -> float | None:
        """The earliest time in the schedule (maybe of an item that will be dropped)."""
        return self._heap[0][0] if self._heap else None
