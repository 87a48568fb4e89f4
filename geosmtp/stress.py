"""Stress-adaptive limits for one listener of this process, as Postfix's STRESS_README
describes: past a share of max_connections the sessions (those already open too) work under
stricter limits, and a new client that finds the listener full takes the slot of the session
that has sent nothing useful for longest, instead of being turned away.

"Useful" is an accepted MAIL, RCPT, DATA (its 354 and its 250), AUTH or STARTTLS, and message
octets at the minimum data rate; NOOP, RSET, EHLO, errors and dripped bytes are not. Counts
are per process: with [server] workers = N each worker has its own max_connections per
listener, and its own stress state.
"""
from __future__ import annotations

import math
from time import monotonic
from typing import Callable, Hashable, Iterable, Protocol

from loguru import logger

from geosmtp import handlers, metrics

# The band below the threshold the open sessions must fall into before stress ends (a tenth
# of max_connections, at least one): without it one session coming and going at the
# threshold would switch the limits, and log, at every connection.
HYSTERESIS = 0.1


class Evicted(Exception):
    """Raised into a session to make room for a new client (it says 421 4.7.0 and closes)."""


class Evictable(Protocol):
    def last_useful(self) -> float: ...

    @property
    def evictable(self) -> bool: ...  # waiting for input now: interrupting it loses nothing


def under_stress(stressed: bool, open_sessions: int, capacity: int, share: float) -> bool:
    """The state machine: stress starts when `open_sessions` reach `share` of `capacity`,
    and ends only once they are a hysteresis band below that."""
    high = max(1, math.ceil(capacity * share))
    if not stressed:
        return open_sessions >= high
    return open_sessions > high - max(1, int(capacity * HYSTERESIS))


def longest_useless(sessions: Iterable[tuple[Hashable, Evictable]]) -> Hashable | None:
    """The key of the evictable session whose last useful act is oldest, or None."""
    best, best_at = None, math.inf
    for key, session in sessions:
        if session.evictable:
            at = session.last_useful()
            if at < best_at:
                best, best_at = key, at
    return best


class Load:
    """The open sessions of one listener in this process (greenlet → session) and whether
    they are under stress. Sessions read `stressed` at every receive."""

    def __init__(self, listener: str, interrupt: Callable = handlers.interrupt):
        self.listener = listener
        self.interrupt = interrupt  # (greenlet, exception, still running?): geosmtp.handlers
        self.sessions: dict = {}
        self.evicted: set = set()  # greenlets told to go, not gone yet
        self.stressed = False

    @property
    def open(self) -> int:
        """Sessions that hold a slot (the evicted have given theirs away already)."""
        return len(self.sessions) - len(self.evicted)

    def join(self, greenlet, session, capacity: int, share: float) -> None:
        self.sessions[greenlet] = session
        self._update(capacity, share)

    def leave(self, greenlet, capacity: int, share: float) -> None:
        self.sessions.pop(greenlet, None)
        self.evicted.discard(greenlet)
        self._update(capacity, share)

    def make_room(self, capacity: int) -> bool:
        """True if a new session may open: a slot is free, or the longest-useless session
        has been told to go (its greenlet gets Evicted at once). False: nobody can go."""
        if self.open < capacity:
            return True
        victim = longest_useless((g, s) for g, s in self.sessions.items() if g not in self.evicted)
        if victim is None:
            return False
        session = self.sessions[victim]
        session.log.info("evicted to make room for a new client on {}: nothing useful for {:.1f}s",
                         self.listener, monotonic() - session.last_useful())
        self.evicted.add(victim)
        metrics.EVICTED.labels(self.listener).inc()
        self.interrupt(victim, Evicted(), lambda: self.sessions.get(victim) is session)
        return True

    def _update(self, capacity: int, share: float) -> None:
        stressed = under_stress(self.stressed, self.open, capacity, share)
        if stressed == self.stressed:
            return
        self.stressed = stressed
        state = "on" if stressed else "off"
        metrics.STRESS.labels(self.listener).set(int(stressed))
        metrics.STRESS_CHANGES.labels(self.listener, state).inc()
        if stressed:
            logger.warning("stress on {}: {} of {} sessions open; stricter timeouts, rate and error "
                           "limits; a new client takes the slot of the longest idle", self.listener,
                           self.open, capacity)
        else:
            logger.info("stress off on {}: {} of {} sessions open; normal limits", self.listener,
                        self.open, capacity)
