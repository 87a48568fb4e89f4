"""The durable mail queue: a directory tree where every state change is one atomic rename.

    tmp/                  files being written; swept at start-up
    msg/<id>              the message as received, our Received: header first; written once
    queue/incoming/<id>   the envelope (JSON); the rename into incoming/ is the commit point
    queue/active/<id>     claimed for delivery: the rename incoming→active is the lock
    queue/deferred/<id>   waiting to retry; the file's mtime is the time of the next attempt
    queue/hold/<id>       held by the operator
    queue/corrupt/<id>    unreadable envelopes, kept for a person

No locks: exactly one claimer wins a rename, so several processes can share a spool. Disk
work runs through `run` (the server passes gevent's threadpool) so the hub never waits on it.
"""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterator

import gevent
from loguru import logger

from geosmtp import safeio
from geosmtp.envelope import Envelope

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
SPILL_SIZE = 128 * 1024  # a message bigger than this goes to disk while DATA is still arriving


class SpoolError(Exception):
    """The message could not be stored; `full` tells a full disk from any other failure."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


def _storage_error(exc: OSError) -> SpoolError:
    return SpoolError(f"{exc.strerror or exc}", full=exc.errno in safeio.FULL_ERRNOS)


def _direct(fn, *args):
    return fn(*args)


def new_id() -> str:
    """Sortable by arrival time, unique across processes and hosts, safe as a file name."""
    return f"{time.time_ns() // 1000:013X}{secrets.token_hex(5).upper()}"


def valid_id(qid: str) -> bool:
    return 16 <= len(qid) <= 40 and qid.isalnum() and qid.isascii()


class MessageWriter:
    """Receives the message bytes for one id; small messages stay in memory until commit."""

    def __init__(self, spool: Spool, qid: str):
        self.spool = spool
        self.id = qid
        self.size = 0
        self._parts: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self._tmp = spool.root / "tmp" / f"{qid}.msg"
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.size += len(data)
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered >= SPILL_SIZE:
            self._spill()

    def _take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self._buffered = 0
        return data

    def _spill(self) -> None:
        data = self._take()
        try:
            if self._fd is None:
                self._fd = safeio.create(self._tmp)
            self.spool.run(safeio.write_all, self._fd, data)
        except OSError as exc:  # remembered; reported at commit, after the client's data ends
            self.error = exc

    def finish(self) -> None:
        """Everything written: fsync and rename into msg/ (run off the hub by the caller)."""
        if self.error is not None:
            raise self.error
        if self._fd is None:
            self._fd = safeio.create(self._tmp)
        fd, self._fd = self._fd, None
        safeio.finish(fd, self._tmp, self.spool.message_path(self.id), self._take())

    def abort(self) -> None:
        self._parts.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        safeio.unlink_quietly(self._tmp)


class Spool:
    def __init__(self, root: str | os.PathLike, run: Callable = _direct):
        self.root = Path(root)
        self.run = run
        self._dirsync: dict[str, safeio.GroupSync] = {}

    # -- layout -----------------------------------------------------------------------------
    def _dir(self, state: str) -> Path:
        return self.root / "queue" / state

    def entry_path(self, qid: str, state: str) -> Path:
        return self._dir(state) / qid

    def message_path(self, qid: str) -> Path:
        return self.root / "msg" / qid

    def _sync(self, *dirs: Path) -> None:
        """Group-committed fsync of each directory, all in parallel."""
        syncers = []
        for d in dirs:
            key = str(d)
            if key not in self._dirsync:
                self._dirsync[key] = safeio.GroupSync(d, self.run)
            syncers.append(self._dirsync[key])
        if len(syncers) == 1:
            syncers[0].sync()
            return
        others = [gevent.spawn(s.sync) for s in syncers[1:]]
        try:
            syncers[0].sync()
        finally:
            gevent.joinall(others)
        for g in others:
            if g.exception is not None:
                raise g.exception

    def setup(self) -> None:
        for sub in ["tmp", "msg", *(f"queue/{s}" for s in STATES)]:
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- accepting --------------------------------------------------------------------------
    def open_message(self, qid: str | None = None) -> MessageWriter:
        return MessageWriter(self, qid or new_id())

    def commit(self, writer: MessageWriter, envelope: Envelope) -> None:
        """Make the message durable in queue/incoming/. Returns only when it is on disk.

        The message and the envelope are written and fsynced in parallel; the envelope is
        renamed into incoming/ only after the message is in msg/, and both directories are
        fsynced (group commit) before this returns. Raises SpoolError, leaving nothing behind.
        """
        qid = envelope.id
        tmp_env = self.root / "tmp" / f"{qid}.env"
        final_env = self.entry_path(qid, "incoming")
        msg_job = gevent.spawn(self.run, writer.finish)
        try:
            try:
                self.run(self._write_tmp, tmp_env, envelope.to_json())
            finally:
                msg_job.join()
            if msg_job.exception is not None:
                raise msg_job.exception
            if not safeio.move(tmp_env, final_env):
                raise FileNotFoundError(2, "envelope vanished before commit", str(tmp_env))
            self._sync(self.message_path(qid).parent, final_env.parent)
        except BaseException as exc:  # nothing half-committed may stay behind
            writer.abort()
            safeio.unlink_quietly(tmp_env)
            safeio.unlink_quietly(final_env)
            safeio.unlink_quietly(self.message_path(qid))
            if isinstance(exc, OSError):
                raise _storage_error(exc) from None
            raise

    @staticmethod
    def _write_tmp(path: Path, data: bytes) -> None:
        fd = safeio.create(path)
        try:
            safeio.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the queue manager's side -----------------------------------------------------------
    def claim(self, qid: str, state: str = "incoming") -> bool:
        """Take an entry for delivery. Exactly one caller (in any process) gets True."""
        return safeio.move(self.entry_path(qid, state), self.entry_path(qid, "active"))

    def load(self, qid: str, state: str = "active") -> Envelope:
        return Envelope.from_json(self.entry_path(qid, state).read_bytes())

    def _rewrite(self, envelope: Envelope, state: str, mtime: float | None = None) -> None:
        tmp = self.root / "tmp" / f"{envelope.id}.env"
        self.run(safeio.write_file, tmp, self.entry_path(envelope.id, state), envelope.to_json(), mtime)

    def update(self, envelope: Envelope) -> None:
        """Replace the active envelope (per-recipient progress) atomically."""
        self._rewrite(envelope, "active")
        self._sync(self._dir("active"))

    def move(self, qid: str, src: str, dst: str, when: float | None = None) -> bool:
        """Move an entry between states (hold, release, corrupt...); `when` sets the mtime."""
        path = self.entry_path(qid, src)
        if when is not None:
            try:
                os.utime(path, (when, when))
            except FileNotFoundError:
                return False
        if not safeio.move(path, self.entry_path(qid, dst)):
            return False
        self._sync(self._dir(src), self._dir(dst))
        return True

    def defer(self, envelope: Envelope, next_attempt: float) -> None:
        """Save progress and park the entry in deferred/ until `next_attempt` (its mtime)."""
        self._rewrite(envelope, "active", mtime=next_attempt)
        safeio.move(self.entry_path(envelope.id, "active"), self.entry_path(envelope.id, "deferred"))
        self._sync(self._dir("active"), self._dir("deferred"))

    def done(self, qid: str) -> None:
        """Delivery finished: the envelope goes first, so no envelope points at a lost message."""
        safeio.unlink_quietly(self.entry_path(qid, "active"))
        self._sync(self._dir("active"))
        safeio.unlink_quietly(self.message_path(qid))

    def ids(self, state: str) -> list[str]:
        try:
            names = os.listdir(self._dir(state))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if valid_id(n))

    def due(self, now: float, deferred: bool = True) -> Iterator[tuple[str, str]]:
        """(id, state) of every entry ready for an attempt: all of incoming/, then (if asked)
        the deferred/ entries whose mtime has passed, oldest first."""
        for qid in self.ids("incoming"):
            yield qid, "incoming"
        if not deferred:
            return
        deferred_dir = self._dir("deferred")
        for qid in self.ids("deferred"):
            try:
                if os.stat(deferred_dir / qid).st_mtime <= now:
                    yield qid, "deferred"
            except FileNotFoundError:
                continue

    def entries(self, states: tuple[str, ...] = STATES) -> Iterator[tuple[str, Envelope | None, os.stat_result]]:
        """(state, envelope or None if unreadable, stat) for every entry; for inspection."""
        for state in states:
            d = self._dir(state)
            for qid in self.ids(state):
                try:
                    st = os.stat(d / qid)
                    env = Envelope.from_json((d / qid).read_bytes())
                except FileNotFoundError:
                    continue
                except (ValueError, TypeError, KeyError):
                    env = None
                yield state, env, st

    # -- start-up ---------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Repair after a crash; run once before accepting or delivering. Returns the ids
        taken back from active/ (their delivery may have been under way)."""
        self.setup()
        for name in os.listdir(self.root / "tmp"):
            safeio.unlink_quietly(self.root / "tmp" / name)
        recovered = []
        for qid in self.ids("active"):
            if safeio.move(self.entry_path(qid, "active"), self.entry_path(qid, "incoming")):
                recovered.append(qid)
        known: set[str] = set()
        for state in STATES:
            for qid in self.ids(state):
                known.add(qid)
                if state != "corrupt" and not self.message_path(qid).exists():
                    # never acknowledged: 250 is sent only after both renames are durable
                    logger.warning("spool: {} has no message file; moved to corrupt/", qid)
                    safeio.move(self.entry_path(qid, state), self.entry_path(qid, "corrupt"))
        for name in os.listdir(self.root / "msg"):
            if name not in known:  # a commit that died before its envelope was renamed
                safeio.unlink_quietly(self.root / "msg" / name)
        for sub in ["tmp", "msg", *(f"queue/{s}" for s in STATES)]:
            safeio.fsync_path(self.root / sub)
        if recovered:
            logger.info("spool: {} entries recovered from active/", len(recovered))
        return recovered
