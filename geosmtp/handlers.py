"""Greenlets kept for the next job: the connections, the deliveries, the short jobs the
server starts again and again (a group-commit round, a batch of disk work).

A connection is still handled by one greenlet from start to end, in plain blocking-style
code; only the greenlet outlives it. A new greenlet for every connection costs more than
the checks of its message: Python gives each one a frame stack of its own, mapped afresh
(mmap, then a page fault per page the session's calls reach) and unmapped when it ends;
measured on this project's 2-core VM, 70-85 us of CPU per connection, a tenth of what one
message costs (README "Benchmarks", session 11). A greenlet that has finished its job waits
for the next one instead, up to `keep` of them idle; more than that end.

Because a greenlet runs one connection after another, a session is never interrupted by
killing its greenlet blindly: interrupt() delivers the exception only if the session it was
meant for is still the one running there when it arrives.
"""
from __future__ import annotations

from typing import Callable
from weakref import WeakKeyDictionary

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.queue import SimpleQueue
from loguru import logger


class Handlers:
    """StreamServer's `spawn`: spawn(fn, *args) runs fn(*args) in an idle greenlet, or in a
    new one when none is idle. len() is how many run a connection now. With `size`, at most
    that many jobs run at once (the queue manager's deliveries): spawn() waits for room, as
    gevent's Pool does, and wait_available() waits for it without taking it."""

    def __init__(self, keep: int = 128, size: int | None = None, name: str = "connection handler"):
        self.keep = keep
        self.name = name  # what a failure is logged as
        self._room = Semaphore(size) if size else None
        self._jobs: SimpleQueue = SimpleQueue()
        # greenlets waiting for a job that no queued job has claimed yet: a job is counted
        # off when queued, not when its greenlet wakes (which comes a turn of the hub later,
        # when the next connection may already be there and would wait behind this one)
        self._free = 0
        self._busy = 0
        self._all: set[gevent.Greenlet] = set()
        self._none_busy = Event()
        self._none_busy.set()

    def __len__(self) -> int:
        return self._busy

    def wait_available(self) -> None:
        if self._room is not None:
            self._room.wait()

    def spawn(self, fn: Callable, *args) -> None:
        self._busy += 1  # counted while it waits for room too: join() waits for it
        self._none_busy.clear()
        if self._room is not None:
            try:
                self._room.acquire()
            except BaseException:  # killed while waiting: it never runs
                self._ended()
                raise
        if self._free:
            self._free -= 1
        else:
            g = gevent.spawn(self._run)
            self._all.add(g)
            g.link(self._all.discard)
        self._jobs.put((fn, args))  # each job has a greenlet of its own to take it

    def _run(self) -> None:
        free = False  # counted in _free (a new greenlet comes for a job already counted off)
        while True:
            try:
                fn, args = self._jobs.get()
            except BaseException:  # killed while waiting (GreenletExit at shutdown)
                if free:
                    self._free -= 1
                raise
            try:
                fn(*args)
            except Exception:  # what the hub would have printed for a greenlet of its own
                logger.exception("{} failed", self.name)
            finally:
                self._ended()
                if self._room is not None:
                    self._room.release()
            if self._free >= self.keep:
                return
            self._free += 1
            free = True

    def _ended(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._none_busy.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits for room (or `timeout`); True if none does."""
        return self._none_busy.wait(timeout)

    def kill(self, timeout: float | None = None) -> None:
        """End every greenlet, busy or idle (GreenletExit), waiting at most `timeout`."""
        gevent.killall(list(self._all), block=True, timeout=timeout)


def interrupt(greenlet: gevent.Greenlet, exc: BaseException, still: Callable[[], bool]) -> None:
    """Raise `exc` in `greenlet` at the hub's next turn, if still() is true then (the session
    it was meant for has not ended meanwhile, its greenlet gone on to another connection)."""

    def deliver() -> None:
        if not greenlet.dead and still():
            greenlet.throw(exc)

    gevent.get_hub().loop.run_callback(deliver)


# one pool a hub: a greenlet runs only in the thread of the hub it was made in, so one kept
# by another thread's hub (a thread that ran a server, then ended) would take jobs and
# never run them
_kept: WeakKeyDictionary = WeakKeyDictionary()


def spawn(fn: Callable, *args) -> None:
    """fn(*args) in a kept greenlet of its own for the time it runs: for the short jobs the
    server starts again and again (a group-commit round, a batch of disk work), which a new
    greenlet each time would make pay for a fresh frame stack. Nobody waits for it or kills
    it; what it raises is logged."""
    hub = gevent.get_hub()
    kept = _kept.get(hub)
    if kept is None:
        kept = _kept[hub] = Handlers(keep=16, name="background job")
    kept.spawn(fn, *args)
