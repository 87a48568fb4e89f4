"""Counting events per key over a time window (messages per hour per IP, AUTH failures...).

The Limiter interface is small so that a shared store (Redis) can replace the in-memory
default when several nodes must share counts. The default approximates a sliding window
with two fixed windows (the previous one weighted by how much of it still overlaps), which
needs two integers per key and no timestamps per event.
"""
from __future__ import annotations

import time
from typing import Callable, Protocol


class Limiter(Protocol):
    def count(self, key: str, window: float) -> float:
        """Events for key within the last `window` seconds (approximately)."""

    def add(self, key: str, window: float) -> None:
        """Record one event for key."""


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
        slot, elapsed = self._slot(key, window)
        return slot[1] + slot[2] * (1.0 - elapsed)

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
