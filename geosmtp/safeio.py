"""The one way geosmtp changes files on disk: write to tmp, fsync, rename; fsync the directory.

A crash leaves either the old file or the new one, never half of one. Directory fsyncs are
shared by concurrent callers (group commit): one fsync covers every rename made before it
began, so a burst of commits costs one directory fsync instead of one each. The disk work
runs off the gevent hub, in a threadpool, through threadpool_runner().
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import gevent
from gevent.event import AsyncResult

# errors that mean "the disk is full", as opposed to any other storage failure
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# (uid, gid) every new file is given, or None: set by geosmtp-queue when root works on a
# spool that belongs to the server's user, who must still be able to read what it writes
owner: tuple[int, int] | None = None


def create(path: str | os.PathLike) -> int:
    """A new file only this writer knows about (O_EXCL: never reuses a name)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    if owner is not None:
        try:
            os.fchown(fd, *owner)
        except BaseException:
            os.close(fd)
            raise
    return fd


def finish(fd: int, tmp: str | os.PathLike, final: str | os.PathLike, data: bytes = b"",
           mtime: float | None = None) -> None:
    """Write what is left, fsync, close, (set the mtime,) rename into place. Closes fd always.

    The caller still owes a directory sync of `final`'s folder before calling it durable.
    """
    try:
        if data:
            write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.rename(tmp, final)


@contextmanager
def atomic_write(tmp: str | os.PathLike, final: str | os.PathLike, *, like: str | os.PathLike | None = None,
                 mtime: float | None = None) -> Iterator[int]:
    """The one safe-write recipe: `with atomic_write(tmp, final) as fd: write_all(fd, ...)`.
    A stale tmp (a crash mid-write) is removed first; the new file gets the mode (never
    readable by others) and owner of `like` when that exists; on leaving, it is fsynced,
    closed and renamed over final, or on any error closed and removed. The caller still owes
    a directory sync of final's folder before calling it durable."""
    unlink_quietly(tmp)
    fd = create(tmp)
    try:
        if like is not None:
            try:
                st = os.stat(like)
                os.fchmod(fd, st.st_mode & 0o7770)
                os.fchown(fd, st.st_uid, st.st_gid)
            except FileNotFoundError:
                pass
        yield fd
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    try:
        finish(fd, tmp, final, mtime=mtime)
    except BaseException:
        unlink_quietly(tmp)
        raise


def write_file(tmp: str | os.PathLike, final: str | os.PathLike, data: bytes,
               mtime: float | None = None) -> None:
    """The whole file at once: create tmp, write, fsync, rename over final."""
    with atomic_write(tmp, final, mtime=mtime) as fd:
        write_all(fd, data)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Atomic rename; False when src is gone (another claimer won)."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    return True


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A second name for a file (same filesystem); fails if dst exists."""
    os.link(src, dst)


def unlink_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_path(path: str | os.PathLike) -> None:
    """Make a directory's entries durable. fdatasync: the entries are the directory's data;
    its timestamps, which fsync would also write, are not needed to find them."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """fsync of a set of directories, shared by every caller that arrives while one runs.

    sync() returns once fsyncs that *started after* the call have finished, so every rename
    or link the caller made in those directories before calling is durable. `run` executes
    the fsyncs (off the gevent hub, e.g. a threadpool's apply) in one job per round.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], run: Callable):
        self._paths = tuple(paths)
        self._run = run
        self._round = AsyncResult()
        self._waiting = 0
        self._running = False

    def sync(self) -> None:
        self._waiting += 1
        result = self._round
        if not self._running:
            self._running = True
            gevent.spawn(self._rounds)
        result.get()

    def _fsync_all(self) -> None:
        for path in self._paths:
            fsync_path(path)

    def _rounds(self) -> None:
        try:
            while self._waiting:
                result, self._round = self._round, AsyncResult()
                self._waiting = 0
                try:
                    self._run(self._fsync_all)
                except OSError as exc:
                    result.set_exception(exc)
                except BaseException as exc:
                    result.set_exception(OSError(f"directory sync interrupted: {exc!r}"))
                    raise
                else:
                    result.set(None)
        except BaseException as exc:
            # whoever queued behind the interrupted round fails too, rather than waiting forever
            queued, self._round, self._waiting = self._round, AsyncResult(), 0
            queued.set_exception(OSError(f"directory sync interrupted: {exc!r}"))
            raise
        finally:
            self._running = False


class _Raised:
    """What a pool job raised, carried back as its return value."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _outcome(fn: Callable, args: tuple):
    try:
        return fn(*args)
    except Exception as exc:  # BaseException (SystemExit, ...) stays gevent's to handle
        return _Raised(exc)


def threadpool_runner(pool) -> Callable:
    """`run(fn, *args)`: fn(*args) in gevent's threadpool `pool`; the caller gets its result
    or its exception, and only the caller. A job that raises is otherwise also reported to
    the hub, which prints its traceback raw on stderr whether or not the caller handles it
    (gevent#617: "the threadpool works just like greenlets and the hub: uncaught errors are
    printed"): a full disk would print one per refused message. The exception keeps its
    traceback from the thread, so a caller that logs an unexpected one logs where it began."""

    def run(fn: Callable, *args):
        result = pool.apply(_outcome, (fn, args))
        if isinstance(result, _Raised):
            raise result.error
        return result

    return run
