"""Per-destination fairness for the queue manager: how many messages are in delivery for each
destination, and the entries that wait, in memory, until one of their destinations has room.

A destination is what a delivery target groups recipients by (the MX domain, the smarthost,
an LMTP server), named with the target's kind: "relay:example.com". At most `limit`
messages are in delivery for one destination at a time (Postfix's
default_destination_concurrency_limit), so one slow or dead destination with 50,000
messages takes that many slots of the delivery pool and no more: a message for any other
destination still finds a free slot.

An entry whose destination is at its limit is not started. It is parked here, by id, in the
order it came due (the entry itself stays in deferred/ or incoming/, where the operator's
tools find it), and taken out when a delivery to that destination ends. Nothing polls: a
parked entry costs a dict slot and a deque slot. The destinations of an entry are known from
its last attempt (remember()); one seen for the first time is claimed, read and, if it must
wait, put back (the queue manager's job).

Everything here runs on the hub, without I/O.
"""
from __future__ import annotations

from collections import Counter, deque
from typing import Iterable, Iterator

Routes = tuple[str, ...]  # the bounded destinations of one message, sorted, no repeats


class Destinations:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy: Counter[str] = Counter()  # destination → messages in delivery
        self._waiting: dict[str, deque[str]] = {}  # destination → parked ids, oldest first
        self._parked: dict[str, tuple[str, str]] = {}  # parked id → (its state, its destination)
        self._known: dict[str, Routes] = {}  # deferred id → its destinations at its last attempt
        self._shared: dict[Routes, Routes] = {}  # one tuple for every equal set of routes
        self._freed: set[str] = set()  # destinations with room and with entries parked on them

    # -- what an entry goes to --------------------------------------------------------------
    def routes(self, destinations: Iterable[str]) -> Routes:
        """The destinations as one shared tuple (100,000 messages for one domain share it)."""
        key = tuple(sorted(set(destinations)))
        return self._shared.setdefault(key, key)

    def remember(self, qid: str, routes: Routes) -> None:
        self._known[qid] = routes

    def known(self, qid: str) -> Routes | None:
        return self._known.get(qid)

    def forget(self, qid: str) -> None:
        self._known.pop(qid, None)

    # -- slots ------------------------------------------------------------------------------
    def full(self, routes: Routes) -> str | None:
        """The first of `routes` at its limit (the one to wait for), or None."""
        for destination in routes:
            if self._busy[destination] >= self.limit:
                return destination
        return None

    def take(self, routes: Routes) -> None:
        for destination in routes:
            self._busy[destination] += 1

    def give_back(self, routes: Routes) -> bool:
        """A delivery has ended; True when an entry parked on one of `routes` may go now."""
        woke = False
        for destination in routes:
            left = self._busy[destination] - 1
            if left > 0:
                self._busy[destination] = left
            else:
                del self._busy[destination]
            if destination in self._waiting:
                self._freed.add(destination)
                woke = True
        return woke

    def in_delivery(self, destination: str) -> int:
        return self._busy.get(destination, 0)

    # -- parked entries ---------------------------------------------------------------------
    def __contains__(self, qid: str) -> bool:
        """Whether `qid` is parked (the queue manager does not start it again meanwhile)."""
        return qid in self._parked

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, qid: str, state: str, on: str) -> None:
        """`qid` (in `state`) waits for a slot of `on`."""
        if qid in self._parked:
            self.moved(qid, state)
            return
        self._parked[qid] = (state, on)
        self._waiting.setdefault(on, deque()).append(qid)
        if self._busy[on] < self.limit:  # room came back before it was parked
            self._freed.add(on)

    def moved(self, qid: str, state: str) -> None:
        """A parked entry is now in `state` (an operator's flush took it to incoming/): it
        keeps its place, and is claimed from there when its turn comes."""
        self._parked[qid] = (state, self._parked[qid][1])

    def ready(self) -> Iterator[tuple[str, str]]:
        """Take out (id, state) of the parked entries whose destination has room, oldest
        first, one destination after the other, as long as the caller asks: the caller
        checks every one again (full()) before it starts it, and parks it again if it must."""
        while self._freed:
            destination = self._freed.pop()
            queue = self._waiting.get(destination)
            try:
                while queue and self._busy[destination] < self.limit:
                    qid = queue.popleft()
                    state, _ = self._parked.pop(qid)
                    yield qid, state
            finally:  # also when the caller stops early: what is left keeps its turn
                if not queue:
                    self._waiting.pop(destination, None)
                elif self._busy[destination] < self.limit:
                    self._freed.add(destination)
