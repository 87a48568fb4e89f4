"""A small time-to-live cache for directory answers, "no such address" included, so a busy
RCPT stream asks the database once per address per `ttl` seconds, and a mailbox added to
the database is seen by every process of every node within `ttl` seconds.

Bounded: at most `size` answers; past that the oldest stored goes first, so addresses a
hostile client makes up cannot grow it. Failures are never stored. Runs on the hub only
(no lock: a dict's operations do not yield).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable

MISS = object()  # what get() returns for nothing (or nothing fresh) stored


class TTLCache:
    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._items: OrderedDict[Hashable, tuple[float, object]] = OrderedDict()

    def get(self, key: Hashable) -> object:
        item = self._items.get(key)
        if item is None:
            return MISS
        if item[0] <= self.clock():
            del self._items[key]
            return MISS
        return item[1]

    def put(self, key: Hashable, value: object) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
