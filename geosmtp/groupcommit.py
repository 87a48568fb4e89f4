"""Group commit: one flush of the spool's filesystem makes every change made before it durable.

A commit that fsyncs its own file and then its directory pays two disk flushes a message.
Here a change is written without any fsync, and its caller waits for a round: one
`syncfs(2)` of the spool's filesystem, started after the caller's writes, which flushes
every file and directory entry written on it so far, whoever wrote them. Callers that
arrive while a round runs share the next one, so a burst of N commits costs about two
flushes, not 2N.

A caller's writes can run in the round's job (`before`), so that a burst of commits costs
one thread hand-off, not one each. An ordering that needs "this is durable before that is
made visible" (a message file before the queue entry that names it) is `then`: it runs in
the round's job right after its flush succeeded, and a second flush makes what it did
durable (in the same job when nobody else is waiting, else the next round's, shared). A
failed flush fails every caller of its round: none of them may call its change durable.

syncfs() has reported writeback errors (an I/O error on any file of the filesystem since
the descriptor was opened) since Linux 5.8; before, it returned 0 whatever happened. Each
process opens its own descriptor: processes sharing one (a master's, inherited by its
workers) would share that error state, and only the first to flush would see an error.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Callable, Literal, Sequence

from gevent.event import AsyncResult
from loguru import logger

from geosmtp import handlers

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


def fsync_path(path: str, data_only: bool = False) -> None:
    """fsync of a file (its mtime too: a deferred entry's is its next attempt), or
    fdatasync of a directory (its entries are its data)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def reports_errors(release: str | None = None) -> bool:
    """Whether this kernel's syncfs() reports writeback errors (Linux 5.8 and later)."""
    try:
        major, minor = (int(part) for part in (release or platform.release()).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


class _Slot:
    """One caller's part of a round: its work before the flush and after it, what either
    raised (that caller's failure alone), and for the "fsync" method the directories to
    flush after `then` (or in the first flush, without one)."""

    __slots__ = ("before", "then", "error", "dirs")

    def __init__(self, before: Callable[[], None] | None, then: Callable[[], None] | None,
                 dirs: Sequence[str] = ()):
        self.before, self.then, self.error, self.dirs = before, then, None, dirs


class _Round:
    __slots__ = ("done", "slots", "follow")

    def __init__(self) -> None:
        self.done = AsyncResult()
        self.slots: list[_Slot] = []  # every caller waiting for this round
        # the round that makes what the thens did durable: None when this round's job
        # flushed again itself (nobody was waiting to share that flush with)
        self.follow: _Round | None = None


Method = Literal["syncfs", "fsync"]


class GroupCommit:
    """Rounds of flushes, run by `run` (the threadpool: a round is one job) and shared by
    every caller waiting when it starts. Method "syncfs" flushes the whole filesystem of
    `path` at once; "fsync" flushes only what the round's callers name (fdatasync of each
    file and directory, each directory once a flush): slower for a burst on an idle disk,
    unaffected by other writers of the filesystem."""

    def __init__(self, path: str | os.PathLike, run: Callable, method: Method = "syncfs"):
        if method not in ("syncfs", "fsync"):
            raise ValueError(f"unknown flush method {method!r}")
        self._path = os.fspath(path)
        self._run = run
        self.method = method
        self._fd: int | None = None
        self._pid = 0  # the process that opened _fd
        self._next = _Round()
        self._running = False
        self.rounds = 0  # flushes done (for the tests and the benchmark)

    def flush(self, before: Callable[[], None] | None = None, then: Callable[[], None] | None = None,
              files: Sequence[str] = (), dirs: Sequence[str] = ()) -> None:
        """Return once a flush that started after this call succeeded: every file written
        and every name made before the call is durable.

        `before` runs in the round's job ahead of its flush (the caller's writes: one
        thread hand-off for the whole round instead of one each). `then` runs in the job
        after the flush (a name for what is now durable), and flush returns once a second
        flush made that durable too: the same job's, when nobody else is waiting, else the
        next round's, shared. What `before` or `then` raises is this caller's alone (a
        failed `before` skips its `then`); OSError when a flush failed.

        `files` and `dirs` are for the "fsync" method (syncfs covers everything): the files
        `before` wrote, and the directories whose names must be durable when flush returns
        (those `then`, or the caller before calling, changed). With that method `before`
        and the fsync of its files run in a job of the caller's own, beside the others':
        the disk takes concurrent flushes together, where one after the other in the
        round's job they would each wait for the last."""
        if self.method == "fsync" and (before is not None or files):
            self._run(self._write_and_sync, before, files)
            before = None
        slot = _Slot(before, then, dirs)
        current = self._next
        current.slots.append(slot)
        if not self._running:
            self._running = True
            handlers.spawn(self._rounds)
        current.done.get()
        if slot.error is not None:
            raise slot.error
        if then is not None and current.follow is not None:
            current.follow.done.get()

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._pid = os.getpid()
        return self._fd

    @staticmethod
    def _each(slots: list[_Slot], step: str) -> bool:
        """Run every slot's `before` or `then` (the failed ones' skipped); whether any ran."""
        ran = False
        for slot in slots:
            fn = getattr(slot, step)
            if fn is not None and slot.error is None:
                try:
                    fn()
                    ran = True
                except Exception as exc:  # this caller's failure, not the round's
                    slot.error = exc
        return ran

    def _flush(self, slots: list[_Slot], first: bool) -> None:
        """One flush: of the whole filesystem, or of what the slots name. The first flush
        of a round covers the files the befores wrote and the names the callers changed
        without a then; the second, the names the thens made."""
        if self.method == "syncfs":
            syncfs(self._descriptor())
            return
        dirs: dict[str, None] = {}  # each directory once, in order
        for slot in slots:
            if slot.error is not None:
                continue
            if first != (slot.then is not None):  # a then's names: the flush after it
                dirs.update(dict.fromkeys(slot.dirs))
        for path in dirs:
            fsync_path(path, data_only=True)

    @staticmethod
    def _write_and_sync(before: Callable[[], None] | None, files: Sequence[str]) -> None:
        if before is not None:
            before()
        for path in files:
            fsync_path(path)

    def _round(self, slots: list[_Slot]) -> bool:
        """One round's job; True when it flushed a second time for its thens."""
        self._each(slots, "before")
        self._flush(slots, first=True)
        if not self._each(slots, "then"):
            return False
        if self._next.slots:  # others wait: the next round's flush covers the thens too
            return False
        self._flush(slots, first=False)  # alone: one job, not two
        return True

    def _rounds(self) -> None:
        try:
            while self._next.slots:
                current, self._next = self._next, _Round()
                try:
                    flushed_twice = self._run(self._round, current.slots)
                except OSError as exc:
                    logger.error("spool: flush of {} failed: {}", self._path, exc)
                    current.done.set_exception(exc)
                except BaseException as exc:
                    current.done.set_exception(OSError(f"flush interrupted: {exc!r}"))
                    raise
                else:
                    named = [s for s in current.slots if s.then is not None and s.error is None]
                    if not flushed_twice and named:
                        # the next round is theirs too, and must run even if nobody else
                        # comes: a stand-in caller there, with the directories they changed
                        current.follow = self._next
                        self._next.slots.append(_Slot(None, None, [d for s in named for d in s.dirs]))
                    current.done.set(None)
                self.rounds += 1
        except BaseException as exc:
            # whoever queued behind the interrupted round fails too, rather than waiting forever
            queued, self._next = self._next, _Round()
            queued.done.set_exception(OSError(f"flush interrupted: {exc!r}"))
            raise
        finally:
            self._running = False
