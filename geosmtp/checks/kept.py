"""Connections to one server kept per process, for the checks that talk to a daemon on each
message (policy servers, rspamd): a greenlet takes one, uses it alone and puts it back, so
two sessions never interleave on one socket.

A client subclasses KeptConnections and defines _open() (a new connected connection: an
object with `sock`, `opened`, `used`, `pid` and close()). A kept connection is retired when
it has been unused `max_idle`, is older than `max_ttl`, was inherited through a fork, or is
readable while idle (the server closed it, or sent what nobody asked for); at most
`max_connections` are in use at once (`_slots`). Only greenlets use a pool (no threads): its
list changes without a switch in between.
"""
from __future__ import annotations

import math
import os
import time

from gevent.lock import BoundedSemaphore

from geosmtp.connection import readable_now


class KeptConnections:
    def __init__(self, max_idle: float, max_connections: int, max_ttl: float = math.inf):
        self.max_idle = max_idle
        self.max_ttl = max_ttl
        self.max_connections = max_connections
        self._idle: list = []  # most recently used last
        self._slots = BoundedSemaphore(max_connections)
        self.opened = 0  # connections opened so far (tests, logs)
        self.closed = False  # replaced by a reload: sessions still open use it, nothing is kept

    def _open(self):
        raise NotImplementedError

    def _usable(self, conn, now: float) -> bool:
        if conn.pid != os.getpid() or conn.sock is None:  # inherited through fork: the parent's stream
            return False
        if now - conn.used > self.max_idle or now - conn.opened > self.max_ttl:
            return False
        try:  # readable while idle: the server closed it (EOF) or sent what nobody asked for
            return not readable_now(conn.sock)
        except (OSError, ValueError):
            return False

    def _checkout(self) -> tuple[object, bool]:
        """A connection to use alone: (a kept one, True) or (a new one, False)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if self._usable(conn, now):
                return conn, True
            conn.close()
        conn = self._open()
        self.opened += 1
        return conn, False

    def _checkin(self, conn) -> None:
        now = time.monotonic()
        conn.used = now
        if self.closed or now - conn.opened > self.max_ttl or len(self._idle) >= self.max_connections:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        """Close the kept connections (a reload replaces the check); keep none from now on."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()
