"""The one way geosmtp changes files on disk: write to tmp, fsync, rename; fsync the directory.

A crash leaves either the old file or the new one, never half of one. The spool does not
fsync file by file: its changes share the flushes of geosmtp.groupcommit. The disk work runs
off the gevent hub, in a threadpool, through threadpool_runner().
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Callable, Iterator


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


def write_unsynced(path: str | os.PathLike, data: bytes, mtime: float | None = None) -> None:
    """A new file (a stale one of that name removed first) with `data`, not fsynced: for a
    caller whose group commit flushes it (geosmtp.groupcommit) before anything names it."""
    unlink_quietly(path)
    fd = create(path)
    try:
        write_all(fd, data)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


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
