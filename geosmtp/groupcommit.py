"""Group commit: one flush of the spool's filesystem makes every change made before it durable.

A commit that fsyncs its own file and then its directory pays two disk flushes a message.
Here a change is written without any fsync, and its caller waits for a round: one
`syncfs(2)` of the spool's filesystem, started after the caller's writes, which flushes
every file and directory entry written on it so far, whoever wrote them. Callers that
arrive while a round runs share the next one, so a burst of N commits costs about two
flushes, not 2N.

An ordering that needs "this is durable before that is made visible" (a message file
before the queue entry that names it) is `flush(then=...)`: `then` runs in the round's
job right after its flush succeeded, and the caller also waits for the next round, which
makes what `then` did durable. A failed flush fails every caller of its round (and runs
no `then`): none of them may call its change durable.

syncfs() has reported writeback errors (an I/O error on any file of the filesystem since
the descriptor was opened) since Linux 5.8; before, it returned 0 whatever happened. Each
process opens its own descriptor: processes sharing one (a master's, inherited by its
workers) would share that error state, and only the first to flush would see an error.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Callable

import gevent
from gevent.event import AsyncResult
from loguru import logger

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def syncfs(fd: int) -> None:
    """syncfs(2) of the filesystem `fd` is on; OSError on a writeback error. ctypes gives
    the GIL up for the call."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reports_errors(release: str | None = None) -> bool:
    """Whether this kernel's syncfs() reports writeback errors (Linux 5.8 and later)."""
    try:
        major, minor = (int(part) for part in (release or platform.release()).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


class _Round:
    __slots__ = ("done", "thens", "follow")

    def __init__(self) -> None:
        self.done = AsyncResult()
        self.thens: list[list] = []  # [fn, exception or None] of the callers who gave one
        self.follow: _Round | None = None  # the round that makes what the thens did durable


class GroupCommit:
    """Rounds of syncfs() on the filesystem of `path`, run by `run` (the threadpool: a
    round is one job) and shared by every caller waiting when it starts."""

    def __init__(self, path: str | os.PathLike, run: Callable):
        self._path = os.fspath(path)
        self._run = run
        self._fd: int | None = None
        self._pid = 0  # the process that opened _fd
        self._next = _Round()
        self._waiting = 0
        self._running = False
        self.rounds = 0  # flushes done (for the tests and the benchmark)

    def flush(self, then: Callable[[], None] | None = None) -> None:
        """Return once a flush that started after this call succeeded: every file written
        and every name made before the call is durable. With `then`, it runs after that
        flush (in the round's job), and flush returns once a second flush made its work
        durable too; an exception of `then` is this caller's alone. OSError when a flush
        failed."""
        slot = None
        current = self._next
        if then is not None:
            slot = [then, None]
            current.thens.append(slot)
        self._waiting += 1
        if not self._running:
            self._running = True
            gevent.spawn(self._rounds)
        current.done.get()
        if slot is not None:
            if slot[1] is not None:
                raise slot[1]
            current.follow.done.get()

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._pid = os.getpid()
        return self._fd

    def _round(self, thens: list[list]) -> None:
        syncfs(self._descriptor())
        for slot in thens:
            try:
                slot[0]()
            except Exception as exc:  # this caller's failure, not the round's
                slot[1] = exc

    def _rounds(self) -> None:
        try:
            while self._waiting:
                current, self._next = self._next, _Round()
                self._waiting = 0
                try:
                    self._run(self._round, current.thens)
                except OSError as exc:
                    logger.error("spool: flush of {} failed: {}", self._path, exc)
                    current.done.set_exception(exc)
                except BaseException as exc:
                    current.done.set_exception(OSError(f"flush interrupted: {exc!r}"))
                    raise
                else:
                    if current.thens:  # the next round is theirs too, and must run
                        current.follow = self._next
                        self._waiting += 1
                    current.done.set(None)
                self.rounds += 1
        except BaseException as exc:
            # whoever queued behind the interrupted round fails too, rather than waiting forever
            queued, self._next, self._waiting = self._next, _Round(), 0
            queued.done.set_exception(OSError(f"flush interrupted: {exc!r}"))
            raise
        finally:
            self._running = False
