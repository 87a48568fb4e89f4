"""Counting events per key over a time window (messages per hour per IP, AUTH failures...),
and open connections per client.

The Limiter and ConnectionCounter interfaces are small so that a shared store (Redis:
geosmtp.redislimits) can replace the in-memory defaults when several processes or nodes
must share counts. The default approximates a sliding window
with two fixed windows (the previous one weighted by how much of it still overlaps), which
needs two integers per key and no timestamps per event.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable, Protocol


HOUR = 3600.0


def ip_messages(client_key: str) -> str:
    """The limiter key of a client's messages per hour (its connections' key is `client_key`)."""
    return f"ip:{client_key}"


class Limiter(Protocol):
    """Both calls return promptly (a shared store's calls are under its timeout). A store
    that cannot answer says so through count(): 0 lets the client through, infinity
    refuses it as over the limit (a 4xx), as its configuration says; add() then drops the
    event."""

    def count(self, key: str, window: float) -> float:
        """Events for key within the last `window` seconds (approximately)."""

    def add(self, key: str, window: float) -> None:
        """Record one event for key."""


class ConnectionCounter(Protocol):
    """Open connections per client key. enter() and leave() pair up: a connection that
    entered leaves exactly once, when it closes."""

    def enter(self, key: str, limit: int) -> bool:
        """One more connection for key, unless `limit` are open already (False, nothing counted)."""

    def leave(self, key: str) -> None:
        """A connection that entered has closed."""

    def start(self) -> None:
        """The process accepts connections from now on (a shared counter starts its upkeep)."""

    def close(self) -> None:
        """The process has stopped accepting and its sessions are over."""


class LocalConnections:
    """The connections of this process (`open`: key -> count, only keys with some open)."""

    def __init__(self):
        self.open: Counter[str] = Counter()

    def enter(self, key: str, limit: int) -> bool:
        if self.open[key] >= limit:
            return False
        self.open[key] += 1
        return True

    def leave(self, key: str) -> None:
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._max_keys = max_keys
        # (key, window) → [index of the current fixed window, events in it, events in the one before]
        self._slots: dict[tuple[str, float], list] = {}

    def _slot(self, key: str, window: float) -> tuple[list, float]:
        now = self._clock()
        index = int(now // window)
        slot = self._slots.get((key, window))
        if slot is None:
            if len(self._slots) >= self._max_keys:
                self._purge(now)
            slot = self._slots[(key, window)] = [index, 0, 0]
        elif slot[0] != index:
            slot[2] = slot[1] if slot[0] == index - 1 else 0
            slot[0], slot[1] = index, 0
        return slot, (now % window) / window

    def count(self, key: str, window: float) -> float:
        """The window's events plus the previous window's weighted by its overlap, that share
        rounded up: just after a boundary the last window still holds all of its events,
        and a limit of N must not let an (N+1)th through because N x 0.9999 < N."""
        slot, elapsed = self._slot(key, window)
        return slot[1] + math.ceil(slot[2] * (1.0 - elapsed))

    def add(self, key: str, window: float) -> None:
        slot, _ = self._slot(key, window)
        slot[1] += 1

    def _purge(self, now: float) -> None:
        """Forget keys idle for two windows; if still full, the oldest half."""
        stale = [k for k, s in self._slots.items() if s[0] < int(now // k[1]) - 1]
        for k in stale:
            del self._slots[k]
        if len(self._slots) >= self._max_keys:
            for k in list(self._slots)[: len(self._slots) // 2]:
                del self._slots[k]
