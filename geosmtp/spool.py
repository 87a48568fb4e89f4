"""The durable mail queue: a directory tree where every state change is one atomic rename.

    msg/<id>              the message file: one line of envelope JSON, then the message as
                          received (our Received: header first); written once
    queue/incoming/<id>   the queue entry; linking it into incoming/ is the commit point
    queue/active/<id>     claimed for delivery: the rename incoming→active is the lock
    queue/deferred/<id>   waiting to retry; the file's mtime is the time of the next attempt
    queue/hold/<id>       held by the operator
    queue/corrupt/<id>    unreadable entries, kept for a person
    tmp/                  envelope rewrites in progress; swept at start-up
    spare/<slot>          delivered messages' files, emptied, for new messages to take
                          (geosmtp.spares: no inode freed and allocated per message)

The first line of a queue entry is always the envelope. At arrival the entry is a second
name (a hard link) for the message file itself, so a message costs one new file; when
delivery progress must be saved, the entry is replaced by a small envelope file (written in
tmp/, renamed over it). A message too big to hold in memory is streamed to msg/ during DATA
behind a placeholder line and gets a separate envelope file at commit.

Nothing is fsynced file by file. Every change waits for a round of the group commit
(geosmtp.groupcommit): one syncfs() of the spool's filesystem, shared by all the changes
in flight. A new message's entry is made before the flush, with its content: the envelope
records the length of what follows it, so that recover() can tell (and remove) an entry
whose name a crash kept without all of its content, one never acknowledged. Where a name
must not exist before what it names is durable (a renamed envelope over an entry that was
durable, so that a crash could lose both), the name is made in the round's job right
after the flush, and the next round makes it durable.

No locks between entries: exactly one claimer wins a rename, so a master and its workers
share the spool. One lock for the whole spool (lock_spool) keeps a second geosmtp, and the
start-up recovery, away while any process of a running one lives. Disk
work runs through `run` (the server passes gevent's threadpool) so the hub never waits on it.
"""
from __future__ import annotations

import fcntl
import heapq
import json
import os
import random
import time
from functools import partial
from typing import BinaryIO, Callable, Iterator, Sequence

from loguru import logger

from geosmtp import groupcommit, handlers, safeio
from geosmtp.batches import Batches
from geosmtp.envelope import Envelope
from geosmtp.groupcommit import GroupCommit, Method
from geosmtp.spares import Spares

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
COMMITTED_TO = ("incoming", "hold")  # where commit() makes entries (recover() checks them)
SPILL_SIZE = 128 * 1024  # a message bigger than this goes to disk while DATA is still arriving
MAX_ENVELOPE = 8 * 1024 * 1024  # an envelope line longer than this is corrupt
# room left in a checked message's envelope line for what the checks add (an
# Authentication-Results field, a quarantine reason) without a second file
ENVELOPE_ROOM = 1536


class SpoolError(Exception):
    """The message could not be stored; `full` tells a full disk from any other failure."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


def _storage_error(exc: OSError) -> SpoolError:
    return SpoolError(f"{exc.strerror or exc}", full=exc.errno in safeio.FULL_ERRNOS)


def _direct(fn, *args):
    return fn(*args)


_rng = random.Random()  # seeded from os.urandom; the random module reseeds it after fork()


def _in_order(steps: list[Callable[[], None]]) -> None:
    for step in steps:
        step()


def new_id() -> str:
    """Sortable by arrival time, unique across processes and hosts, safe as a file name."""
    return f"{time.time_ns() // 1000:013X}{_rng.getrandbits(40):010X}"


def id_time(qid: str) -> float | None:
    """The arrival time new_id() put in front of an id (microseconds, 13 hex digits)."""
    try:
        return int(qid[:13], 16) / 1e6
    except ValueError:
        return None


def placeholder(qid: str) -> bytes:
    """The first line of a message streamed to msg/ before its envelope was known. It names
    the id, so that recovery tells a reused file's old first line from it (before: "{}")."""
    return b'{"placeholder":"%s"}\n' % qid.encode("ascii")


def _first_line(line: bytes) -> dict | None:
    """A message file's first line as a JSON object, None when it is not one."""
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def _named(raw: dict | None) -> str | None:
    """The id a first line names: an envelope's, or a placeholder's; None for an older
    placeholder ("{}") or a line that is neither."""
    named = (raw or {}).get("placeholder", (raw or {}).get("id"))
    return named if isinstance(named, str) else None


def valid_id(qid: str) -> bool:
    return 16 <= len(qid) <= 40 and qid.isalnum() and qid.isascii()


SORT_SLICE = 10_000  # names one sorted() call orders (~3 ms)


def sorted_gently(names: list[str]) -> list[str]:
    """sorted(names) for a thread that must not starve the hub: one sorted() call holds the
    GIL throughout (30 ms for 100,000 names), so slices are sorted apart and merged by
    heapq.merge, which is Python code and gives the GIL up every few ms."""
    if len(names) <= SORT_SLICE:
        return sorted(names)
    runs = [sorted(names[i:i + SORT_SLICE]) for i in range(0, len(names), SORT_SLICE)]
    return list(heapq.merge(*runs))


class MessageWriter:
    """Receives the message bytes for one id; small messages stay in memory until commit."""

    def __init__(self, spool: Spool, qid: str):
        self.spool = spool
        self.id = qid
        self.size = 0
        self._parts: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self.error: OSError | None = None
        self.kept: bytes | None = None  # a small message's octets, once kept (keep) or finished
        self.stored = 0  # the file's octets after its first line, once finished
        self.finished = False

    @property
    def spilled(self) -> bool:
        return self._fd is not None

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
        try:
            self.spool.run(self._append, self._take())
        except OSError as exc:  # remembered; reported at commit, after the client's data ends
            self.error = exc

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = self.spool.create_message(self.id)
            data = placeholder(self.id) + data
        safeio.write_all(self._fd, data)

    def keep(self) -> None:
        """A small message's octets joined into `kept` before finish() (what an end-of-data
        check reads while the file is not yet written)."""
        if self._fd is None and self.kept is None:
            self.kept = self._take()
            self._parts.append(self.kept)

    def finish(self, first_line: bytes) -> None:
        """Write what is left and close; no fsync: the spool's group commit flushes the file
        before anything names it. `first_line` (the envelope) is used only if nothing was
        written yet. Runs off the hub."""
        if self.error is not None:
            raise self.error
        if self._fd is None:
            self._fd = self.spool.create_message(self.id)
            self.kept = self._take()  # what an end-of-data check reads, without opening the file
            data = first_line + self.kept
        else:
            data = self._take()
        fd, self._fd = self._fd, None
        try:
            safeio.write_all(fd, data)
        finally:
            os.close(fd)
        self.stored = self.size
        self.finished = True

    def overwrite_first_line(self, first_line: bytes) -> None:
        """After finish(): `first_line` written over the first line, of the same length."""
        fd = os.open(self.spool.message_path(self.id), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, first_line, 0)
        finally:
            os.close(fd)

    def replace(self, edit: Callable[[BinaryIO, int], None]) -> None:
        """After finish(): the message file replaced by what edit(source after the first
        line, destination) writes, the first line kept. Unpublished still: the commit's
        flush covers the new file and its name."""
        path = self.spool.message_path(self.id)
        with open(path, "rb") as src, safeio.atomic_write(f"{path}.edit", path) as dst:
            line = src.readline(MAX_ENVELOPE)
            safeio.write_all(dst, line)
            edit(src, dst)
            self.stored = os.fstat(dst).st_size - len(line)
        self.kept = None  # what was kept is not the message any more

    def abort(self) -> None:
        self._parts.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        safeio.unlink_quietly(self.spool.message_path(self.id))


class _Gone(Exception):
    """The entry an envelope rewrite was for is no longer there (an operator's delete)."""


class Spool:
    def __init__(self, root: str | os.PathLike, run: Callable = _direct, flush: Method = "syncfs"):
        self.root = os.fspath(root)
        self.run = run
        self._dirs = {state: os.path.join(self.root, "queue", state) for state in STATES}
        self._msg = os.path.join(self.root, "msg")
        self._tmp = os.path.join(self.root, "tmp")
        self.spares = Spares(os.path.join(self.root, "spare"))  # delivered messages' files, emptied
        self.commits = GroupCommit(self.root, run, flush)  # the flushes every change waits for
        # finished deliveries' entries, removed a batch at a time (done)
        self._removals = Batches(run, self._remove_entries, after=self._removed)

    # -- layout -----------------------------------------------------------------------------
    def entry_path(self, qid: str, state: str) -> str:
        return f"{self._dirs[state]}/{qid}"

    def message_path(self, qid: str) -> str:
        return f"{self._msg}/{qid}"

    def _tmp_path(self, qid: str) -> str:
        return f"{self._tmp}/{qid}.{os.getpid()}"

    def create_message(self, qid: str) -> int:
        """A new message's file in msg/, open for writing: a spare if there is one."""
        path = self.message_path(qid)
        fd = self.spares.take(path)
        return fd if fd is not None else safeio.create(path)

    def _drop_message(self, qid: str) -> None:
        """A delivered message's file kept as a spare, or unlinked."""
        path = self.message_path(qid)
        if not self.spares.keep(path):
            safeio.unlink_quietly(path)

    def setup(self) -> None:
        for d in [self._tmp, self._msg, self.spares.dir, *self._dirs.values()]:
            os.makedirs(d, mode=0o700, exist_ok=True)

    # -- accepting --------------------------------------------------------------------------
    def open_message(self, qid: str | None = None) -> MessageWriter:
        return MessageWriter(self, qid or new_id())

    def commit(self, writer: MessageWriter, envelope: Envelope, hold: bool = False,
               check: Callable[[str], bool] | None = None) -> None:
        """Make the message durable in queue/incoming/ (or hold/). Returns only when on disk.

        In one group-commit round (geosmtp.groupcommit), shared by every commit in flight:
        the message file (its first line the envelope) is finished in msg/, linked into
        incoming/ (the commit point), and one flush makes both durable. The entry's name may
        thus reach the disk before its content does, but only for a message not yet
        acknowledged: its envelope records the octets that follow it (`stored`), and
        recover() removes an entry a crash cut short (_cut_short). One flush a message, not
        two (a flush, the link, a flush), is what a lone client waits for.

        With `check`, check(file) runs before the flush (the end-of-data checks reading the
        whole message; file() gives the path of the finished message file): if it raises,
        nothing is queued and the exception goes on to the caller; it may change the
        envelope (fields to add in front, a quarantine reason) and returns True to put the
        message in hold/. A small message is checked in memory (writer.kept) and then
        committed as without a check, in one round. Once written (spilled, or file() asked
        for, or rewritten by a check) the message has its envelope line padded (JSON allows
        the white space), so a changed envelope that fits is written over the first line;
        one that does not fit (or a spilled message's, which begins with a placeholder) gets
        its own entry file.
        Raises SpoolError for a storage failure (a failed flush included), leaving nothing
        behind either way.
        """
        qid = envelope.id
        envelope.stored = writer.size  # what finish() will have written after the first line
        line = envelope.to_line()
        entry = ""
        # what the flush covers with the "fsync" method: the files written, and the
        # directories whose names must be durable (the msg/ name of a message whose entry
        # is the file itself may wait: recover() puts a lost one back from the entry)
        files, dirs = [self.message_path(qid)], []
        try:
            padded = spilled = None
            if check is not None:
                padded, spilled = line[:-1] + b" " * ENVELOPE_ROOM + b"\n", writer.spilled
                hold = self._check(writer, padded, check) or hold
                if not writer.finished:  # a changed envelope costs nothing: it is not written yet
                    line = envelope.to_line()
            entry = self._entry_for(qid, hold)
            if not writer.finished:
                steps = [partial(writer.finish, line)]
                if writer.spilled:  # the file begins with a placeholder: its own entry file
                    steps.append(self._entry_file(qid, line, entry, files, dirs))
                else:
                    steps.append(self._link(qid, entry))
            else:  # written before the check finished (spilled, asked for, or rewritten)
                steps = self._publish_written(writer, envelope, line, padded, spilled, entry, files, dirs)
            self.commits.flush(partial(_in_order, steps), None, files, [os.path.dirname(entry), *dirs])
        except Exception as exc:  # nothing half-committed may stay behind
            self._discard(writer, entry)
            if isinstance(exc, OSError):
                raise _storage_error(exc) from None
            raise
        # A kill (GreenletExit at shutdown) leaves the round to finish in its thread; the
        # files are then either committed (the client, with no 250, may send again: a
        # duplicate, never a loss) or removed by recover() at the next start.

    def _check(self, writer: MessageWriter, padded: bytes, check: Callable) -> bool:
        """A commit's check: a spilled message is finished first (its file is the only copy),
        a small one is checked in memory and written only if the check asks for its file."""
        if writer.spilled:
            self.run(writer.finish, padded)
        else:
            writer.keep()
        return check(partial(self._written, writer, padded))

    def _publish_written(self, writer: MessageWriter, envelope: Envelope, line: bytes, padded: bytes,
                         spilled: bool, entry: str, files: list[str], dirs: list[str]) -> list[Callable[[], None]]:
        """The round's steps for a message written before its check ended: the envelope
        over its padded first line when it fits (or unchanged), else an entry file."""
        envelope.stored = writer.stored  # a check may have rewritten the message
        published = envelope.to_line()
        if spilled or len(published) > len(padded):
            return [self._entry_file(envelope.id, published, entry, files, dirs)]
        steps = [self._link(envelope.id, entry)]
        if published != line:  # rewritten in place, the same length
            steps.insert(0, partial(writer.overwrite_first_line, published[:-1].ljust(len(padded) - 1) + b"\n"))
        return steps

    def _discard(self, writer: MessageWriter, entry: str) -> None:
        """What a failed commit left: the message, a spilled message's entry file in tmp/
        if it got that far, the entry if it was made."""
        for clean_up in (writer.abort, partial(safeio.unlink_quietly, self._tmp_path(writer.id)),
                         lambda: safeio.unlink_quietly(entry) if entry else None):
            try:
                clean_up()
            except OSError:  # a failing clean-up must not hide why the commit failed
                pass

    def _entry_for(self, qid: str, hold: bool) -> str:
        return self.entry_path(qid, "hold" if hold else "incoming")

    def _link(self, qid: str, entry: str) -> Callable[[], None]:
        """The commit point of a message whose entry is the message file itself."""
        return partial(safeio.link, self.message_path(qid), entry)

    def _entry_file(self, qid: str, line: bytes, entry: str, files: list[str],
                    dirs: list[str]) -> Callable[[], None]:
        """An entry of its own: written in tmp/ and renamed into place. Adds what the
        "fsync" method must then flush: that file, and msg/ (the message file no longer has
        the entry's name to be found by)."""
        tmp = self._tmp_path(qid)
        files.append(entry)
        dirs.append(self._msg)
        return partial(_in_order, [partial(safeio.write_unsynced, tmp, line), partial(os.rename, tmp, entry)])

    def _written(self, writer: MessageWriter, first_line: bytes) -> str:
        """The path of the message file of a commit's check, written now if it was not."""
        if not writer.finished:
            self.run(writer.finish, first_line)
        return self.message_path(writer.id)

    def rewrite_message(self, writer: MessageWriter, file: Callable[[], str],
                        edit: Callable[[BinaryIO, int], None]) -> None:
        """Replace an unpublished message file (a check removing header fields), written
        first if it was not (file(), the commit's): edit(source positioned after its first
        line, destination descriptor) writes the new message; the first line is kept. Off
        the hub (MessageWriter.replace)."""
        file()
        self.run(writer.replace, edit)

    # -- the queue manager's side -----------------------------------------------------------
    def claim(self, qid: str, state: str = "incoming") -> bool:
        """Take an entry for delivery. Exactly one caller (in any process) gets True."""
        return safeio.move(self.entry_path(qid, state), self.entry_path(qid, "active"))

    def load(self, qid: str, state: str = "active") -> Envelope:
        with open(self.entry_path(qid, state), "rb") as fh:
            return Envelope.from_line(fh.readline(MAX_ENVELOPE))

    def open_body(self, qid: str) -> BinaryIO:
        """The message (our Received: first), positioned after the envelope line."""
        fh = open(self.message_path(qid), "rb")
        try:
            if not fh.readline(MAX_ENVELOPE).endswith(b"\n"):
                raise ValueError(f"message {qid} has no envelope line")
        except BaseException:
            fh.close()
            raise
        return fh

    def _replace_entry(self, envelope: Envelope, state: str, mtime: float | None = None,
                       then_to: str | None = None) -> bool:
        """The entry's envelope replaced atomically: the new one written in tmp/, flushed,
        renamed over the entry (and the entry moved to `then_to`), flushed again. False
        when the entry is gone (deleted by an operator meanwhile)."""
        path = self.entry_path(envelope.id, state)
        tmp = self._tmp_path(envelope.id)

        def prepare() -> None:
            try:
                linked = os.stat(path).st_nlink > 1
            except FileNotFoundError:
                raise _Gone() from None
            if linked and self.commits.method == "fsync":
                # the entry is still the message file, whose msg/ name that method left
                # unsynced: make it durable before the rename drops this name (a syncfs
                # before the rename covers it)
                groupcommit.fsync_path(self._msg, data_only=True)
            safeio.write_unsynced(tmp, envelope.to_line(), mtime)

        def swap() -> None:
            if not os.path.exists(path):  # deleted while the new envelope was flushed
                safeio.unlink_quietly(tmp)
                raise _Gone()
            os.rename(tmp, path)
            if then_to is not None:
                safeio.move(path, self.entry_path(envelope.id, then_to))

        dirs = [os.path.dirname(path)] + ([self._dirs[then_to]] if then_to else [])
        try:
            self.commits.flush(prepare, swap, (tmp,), dirs)
        except _Gone:
            return False
        except BaseException:
            safeio.unlink_quietly(tmp)  # the old entry stays, as it was
            raise
        return True

    def update(self, envelope: Envelope) -> bool:
        """Replace the active entry's envelope (per-recipient progress) atomically.
        False when the entry is gone (deleted by an operator meanwhile)."""
        return self._replace_entry(envelope, "active")

    def defer(self, envelope: Envelope, next_attempt: float) -> bool:
        """Save progress and park the entry in deferred/ until `next_attempt` (its mtime).
        False when the entry is gone (deleted by an operator meanwhile)."""
        return self._replace_entry(envelope, "active", next_attempt, "deferred")

    def move(self, qid: str, src: str, dst: str, when: float | None = None) -> bool:
        """Move an entry between states (hold, release, corrupt...); `when` sets the mtime."""
        path = self.entry_path(qid, src)
        if when is not None:
            try:
                os.utime(path, (when, when))
            except FileNotFoundError:
                return False
        moved = self.entry_path(qid, dst)
        if not safeio.move(path, moved):
            return False
        self.commits.flush(files=(moved,) if when is not None else (), dirs=(self._dirs[src], self._dirs[dst]))
        return True

    def done(self, qid: str) -> None:
        """Delivery finished: both names go, and the caller waits for nothing.

        The removals of every delivery finishing meanwhile are one threadpool job. An entry
        that is the message file itself goes with it at once, unflushed: a crash that keeps
        either name keeps all of the message, which is then delivered again or swept by
        recover(), as after a crash just before done(). An entry of its own goes first, and
        the message once that removal is durable, so that no entry points at a lost
        message (a message file left by a crash or a failed flush meanwhile is swept by
        recover()). settle() waits for what is under way (a clean stop)."""
        self._removals.post(qid)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the removals done() started are made; whether they were, in time."""
        return self._removals.settle(timeout)

    def _remove_entries(self, qids: Sequence[str]) -> list[tuple[bool, object]]:
        """In a thread: each entry removed, and its message with it when the entry is the
        message file; per entry (True, whether its message is left to remove) or (False,
        the error)."""
        out: list[tuple[bool, object]] = []
        for qid in qids:
            try:
                try:  # the message file has a second name when it is the entry
                    combined = os.stat(self.message_path(qid)).st_nlink > 1
                except FileNotFoundError:
                    combined = True  # deleted meanwhile: nothing left to wait for
                safeio.unlink_quietly(self.entry_path(qid, "active"))
                if combined:
                    self._drop_message(qid)
                out.append((True, not combined))
            except OSError as exc:
                out.append((False, exc))
        return out

    def _removed(self, qids: Sequence[str], outcomes: list[tuple[bool, object]]) -> None:
        left = []
        for qid, (ok, value) in zip(qids, outcomes):
            if not ok:  # the entry stays in active/: delivered again after a restart
                logger.error("spool: cannot remove the delivered entry {}: {}", qid, value)
            elif value:
                left.append(qid)
        if left:
            handlers.spawn(self._remove_messages, left)

    def _remove_messages(self, qids: list[str]) -> None:
        try:
            self.commits.flush(dirs=(self._dirs["active"],))
        except OSError:
            return  # logged by the flush; recover() sweeps the messages at the next start
        try:
            self.run(_in_order, [partial(self._drop_message, qid) for qid in qids])
        except OSError as exc:
            logger.error("spool: cannot remove delivered messages: {}", exc)

    def _names(self, state: str) -> list[str]:
        """The ids in a state's directory, in no order. Runs off the hub: a listing of
        100,000 names takes 50 ms."""
        try:
            names = os.listdir(self._dirs[state])
        except FileNotFoundError:
            return []
        return [n for n in names if valid_id(n)]

    def ids(self, state: str) -> list[str]:
        """The ids in a state, oldest first. Runs off the hub."""
        return sorted_gently(self._names(state))

    def settled_ids(self, state: str, before: float) -> list[str]:
        """The ids in a state whose entry was put there (its ctime: a link or a rename sets
        it, where a message file linked in may be older by its checks' time) before `before`,
        or is dated more than a second ahead (a flushed deferred entry keeps its next attempt
        as its mtime), oldest first. An entry put there since may belong to a commit whose
        flush has not ended: it is not the queue's until its committer says so. Runs off the
        hub (a stat each)."""
        settled = []
        for qid in self._names(state):
            try:
                st = os.stat(self.entry_path(qid, state))
            except FileNotFoundError:
                continue
            if st.st_ctime < before or st.st_mtime > time.time() + 1.0:
                settled.append(qid)
        return sorted_gently(settled)

    def deferred_times(self) -> dict[str, float]:
        """The next attempt (mtime) of every deferred/ entry, by id: what the queue manager
        builds its schedule from. Runs off the hub (a stat an entry: ~5 us each). A dict of
        strings and floats, which the garbage collector does not track: 100,000 tuples would
        make it walk the whole heap, holding the GIL, once they got old."""
        found = {}
        for qid in self._names("deferred"):
            try:
                found[qid] = os.stat(self.entry_path(qid, "deferred")).st_mtime
            except FileNotFoundError:
                continue
        return found

    def entries(self, states: tuple[str, ...] = STATES) -> Iterator[tuple[str, Envelope | None, os.stat_result]]:
        """(state, envelope or None if unreadable, stat) for every entry; for inspection."""
        for state in states:
            for qid in self.ids(state):
                try:
                    st = os.stat(self.entry_path(qid, state))
                    env = self.load(qid, state)
                except FileNotFoundError:
                    continue
                except (ValueError, TypeError, KeyError):
                    env = None
                yield state, env, st

    # -- the operator's side (geosmtp-queue) ------------------------------------------------
    # Safe while the server runs: every change is a rename or an unlink, and an entry the
    # queue manager may claim (incoming/, deferred/) is first taken to hold/ by rename before
    # its envelope is rewritten. An entry in active/ belongs to the delivery under way; only
    # delete() touches it.
    LOOKUP_ORDER = ("hold", "corrupt", "incoming", "deferred", "active")

    def locate(self, qid: str) -> str | None:
        """The state the entry of `qid` is in, or None (no such id, or delivered meanwhile).

        Entries move while we look (incoming→active, deferred→active, active→deferred): the
        states are looked at in the order entries flow, and the search is repeated a few
        times while msg/<id> exists but no entry was seen in passing."""
        if not valid_id(qid):
            return None
        for _ in range(3):
            for state in self.LOOKUP_ORDER:
                if os.path.lexists(self.entry_path(qid, state)):
                    return state
            if not os.path.lexists(self.message_path(qid)):
                return None
        return None

    def still_message(self, fh: BinaryIO, qid: str) -> bool:
        """After reading from open_body(qid): whether the file was that message throughout.
        A delivered message's file is emptied and then renamed into spare/ (geosmtp.spares),
        so one that still has its name and octets was not touched while it was read."""
        st = os.fstat(fh.fileno())
        try:
            return st.st_size > 0 and os.path.samestat(st, os.stat(self.message_path(qid)))
        except FileNotFoundError:
            return False

    def drop_stale(self, qid: str, state: str) -> None:
        """An entry whose file is another message's now (a name a crash kept for a file
        that became a spare and was taken): its names go, msg/<id> too when it is that
        file; the file stays under the other message's names."""
        entry = self.entry_path(qid, state)
        try:
            same = os.path.samefile(entry, self.message_path(qid))
        except FileNotFoundError:
            same = False
        safeio.unlink_quietly(entry)
        if same:
            safeio.unlink_quietly(self.message_path(qid))

    def delete(self, qid: str, state: str) -> bool:
        """Remove an entry and its message, in any state; the entry first, like done(), so
        no entry ever points at a missing message. False when the entry is not in `state`.

        An active entry's delivery goes on to the end of its attempt, then finds the entry
        gone (update() and defer() return False) and leaves it so."""
        try:
            os.unlink(self.entry_path(qid, state))
        except FileNotFoundError:
            return False
        self.commits.flush(dirs=(self._dirs[state],))
        safeio.unlink_quietly(self.message_path(qid))
        return True

    def rewrite(self, envelope: Envelope, state: str = "hold") -> bool:
        """Replace the envelope of an entry in hold/ or corrupt/ (where the queue manager
        never looks) atomically, as _rewrite does for active/. Take an entry to hold/ with
        move() first. False when the entry is not there."""
        if state not in ("hold", "corrupt"):
            raise ValueError(f"rewrite() is for entries in hold/ or corrupt/, not {state}/")
        return self._replace_entry(envelope, state)

    # -- start-up ---------------------------------------------------------------------------
    def _restore_message(self, qid: str, state: str) -> None:
        """An entry whose msg/ name was lost in a crash. If the entry is the message file
        itself (more than its envelope line), link it back; otherwise the message is gone,
        which means it was never acknowledged (its 250 waits for both names to be durable)."""
        entry = self.entry_path(qid, state)
        with open(entry, "rb") as fh:
            fh.readline(MAX_ENVELOPE)
            combined = fh.read(1) != b""
        if combined:
            safeio.link(entry, self.message_path(qid))
            logger.warning("spool: {} lost its msg/ name in a crash; restored", qid)
        else:
            logger.warning("spool: {} has no message file; moved to corrupt/", qid)
            safeio.move(entry, self.entry_path(qid, "corrupt"))

    def _cut_short(self, qid: str, state: str, has_message: bool) -> bool:
        """Whether the entry is a commit a crash cut short, which is then removed: its name
        reached the disk, its content not all of it (commit() makes both in one flush, and
        acknowledges the message only after it). The envelope records the octets that
        follow the message file's first line; a file shorter or longer, or an entry whose
        first line is not whole (an empty one too), was never acknowledged. An entry from
        before `stored` was recorded, or whose line is whole but unreadable (the queue
        manager parks that in corrupt/ for a person), is left as it is."""
        entry = self.entry_path(qid, state)
        with open(entry, "rb") as fh:
            line = fh.readline(MAX_ENVELOPE)
            entry_size = os.fstat(fh.fileno()).st_size
        whole = line.endswith(b"\n")
        raw = _first_line(line) if whole else None
        if raw is not None and (raw == {} or "placeholder" in raw or _named(raw) not in (qid, None)):
            # a reused file's old first line (another message's envelope or placeholder;
            # an entry never begins with a placeholder): its new content never got there
            whole = False
        elif whole:
            try:
                envelope = Envelope.from_line(line)
            except (ValueError, TypeError, KeyError):
                return False
            if envelope.stored is None:
                return False
            if entry_size > len(line):  # the entry is the message file itself
                whole = entry_size - len(line) == envelope.stored
            elif has_message:  # an entry file of its own: the message is msg/<id>
                with open(self.message_path(qid), "rb") as fh:
                    first = fh.readline(MAX_ENVELOPE)
                    whole = (os.fstat(fh.fileno()).st_size - len(first) == envelope.stored
                             and _named(_first_line(first)) in (qid, None))
        if whole:
            return False
        logger.warning("spool: {} in {}/ was cut short by a crash before its commit was flushed "
                       "(never acknowledged); removed", qid, state)
        safeio.unlink_quietly(entry)
        safeio.unlink_quietly(self.message_path(qid))
        return True

    def recover(self) -> list[str]:
        """Repair after a crash; run once before accepting or delivering. Returns the ids
        taken back from active/ (their delivery may have been under way).

        The walk (every entry of every state, and msg/) runs through `run`, off the hub; it
        is plain thread-safe code, so calling recover() itself in a thread is fine too."""
        return self.run(self._recover)

    def _recover(self) -> list[str]:
        self.setup()
        self.spares.clear()  # before anything takes one: one a crash left unemptied goes too
        for name in os.listdir(self._tmp):
            safeio.unlink_quietly(f"{self._tmp}/{name}")
        recovered = []
        for qid in self.ids("active"):
            if safeio.move(self.entry_path(qid, "active"), self.entry_path(qid, "incoming")):
                recovered.append(qid)
        # one listing of msg/ rather than a stat per entry: seconds at a million entries
        messages = set(os.listdir(self._msg))
        known: set[str] = set()
        for state in STATES:
            for qid in self._names(state):
                if state in COMMITTED_TO and self._cut_short(qid, state, qid in messages):
                    continue
                known.add(qid)
                if state != "corrupt" and qid not in messages:
                    self._restore_message(qid, state)
                    messages.add(qid)  # restored, or its entry moved to corrupt/
        for name in messages - known:  # a commit that died before its entry was linked
            safeio.unlink_quietly(f"{self._msg}/{name}")
        for d in [self._tmp, self._msg, self.spares.dir, *self._dirs.values()]:
            safeio.fsync_path(d)
        if recovered:
            logger.info("spool: {} entries recovered from active/", len(recovered))
        return recovered


# -- the spool lock: one geosmtp per spool, held by every process that writes it --------------
def lock_spool(spool_dir, wait: float = 0.0) -> int:
    """Take the spool's lock for this process and write our pid in it (geosmtp-queue
    signals that pid after it changes the queue). recover() and the queue manager assume
    no other geosmtp works on the spool. Returns the open descriptor, to keep.

    A master passes this descriptor to its workers, so the lock (an flock: it belongs to the
    open file, not to one process) is held until the last of them exits. When the pid in the
    lock is dead but the lock is still held, the processes it left behind (workers finishing
    their sessions) are waited for up to `wait` seconds: recovery never runs beside them.
    A live holder is refused at once."""
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(spool_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    started = time.monotonic()
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        holder = _pid_in(fd)
        orphans = holder is not None and not _alive(holder)
        waited = time.monotonic() - started
        if orphans and not told:
            logger.warning("spool {}: the processes left by geosmtp pid {} (gone) still hold it; "
                           "waiting up to {:g}s for them to finish their sessions", spool_dir, holder, wait)
            told = True
        # lock_holder() holds it shared for an instant: a second is plenty for that
        if waited >= (wait if orphans else 1.0):
            os.close(fd)
            if orphans:
                raise OSError(f"the processes left by geosmtp pid {holder} still hold the spool "
                              f"{spool_dir} after {waited:.0f}s")
            raise OSError(f"another geosmtp{f' (pid {holder})' if holder else ''} is running on the spool {spool_dir}")
        time.sleep(0.05)
    if told:
        logger.info("spool {}: the previous geosmtp's processes are gone after {:.1f}s",
                    spool_dir, time.monotonic() - started)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def held_lock(spool_dir, fd: int) -> int:
    """A worker's check of the lock descriptor its master passed it: the same file as the
    spool's lock (so the worker holds the master's lock for as long as it lives)."""
    st, lock = os.fstat(fd), os.stat(os.path.join(spool_dir, "lock"))
    if (st.st_dev, st.st_ino) != (lock.st_dev, lock.st_ino):
        raise OSError(f"descriptor {fd} is not the lock of the spool {spool_dir}")
    return fd


def lock_holder(spool_dir) -> int | None:
    """The pid of the geosmtp holding the spool's lock (0 if it cannot be read), or None
    when no geosmtp runs on this spool."""
    try:
        fd = os.open(os.path.join(spool_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a server runs
            return _pid_in(fd) or 0
        return None
    finally:
        os.close(fd)  # releases a shared lock taken above
