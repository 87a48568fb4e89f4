"""geosmtp.spool and geosmtp.safeio on a real directory: commit, claim, defer, done, recover.

The layout under test: msg/<id> is one line of envelope JSON followed by the message. A small
message's queue entry is a hard link to that file; a spilled message (streamed to disk during
DATA) starts with the placeholder line and has a separate envelope file as its entry; update()
and defer() replace the entry with a standalone envelope file.

Disk failures are made real where they can be (a `run` or an os/safeio function that raises
ENOSPC or EIO where a full or broken disk would); we run as root, so chmod cannot be used.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp import groupcommit, safeio
from geosmtp import spool as spool_module
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.groupcommit import GroupCommit
from geosmtp.spool import (
    MAX_ENVELOPE,
    SPILL_SIZE,
    STATES,
    MessageWriter,
    Spool,
    SpoolError,
    new_id,
    placeholder,
    valid_id,
)

DATA = b"Received: by us\r\nSubject: x\r\n\r\nhello\r\n"


def make_envelope(qid: str, **kw) -> Envelope:
    return Envelope(
        id=qid,
        created=kw.pop("created", time.time()),
        sender=kw.pop("sender", "sender@remote.test"),
        recipients=kw.pop("recipients", [Recipient("alice@example.test", "alice@example.test")]),
        client=ClientInfo("192.0.2.1", helo="client.test", listener="smtp"),
        **kw,
    )


@pytest.fixture(params=["syncfs", "fsync"])
def spool(tmp_path, request) -> Spool:
    """Every test of a spool runs with both flush methods (geosmtp.groupcommit)."""
    s = Spool(tmp_path / "spool", flush=request.param)
    s.setup()
    return s


def files_under(root: str | Path) -> list[str]:
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def body(spool: Spool, qid: str) -> bytes:
    with spool.open_body(qid) as fh:
        return fh.read()


def big(n: int = 3) -> bytes:
    """Bigger than SPILL_SIZE, written in 4 KiB pieces as DATA would arrive."""
    return (bytes(range(256)) * 16) * (n * SPILL_SIZE // 4096 + 3)


def enqueue(spool: Spool, data: bytes = DATA, qid: str | None = None, hold: bool = False,
            chunk: int = 4096, **kw) -> Envelope:
    writer = spool.open_message(qid)
    for i in range(0, len(data), chunk):
        writer.write(data[i:i + chunk])
    envelope = make_envelope(writer.id, size=len(data), **kw)
    spool.commit(writer, envelope, hold=hold)
    return envelope


def same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# -- ids ----------------------------------------------------------------------------------
def test_new_ids_are_valid_and_unique():
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(valid_id(i) for i in ids)


def test_new_ids_sort_by_time():
    first = new_id()
    start = time.time_ns() // 1000
    for _ in range(1_000_000):  # bounded wait for the microsecond clock to move on
        if time.time_ns() // 1000 > start:
            break
    assert new_id() > first


@pytest.mark.parametrize(
    "qid, ok",
    [
        ("0123456789ABCDEF", True),
        ("A" * 40, True),
        ("A" * 15, False),
        ("A" * 41, False),
        ("", False),
        ("../../etc/passwd", False),
        ("0123456789ABCDE.", False),
        ("0123456789ABCDEF.env", False),
        ("0123456789ABCDEF.4242", False),  # a tmp/ name (id.pid) is never an id
        ("Ä123456789ABCDEF", False),  # isalnum, but not ASCII
        ("0123456789ABCDE\x00", False),
    ],
)
def test_valid_id(qid, ok):
    assert valid_id(qid) is ok


# -- layout -------------------------------------------------------------------------------
def test_setup_makes_the_layout(spool):
    for sub in ["tmp", "msg", *(f"queue/{s}" for s in STATES)]:
        assert (Path(spool.root) / sub).is_dir()


def test_paths_are_strings(tmp_path):
    s = Spool(tmp_path / "spool")  # a Path is accepted, strings come out
    qid = "0123456789ABCDEF"
    assert s.root == str(tmp_path / "spool")
    assert s.message_path(qid) == f"{tmp_path}/spool/msg/{qid}"
    for state in STATES:
        path = s.entry_path(qid, state)
        assert type(path) is str and path == f"{tmp_path}/spool/queue/{state}/{qid}"


# -- commit: a small message is one file with two names -----------------------------------
def test_commit_small_message_is_one_file_linked_into_incoming(spool):
    envelope = enqueue(spool, DATA)
    qid = envelope.id
    msg, entry = spool.message_path(qid), spool.entry_path(qid, "incoming")
    assert files_under(spool.root) == [f"msg/{qid}", f"queue/incoming/{qid}"]
    # DESIGN: the entry is a second name for the message file, not a copy
    assert same_file(msg, entry)
    assert os.stat(msg).st_nlink == 2
    assert read(msg) == envelope.to_line() + DATA
    assert spool.load(qid, "incoming") == envelope
    assert body(spool, qid) == DATA


def test_commit_writes_the_envelope_as_the_first_line(spool):
    envelope = enqueue(spool, sender="ü@bücher.test", smtputf8=True)
    first, _, rest = read(spool.message_path(envelope.id)).partition(b"\n")
    raw = json.loads(first)
    assert raw["sender"] == "ü@bücher.test" and raw["smtputf8"] is True and raw["id"] == envelope.id
    assert rest == DATA


def test_commit_of_an_empty_message(spool):
    envelope = enqueue(spool, b"")
    assert read(spool.message_path(envelope.id)) == envelope.to_line()
    assert body(spool, envelope.id) == b""
    assert spool.load(envelope.id, "incoming") == envelope


def test_message_just_under_the_spill_size_stays_in_memory(spool):
    data = b"x" * (SPILL_SIZE - 1)
    writer = spool.open_message()
    writer.write(data)
    assert not writer.spilled and files_under(spool.root) == []  # nothing on disk during DATA
    envelope = make_envelope(writer.id, size=len(data))
    spool.commit(writer, envelope)
    assert os.stat(spool.message_path(writer.id)).st_nlink == 2
    assert body(spool, writer.id) == data


def test_commit_hold_links_into_hold(spool):
    envelope = enqueue(spool, hold=True)
    qid = envelope.id
    assert files_under(spool.root) == [f"msg/{qid}", f"queue/hold/{qid}"]
    assert same_file(spool.message_path(qid), spool.entry_path(qid, "hold"))
    assert spool.load(qid, "hold") == envelope
    assert spool.ids("incoming") == [] and spool.deferred_times() == {}  # held: never due
    assert spool.claim(qid) is False
    assert spool.move(qid, "hold", "incoming")  # the operator releases it
    assert spool.ids("incoming") == [qid]
    assert spool.claim(qid) and body(spool, qid) == DATA


def test_commit_hold_of_a_spilled_message(spool):
    data = big()
    envelope = enqueue(spool, data, hold=True)
    qid = envelope.id
    assert files_under(spool.root) == [f"msg/{qid}", f"queue/hold/{qid}"]
    assert read(spool.entry_path(qid, "hold")) == envelope.to_line()
    assert spool.load(qid, "hold") == envelope and body(spool, qid) == data


# -- commit: a spilled message has a placeholder line and its own entry ---------------------
def test_commit_large_message_spilled_to_disk(spool):
    data = big()
    writer = spool.open_message()
    for i in range(0, len(data), 4096):
        writer.write(data[i:i + 4096])
    assert writer.spilled  # it went to msg/ while DATA was still arriving
    assert read(spool.message_path(writer.id)).startswith(placeholder(writer.id))
    assert files_under(spool.root) == [f"msg/{writer.id}"]
    envelope = make_envelope(writer.id, size=writer.size)
    spool.commit(writer, envelope)
    qid = writer.id
    msg, entry = spool.message_path(qid), spool.entry_path(qid, "incoming")
    assert writer.size == len(data)
    assert read(msg) == placeholder(qid) + data
    assert read(entry) == envelope.to_line()  # a separate envelope file
    assert not same_file(msg, entry) and os.stat(msg).st_nlink == 1 and os.stat(entry).st_nlink == 1
    assert spool.load(qid, "incoming") == envelope
    assert body(spool, qid) == data
    assert files_under(spool.root) == [f"msg/{qid}", f"queue/incoming/{qid}"]  # nothing in tmp/


def test_message_of_exactly_the_spill_size_is_spilled(spool):
    writer = spool.open_message()
    writer.write(b"y" * SPILL_SIZE)
    assert writer.spilled
    spool.commit(writer, make_envelope(writer.id))
    assert read(spool.message_path(writer.id)) == placeholder(writer.id) + b"y" * SPILL_SIZE
    assert os.stat(spool.message_path(writer.id)).st_nlink == 1


class OffHub:
    """A `run` that records its jobs, and which disk calls were made outside of one.

    DESIGN: disk work runs through `run` (the server passes gevent's threadpool) so the hub
    never waits on it; jobs are few, since every one is a thread hand-off. `yields` makes
    each job give way to the hub first, as a threadpool job does.
    """

    WATCHED = ("open", "write", "pwrite", "fsync", "fdatasync", "link", "rename", "utime")

    def __init__(self, monkeypatch, yields: bool = False):
        self.jobs: list = []
        self.on_hub: list[str] = []
        self.depth = 0
        self.yields = yields
        for name in self.WATCHED:
            monkeypatch.setattr(os, name, self._watch(name, getattr(os, name)))
        monkeypatch.setattr(groupcommit, "syncfs", self._watch("syncfs", groupcommit.syncfs))

    def _watch(self, name, real):
        def call(*args, **kw):
            if self.depth == 0:
                self.on_hub.append(name)
            return real(*args, **kw)

        return call

    def __call__(self, fn, *args):
        self.jobs.append(getattr(fn, "__func__", fn))
        if self.yields:
            gevent.sleep(0)
        self.depth += 1
        try:
            return fn(*args)
        finally:
            self.depth -= 1


def test_spill_goes_through_run(tmp_path, monkeypatch):
    run = OffHub(monkeypatch)
    s = Spool(tmp_path / "spool", run=run)
    s.setup()
    writer = s.open_message()
    writer.write(b"a" * (SPILL_SIZE - 1))
    assert run.jobs == []  # below the spill size nothing touches the disk
    writer.write(b"a")
    assert run.jobs == [MessageWriter._append]
    writer.write(b"b" * SPILL_SIZE)
    assert run.jobs == [MessageWriter._append] * 2
    assert run.on_hub == []
    run.jobs.clear()
    s.commit(writer, make_envelope(writer.id))
    assert run.jobs == [GroupCommit._round]
    assert run.on_hub == []
    assert body(s, writer.id) == b"a" * SPILL_SIZE + b"b" * SPILL_SIZE


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("size", [10, SPILL_SIZE * 2], ids=["small", "spilled"])
def test_commit_does_its_disk_work_off_the_hub_in_few_jobs(tmp_path, monkeypatch, size, hold):
    # DESIGN: few thread hand-offs: a lone commit is one job, the group commit's round:
    # writing, flush, link, flush
    s = Spool(tmp_path / "spool")
    s.setup()
    writer = s.open_message()
    writer.write(b"z" * size)
    run = s.run = s.commits._run = OffHub(monkeypatch)
    s.commit(writer, make_envelope(writer.id), hold=hold)
    assert run.jobs == [GroupCommit._round]
    assert run.on_hub == []


def test_concurrent_commits_do_their_disk_work_off_the_hub(tmp_path, monkeypatch):
    run = OffHub(monkeypatch, yields=True)
    s = Spool(tmp_path / "spool", run=run)
    s.setup()
    jobs = [gevent.spawn(enqueue, s, b"q" * (SPILL_SIZE if i % 3 == 0 else 5)) for i in range(12)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert len(s.ids("incoming")) == 12
    assert run.on_hub == []
    assert len(run.jobs) <= 12 * 2 + 6  # commit jobs, spills, and a few shared flush rounds


def test_abort_leaves_nothing(spool):
    fds = open_fds()
    writer = spool.open_message()
    writer.write(b"x" * (SPILL_SIZE + 10))
    assert writer.spilled
    writer.abort()
    assert files_under(spool.root) == []
    assert open_fds() == fds


def test_abort_of_a_message_still_in_memory(spool):
    writer = spool.open_message()
    writer.write(b"x" * 10)
    writer.abort()
    assert files_under(spool.root) == []


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.binary(max_size=80).map(lambda b: b.replace(b"z", b"\n")),
       chunk=st.integers(min_value=1, max_value=20), spill=st.sampled_from([8, 10**9]))
def test_any_message_comes_back_byte_for_byte(data, chunk, spill):
    # whatever the message (empty, starting with "{" or a newline...) and however it was
    # split, open_body() returns exactly it and load() the envelope
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(spool_module, "SPILL_SIZE", spill):
        s = Spool(tmp)
        s.setup()
        envelope = enqueue(s, data, chunk=chunk)
        assert body(s, envelope.id) == data
        assert s.load(envelope.id, "incoming") == envelope
        linked = os.stat(s.message_path(envelope.id)).st_nlink == 2
        assert linked is (len(data) < spill)


# -- commit failures: an error, and nothing left behind -----------------------------------
def oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


def failing_run(fail_on, err):
    """A `run` that fails the named disk job the way a full or broken disk would."""

    def run(fn, *args):
        if getattr(fn, "__func__", fn) is fail_on:
            raise oserror(err)
        return fn(*args)

    return run


def break_flush(monkeypatch, err: int, nth: int | None = None) -> None:
    """Every flush of the group commit (or only its nth), whichever the method, fails
    with `err`, as a broken or full disk's writeback would."""
    real, calls = GroupCommit._flush, []

    def flush(self, slots, first):
        calls.append(first)
        if nth is None or len(calls) == nth:
            raise oserror(err)
        return real(self, slots, first)

    monkeypatch.setattr(GroupCommit, "_flush", flush)


def fail_nth(n: int, err: int, real):
    """A stand-in for `real` whose n-th call (1-based) fails."""
    calls = []

    def fake(*args, **kw):
        calls.append(args)
        if len(calls) == n:
            raise oserror(err)
        return real(*args, **kw)

    return fake


# (name, applies to small, applies to spilled, how to break it)
FAILURES = [
    # the one flush of the message and its entry
    ("flush", True, True, lambda mp: break_flush(mp, errno.ENOSPC, 1)),
    ("message-write", True, True, lambda mp: mp.setattr(safeio, "write_all", fail_nth(1, errno.ENOSPC, safeio.write_all))),
    ("link", True, False, lambda mp: mp.setattr(safeio, "link", fail_nth(1, errno.ENOSPC, safeio.link))),
    ("entry-write", False, True, lambda mp: mp.setattr(safeio, "write_all", fail_nth(2, errno.ENOSPC, safeio.write_all))),
    ("entry-rename", False, True, lambda mp: mp.setattr(os, "rename", fail_nth(1, errno.ENOSPC, os.rename))),
]
CASES = [
    pytest.param(name, spilled, hold, breaker, id=f"{name}-{'spilled' if spilled else 'small'}{'-hold' if hold else ''}")
    for name, small_ok, spilled_ok, breaker in FAILURES
    for spilled in (False, True)
    if (spilled_ok if spilled else small_ok)
    for hold in (False, True)
]


@pytest.mark.parametrize("name, spilled, hold, breaker", CASES)
def test_failed_commit_leaves_nothing(spool, monkeypatch, name, spilled, hold, breaker):
    spool.commits.flush()  # its descriptor, kept open, is not a leak
    fds = open_fds()
    writer = spool.open_message()
    if spilled:
        writer.write(b"s" * SPILL_SIZE)  # on disk before the failure is armed
        assert writer.spilled
    writer.write(DATA)
    breaker(monkeypatch)
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id), hold=hold)
    monkeypatch.undo()
    assert info.value.full
    assert files_under(spool.root) == []  # nothing in msg/, tmp/ or any queue/ state
    assert open_fds() == fds
    # and the spool goes on working
    envelope = enqueue(spool, hold=hold)
    assert spool.ids("hold" if hold else "incoming") == [envelope.id]
    assert spool.recover() == [] and body(spool, envelope.id) == DATA


@pytest.mark.parametrize(
    "err, full",
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EFBIG, True), (errno.EIO, False), (errno.EROFS, False)],
)
def test_flush_failure_is_a_spool_error(spool, monkeypatch, err, full):
    break_flush(monkeypatch, err)
    writer = spool.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert info.value.full is full
    monkeypatch.undo()
    assert files_under(spool.root) == []


def test_disk_full_while_spilling(tmp_path):
    s = Spool(tmp_path / "spool", run=failing_run(MessageWriter._append, errno.ENOSPC))
    s.setup()
    writer = s.open_message()
    writer.write(b"x" * SPILL_SIZE)  # the spill fails; remembered for commit
    writer.write(b"more")
    assert isinstance(writer.error, OSError)
    with pytest.raises(SpoolError) as info:
        s.commit(writer, make_envelope(writer.id))
    assert info.value.full
    assert files_under(s.root) == []


def test_disk_full_after_the_spill_file_was_created(spool, monkeypatch):
    spool.commits.flush()  # its descriptor, kept open, is not a leak
    fds = open_fds()
    writer = spool.open_message()
    writer.write(b"x" * SPILL_SIZE)  # the placeholder and the first part are on disk
    monkeypatch.setattr(safeio, "write_all", fail_nth(1, errno.ENOSPC, safeio.write_all))
    writer.write(b"y" * SPILL_SIZE)  # the second spill hits a full disk
    assert writer.error is not None and writer.error.errno == errno.ENOSPC
    writer.write(b"z" * SPILL_SIZE)  # ignored after the error
    monkeypatch.undo()
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert info.value.full
    assert files_under(spool.root) == [] and open_fds() == fds


def test_writer_error_reported_at_commit(spool):
    writer = spool.open_message()
    writer.write(b"data\r\n")
    writer.error = oserror(errno.EIO)
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert not info.value.full
    assert files_under(spool.root) == []


@pytest.mark.parametrize("err, full", [(errno.ENOSPC, True), (errno.EIO, False)])
@pytest.mark.parametrize("size", [10, SPILL_SIZE], ids=["small", "spilled"])
def test_flush_failure_undoes_the_commit(spool, monkeypatch, err, full, size):
    # the link or rename happened before the flush, which failed: nothing may stay to be
    # delivered
    break_flush(monkeypatch, err, 1)
    writer = spool.open_message()
    writer.write(b"d" * size)
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert info.value.full is full
    monkeypatch.undo()
    assert files_under(spool.root) == []


@pytest.mark.parametrize("err, full", [(errno.ENOSPC, True), (errno.EIO, False)])
def test_flush_failure_undoes_concurrent_commits(tmp_path, monkeypatch, err, full):
    # commits in flight together (sharing flush rounds) all fail, all undone
    run = OffHub(monkeypatch, yields=True)
    s = Spool(tmp_path / "spool", run=run)
    s.setup()
    break_flush(monkeypatch, err)

    def commit(size):
        writer = s.open_message()
        writer.write(b"d" * size)
        try:
            s.commit(writer, make_envelope(writer.id))
        except SpoolError as exc:
            return exc.full
        return "committed"

    jobs = [gevent.spawn(commit, SPILL_SIZE if i % 3 == 0 else 7) for i in range(9)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert [j.value for j in jobs] == [full] * 9
    monkeypatch.undo()
    assert files_under(s.root) == []


def test_commit_job_failure(tmp_path):
    s = Spool(tmp_path / "spool", run=failing_run(GroupCommit._round, errno.ENOSPC))
    s.setup()
    writer = s.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(SpoolError) as info:
        s.commit(writer, make_envelope(writer.id))
    assert info.value.full
    assert files_under(s.root) == []


def test_commit_failure_that_is_not_an_oserror_is_raised_as_is(spool, monkeypatch):
    def broken(*args):
        raise RuntimeError("bug")

    monkeypatch.setattr(safeio, "link", broken)
    writer = spool.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(RuntimeError):
        spool.commit(writer, make_envelope(writer.id))
    monkeypatch.undo()
    assert files_under(spool.root) == []


def test_spool_works_after_a_failed_commit(spool, monkeypatch):
    break_flush(monkeypatch, errno.ENOSPC)
    writer = spool.open_message()
    writer.write(b"x\r\n")
    with pytest.raises(SpoolError):
        spool.commit(writer, make_envelope(writer.id))
    monkeypatch.undo()
    envelope = enqueue(spool)
    assert spool.ids("incoming") == [envelope.id]


# -- load and open_body -------------------------------------------------------------------
def test_load_reads_only_the_first_line_of_a_combined_file(spool):
    qid = "0123456789ABCDEF"
    envelope = make_envelope(qid)
    other = make_envelope(qid, sender="someone-else@remote.test")
    # the message's own lines (even valid JSON, even huge) are never read as the envelope
    write(spool.entry_path(qid, "incoming"), envelope.to_line() + other.to_line() + b"{not json\n" * 1000)
    assert spool.load(qid, "incoming") == envelope


def test_load_of_a_combined_entry_after_claim(spool):
    envelope = enqueue(spool, b'{"id": "not me"}\r\n\r\nbody\r\n')
    assert spool.claim(envelope.id)
    assert spool.load(envelope.id) == envelope  # default state: active


@pytest.mark.parametrize(
    "content",
    [b"", placeholder("0123456789ABCDEF"), b"{not json\n", b"[]\n", b"\n" + make_envelope("0123456789ABCDEF").to_line(),
     b"\xff\xfe\n"],
    ids=["empty", "placeholder", "bad-json", "not-an-object", "blank-first-line", "not-utf8"],
)
def test_load_of_a_bad_entry_raises_what_the_queue_catches(spool, content):
    write(spool.entry_path("0123456789ABCDEF", "incoming"), content)
    with pytest.raises((ValueError, TypeError, KeyError)):
        spool.load("0123456789ABCDEF", "incoming")


def test_load_missing_entry(spool):
    with pytest.raises(FileNotFoundError):
        spool.load("0123456789ABCDEF", "incoming")


def test_load_gives_up_on_an_absurdly_long_first_line(spool):
    # no read beyond MAX_ENVELOPE: the truncated line is not JSON
    write(spool.entry_path("0123456789ABCDEF", "incoming"), b'{"x":"' + b"a" * MAX_ENVELOPE + b'"}\n')
    with pytest.raises(ValueError):
        spool.load("0123456789ABCDEF", "incoming")


def test_open_body_skips_the_envelope_line(spool):
    qid = "0123456789ABCDEF"
    write(spool.message_path(qid), b'{"any":"line"}\n' + b"Received: x\r\n\r\n{\"a\":1}\n\r\n")
    with spool.open_body(qid) as fh:
        assert fh.read(3) == b"Rec"  # positioned, not just filtered
        assert fh.read() == b"eived: x\r\n\r\n{\"a\":1}\n\r\n"


def test_open_body_of_a_spilled_message_skips_the_placeholder(spool):
    data = big(1)
    envelope = enqueue(spool, data)
    with spool.open_body(envelope.id) as fh:
        assert fh.read(64) == data[:64]


@pytest.mark.parametrize("content", [b"", b"no newline at all", b"{}"], ids=["empty", "no-newline", "cut-placeholder"])
def test_open_body_without_an_envelope_line(spool, content):
    qid = "0123456789ABCDEF"
    write(spool.message_path(qid), content)
    fds = open_fds()
    with pytest.raises(ValueError):
        spool.open_body(qid)
    assert open_fds() == fds  # the file is closed again


def test_open_body_missing_message(spool):
    with pytest.raises(FileNotFoundError):
        spool.open_body("0123456789ABCDEF")


# -- claim --------------------------------------------------------------------------------
def test_claim_is_exclusive(spool):
    qid = enqueue(spool).id
    assert spool.claim(qid) is True
    assert spool.claim(qid) is False
    assert spool.ids("incoming") == [] and spool.ids("active") == [qid]
    assert spool.load(qid).id == qid
    assert same_file(spool.entry_path(qid, "active"), spool.message_path(qid))  # a rename keeps the link


def test_claim_missing_entry(spool):
    assert spool.claim("0123456789ABCDEF") is False


def _race(root: str, ids: list[str], start, results, reverse: bool) -> None:
    s = Spool(root)
    start.wait(10)
    won = [qid for qid in (reversed(ids) if reverse else ids) if s.claim(qid)]
    results.put(won)


def test_claim_race_between_processes(spool):
    # DESIGN: several processes share a spool; exactly one claimer wins each rename
    ids = [enqueue(spool, b"m\r\n").id for _ in range(200)]
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(spool.root, ids, start, results, i % 2 == 1)) for i in range(4)]
    for p in procs:
        p.start()
    start.set()
    won = [results.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    claimed = [qid for part in won for qid in part]
    assert sorted(claimed) == sorted(ids)  # every id exactly once
    assert spool.ids("active") == sorted(ids) and spool.ids("incoming") == []


# -- defer, due, update, move, done -------------------------------------------------------
def test_defer_sets_the_next_attempt(spool):
    envelope = enqueue(spool)
    qid = envelope.id
    assert spool.claim(qid)
    now = time.time()
    envelope.attempts = 1
    envelope.recipients[0].last_reply = "451 4.4.0 later"
    spool.defer(envelope, now + 3600)
    assert spool.ids("active") == [] and spool.ids("deferred") == [qid]
    assert os.stat(spool.entry_path(qid, "deferred")).st_mtime == pytest.approx(now + 3600, abs=1)
    assert spool.deferred_times() == {qid: pytest.approx(now + 3600, abs=1)}  # what the queue manager schedules from
    assert spool.load(qid, "deferred") == envelope  # progress saved
    assert spool.claim(qid, "deferred") and spool.ids("active") == [qid]
    assert os.listdir(Path(spool.root) / "tmp") == []


@pytest.mark.parametrize("size", [10, SPILL_SIZE * 2], ids=["small", "spilled"])
@pytest.mark.parametrize("how", ["update", "defer"])
def test_rewriting_the_entry_breaks_the_link_and_keeps_the_message(spool, how, size):
    data = b"m" * size
    envelope = enqueue(spool, data)
    qid = envelope.id
    msg = spool.message_path(qid)
    before = read(msg)
    assert spool.claim(qid)
    envelope.attempts = 1
    envelope.recipients[0].last_reply = "451 4.4.0 later"
    if how == "update":
        spool.update(envelope)
        state = "active"
    else:
        spool.defer(envelope, time.time() + 60)
        state = "deferred"
    entry = spool.entry_path(qid, state)
    # the entry is now a standalone envelope file; msg/<id> is untouched (its stale first
    # line is never read again)
    assert read(entry) == envelope.to_line()
    assert not same_file(entry, msg)
    assert os.stat(msg).st_nlink == 1 and os.stat(entry).st_nlink == 1
    assert read(msg) == before
    assert spool.load(qid, state) == envelope
    assert body(spool, qid) == data
    assert sorted(files_under(spool.root)) == sorted([f"msg/{qid}", f"queue/{state}/{qid}"])


@pytest.mark.parametrize("how", ["update", "defer"])
def test_rewrites_do_their_disk_work_off_the_hub(spool, monkeypatch, how):
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    run = spool.run = spool.commits._run = OffHub(monkeypatch)
    if how == "update":
        spool.update(envelope)
    else:
        spool.defer(envelope, time.time() + 60)
    if spool.commits.method == "syncfs":
        assert run.jobs == [GroupCommit._round]  # write, flush, rename, flush: one job
    else:  # the write and its fsync beside the others', then the directories' round
        assert run.jobs == [GroupCommit._write_and_sync, GroupCommit._round]
    assert run.on_hub == []


def test_ids_oldest_first_and_deferred_times(spool):
    now = time.time()
    incoming = sorted(enqueue(spool).id for _ in range(3))
    late, early = enqueue(spool), enqueue(spool)
    for env, when in ((late, now + 100), (early, now - 100)):
        assert spool.claim(env.id)
        spool.defer(env, when)
    (Path(spool.root) / "queue" / "deferred" / "not-an-id").write_bytes(b"")
    assert spool.ids("incoming") == incoming
    assert spool.deferred_times() == {early.id: pytest.approx(now - 100, abs=1),
                                      late.id: pytest.approx(now + 100, abs=1)}


@pytest.mark.parametrize("n", [0, 1, spool_module.SORT_SLICE, 3 * spool_module.SORT_SLICE + 7])
def test_sorted_gently_is_sorted(n):
    names = [new_id() for _ in range(n)]
    names.reverse()
    assert spool_module.sorted_gently(names) == sorted(names)


def test_update_rewrites_active_envelope(spool):
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    envelope.recipients[0].status = "delivered"
    spool.update(envelope)
    assert spool.load(envelope.id).recipients[0].status == "delivered"
    envelope.recipients[0].attempts = 7
    spool.update(envelope)  # a second rewrite replaces the standalone entry
    assert spool.load(envelope.id).recipients[0].attempts == 7
    assert os.listdir(Path(spool.root) / "tmp") == []


def test_failed_rewrite_keeps_the_old_entry(spool, monkeypatch):
    envelope = enqueue(spool)
    qid = envelope.id
    assert spool.claim(qid)
    changed = make_envelope(qid, attempts=5)
    break_flush(monkeypatch, errno.ENOSPC)
    with pytest.raises(OSError):
        spool.defer(changed, time.time() + 60)
    monkeypatch.undo()
    assert spool.ids("active") == [qid] and spool.load(qid) == envelope
    assert same_file(spool.entry_path(qid, "active"), spool.message_path(qid))
    assert os.listdir(Path(spool.root) / "tmp") == []


def test_move_between_states(spool):
    qid = enqueue(spool).id
    assert spool.move(qid, "incoming", "hold")
    assert spool.ids("hold") == [qid]
    assert not spool.move(qid, "incoming", "hold")  # already gone
    assert spool.move(qid, "hold", "deferred", when=1_000_000.0)
    assert os.stat(spool.entry_path(qid, "deferred")).st_mtime == 1_000_000.0
    assert not spool.move(qid, "hold", "incoming", when=5.0)
    assert same_file(spool.entry_path(qid, "deferred"), spool.message_path(qid))  # still one file
    assert body(spool, qid) == DATA


@pytest.mark.parametrize("rewritten", [False, True], ids=["linked", "rewritten"])
def test_done_removes_entry_then_message(spool, monkeypatch, rewritten):
    envelope = enqueue(spool)
    qid = envelope.id
    assert spool.claim(qid)
    if rewritten:
        spool.update(envelope)
    events = []
    real_unlink, real_rename, real_flush = os.unlink, os.rename, GroupCommit._flush
    monkeypatch.setattr(os, "unlink", lambda p: (events.append(("unlink", os.fspath(p))), real_unlink(p))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("spare", os.fspath(a))), real_rename(a, b))[1])
    monkeypatch.setattr(GroupCommit, "_flush", lambda *a, **kw: (events.append(("flush",)), real_flush(*a, **kw))[1])
    spool.done(qid)  # returns without waiting for a flush
    assert ("flush",) not in events
    for _ in range(200):
        if not os.path.exists(spool.message_path(qid)):
            break
        gevent.sleep(0.01)
    monkeypatch.undo()
    if rewritten:
        # DESIGN: an entry never points at a lost message: the entry's removal is durable
        # first (a greenlet of its own waits for that flush)
        assert events == [
            ("unlink", spool.entry_path(qid, "active")),
            ("flush",),
            ("spare", spool.message_path(qid)),
        ]
    else:
        # the entry is the message file: a crash keeping either name keeps the message
        assert events == [("unlink", spool.entry_path(qid, "active")), ("spare", spool.message_path(qid))]
    # the message file, emptied, is kept for the next message (geosmtp.spares)
    [spare] = files_under(spool.root)
    assert spare.startswith("spare/") and os.path.getsize(Path(spool.root) / spare) == 0


def test_entries_reports_unreadable_envelopes(spool):
    good = enqueue(spool)
    spilled = enqueue(spool, big(1))
    write(spool.entry_path("0123456789ABCDEF", "corrupt"), b"{not json")
    write(spool.entry_path("0123456789ABCDEG", "corrupt"), placeholder("0123456789ABCDEG") + b"message\r\n")
    found = {(state, env.id if env else None) for state, env, _ in spool.entries()}
    assert found == {("incoming", good.id), ("incoming", spilled.id), ("corrupt", None)}
    assert len(list(spool.entries())) == 4
    assert [env.id for _, env, _ in spool.entries(("incoming",))] == sorted([good.id, spilled.id])


# -- recover ------------------------------------------------------------------------------
def test_recover_after_a_crash(spool):
    was_active = enqueue(spool)
    assert spool.claim(was_active.id)
    waiting = enqueue(spool)
    deferred = enqueue(spool)
    assert spool.claim(deferred.id)
    spool.defer(deferred, time.time() + 600)
    held = enqueue(spool, hold=True)
    spilled_lost = enqueue(spool, big(1))
    os.unlink(spool.message_path(spilled_lost.id))  # a standalone entry without its message
    rewritten_lost = enqueue(spool)
    assert spool.claim(rewritten_lost.id)
    spool.defer(rewritten_lost, time.time() + 600)
    os.unlink(spool.message_path(rewritten_lost.id))
    orphan = "0000000000000AAAAAAAAAA"
    write(spool.message_path(orphan), b"{}\nnever committed")  # a message without entry
    write(f"{spool.root}/tmp/{new_id()}.{os.getpid()}", b"half written")
    write(f"{spool.root}/tmp/{new_id()}.12345", b"{")
    kept_corrupt = "0000000000000BBBBBBBBBB"
    write(spool.entry_path(kept_corrupt, "corrupt"), b"garbage")

    assert spool.recover() == [was_active.id]

    assert spool.ids("active") == []
    assert spool.ids("incoming") == sorted([was_active.id, waiting.id])
    assert spool.ids("deferred") == [deferred.id]
    assert spool.ids("hold") == [held.id]
    assert spool.ids("corrupt") == sorted([spilled_lost.id, rewritten_lost.id, kept_corrupt])
    assert os.listdir(Path(spool.root) / "tmp") == []
    assert sorted(os.listdir(Path(spool.root) / "msg")) == sorted([was_active.id, waiting.id, deferred.id, held.id])
    for env in (was_active, waiting, deferred, held):
        assert body(spool, env.id) == DATA
    # a recovered entry is still the message file itself
    assert same_file(spool.entry_path(was_active.id, "incoming"), spool.message_path(was_active.id))


@pytest.mark.parametrize("state", ["incoming", "active", "deferred", "hold"])
def test_recover_restores_a_lost_msg_name_from_a_linked_entry(spool, state):
    # a small message's entry *is* the message file: if a crash lost only the msg/ name,
    # the message is still all there and is linked back
    envelope = enqueue(spool, hold=state == "hold")
    qid = envelope.id
    if state == "active":
        assert spool.claim(qid)
    elif state == "deferred":
        assert spool.move(qid, "incoming", "deferred", when=time.time() + 60)
    os.unlink(spool.message_path(qid))
    spool.recover()
    final = "incoming" if state == "active" else state
    assert spool.ids(final) == [qid] and spool.ids("corrupt") == []
    assert same_file(spool.entry_path(qid, final), spool.message_path(qid))
    assert body(spool, qid) == DATA and spool.load(qid, final) == envelope


def test_recover_does_its_walk_off_the_hub_and_in_a_thread(tmp_path, monkeypatch):
    s = Spool(tmp_path / "spool")
    s.setup()
    envelope = enqueue(s)
    assert s.claim(envelope.id)
    run = s.run = OffHub(monkeypatch)
    assert s.recover() == [envelope.id]
    assert run.jobs == [Spool._recover] and run.on_hub == []
    monkeypatch.undo()
    # and in a real thread (the server may run it in gevent's threadpool itself)
    assert s.claim(envelope.id, "incoming")
    pool = gevent.get_hub().threadpool
    s.run = lambda fn, *args: pool.apply(fn, args)
    assert pool.apply(s.recover) == [envelope.id]
    assert s.ids("incoming") == [envelope.id] and body(s, envelope.id) == DATA


def test_recover_on_an_empty_directory(tmp_path):
    s = Spool(tmp_path / "new")
    assert s.recover() == []
    assert (Path(s.root) / "queue" / "incoming").is_dir()


def test_recover_is_idempotent(spool):
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    assert spool.recover() == [envelope.id]
    assert spool.recover() == []
    assert spool.ids("incoming") == [envelope.id]
    assert files_under(spool.root) == [f"msg/{envelope.id}", f"queue/incoming/{envelope.id}"]


def test_recover_ignores_names_that_are_not_ids(spool):
    envelope = enqueue(spool)
    write(spool.entry_path("README", "incoming"), b"not a queue entry")
    assert spool.recover() == []
    assert spool.ids("incoming") == [envelope.id]
    assert os.path.exists(spool.entry_path("README", "incoming"))


# -- durability: what a crash leaves ------------------------------------------------------
def truncate(path: str, length: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(length)


# where a crash may cut a committed file short, as a length from its size and its first
# line's: nothing of it, half its envelope line, the line alone, half the rest, all but one
CUTS = {
    "empty": lambda size, line: 0,
    "half-line": lambda size, line: line // 2,
    "line-only": lambda size, line: line,
    "half-body": lambda size, line: line + (size - line) // 2,
    "all-but-one": lambda size, line: size - 1,
}


def first_line_length(path: str) -> int:
    with open(path, "rb") as fh:
        return len(fh.readline())


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("size", [10, SPILL_SIZE * 2], ids=["small", "spilled"])
def test_recover_removes_what_a_crash_cut_short(spool, monkeypatch, cut, hold, size):
    # commit() names the entry before its one flush: a crash may keep the name and lose
    # part of the content of a message never acknowledged. recover() removes it; a whole
    # one beside it stays.
    kept = enqueue(spool, DATA, hold=hold)
    image = CrashImage(spool, monkeypatch)
    lost = enqueue(spool, b"L" * size, hold=hold)
    state = "hold" if hold else "incoming"
    entry = spool.entry_path(lost.id, state)
    assert image.unsealed == [entry] and image.problems == []
    monkeypatch.undo()
    # the combined file (a small message), or a spilled message's entry file or its message
    for path in [entry] if size == 10 else [entry, spool.message_path(lost.id)]:
        for name in (entry, spool.message_path(lost.id)):
            if not os.path.exists(name):  # put back what the previous round removed
                enqueue(spool, b"L" * size, qid=lost.id, hold=hold)
        length = CUTS[cut](os.path.getsize(path), first_line_length(path))
        if length == os.path.getsize(path):
            continue  # a spilled message's entry file is its line alone: that cut leaves it whole
        truncate(path, length)
        assert spool.recover() == []
        assert spool.ids(state) == [kept.id] and spool.ids("corrupt") == []
        assert sorted(files_under(spool.root)) == sorted([f"msg/{kept.id}", f"queue/{state}/{kept.id}"])
        assert body(spool, kept.id) == DATA


def test_recover_keeps_whole_entries_and_those_without_a_recorded_length(spool):
    whole = [enqueue(spool, DATA), enqueue(spool, big(1)), enqueue(spool, DATA, hold=True)]
    older = enqueue(spool, DATA)  # as an earlier version wrote it: no "stored"
    path = spool.entry_path(older.id, "incoming")
    line = json.loads(read(path).split(b"\n", 1)[0])
    del line["stored"]
    write(path, json.dumps(line).encode() + b"\n" + DATA)
    assert spool.recover() == []
    assert sorted(spool.ids("incoming") + spool.ids("hold")) == sorted(e.id for e in [*whole, older])
    assert spool.load(older.id, "incoming").stored is None and body(spool, older.id) == DATA


def test_a_checked_commit_records_the_length_of_the_rewritten_message(spool):
    # an end-of-data check that rewrote the message (removing fields): the envelope
    # records the new length, and recover() keeps the entry
    writer = spool.open_message()
    writer.write(b"X-Drop: me\r\n" + DATA)
    envelope = make_envelope(writer.id)

    def check(file):
        spool.rewrite_message(writer, file,
                              lambda src, dst: safeio.write_all(dst, src.read()[len(b"X-Drop: me\r\n"):]))
        return False

    spool.commit(writer, envelope, check=check)
    assert envelope.stored == len(DATA) and spool.load(envelope.id, "incoming").stored == len(DATA)
    assert spool.recover() == [] and body(spool, envelope.id) == DATA


def test_a_lone_commit_waits_for_one_flush(spool):
    before = spool.commits.rounds
    enqueue(spool)
    assert spool.commits.rounds - before == 1


class CrashImage:
    """What a crash would leave of the spool right now, pessimistically.

    POSIX makes a new name, a rename or a file's content durable only once it is flushed;
    the spool's flushes are the group commit's: a syncfs(), after which every name and every
    file's content on the filesystem is, or (method "fsync") an fsync of one file (its
    content) or of one directory (its names). Also checks, at every name made in queue/ (a
    link or a rename), that what it names is durable already (else a crash may keep the
    name and lose the content), and at every rename over an entry that is a second name of
    msg/<id>, that the msg/ name is durable (after the rename, the entry no longer keeps the
    message alive). The one exception is a commit's new entry in incoming/ or hold/, made
    with its content in one flush: it is listed in `unsealed` (recover() must tell one a
    crash cut short, test_recover_removes_what_a_crash_cut_short).
    """

    def __init__(self, spool: Spool, monkeypatch):
        self.spool = spool
        self.root = spool.root
        self.queue = os.path.join(spool.root, "queue")
        self.problems: list[str] = []
        self.unsealed: list[str] = []
        self._snapshot()
        real_syncfs, real_fsync_path = groupcommit.syncfs, groupcommit.fsync_path
        real_rename, real_link = os.rename, os.link

        def syncfs(fd):
            real_syncfs(fd)
            self._snapshot()

        def fsync_path(path, data_only=False):  # the "fsync" method: one file or directory
            real_fsync_path(path, data_only)
            if os.path.isdir(path):
                folder = os.fspath(path)
                self.names = {n for n in self.names if os.path.dirname(n) != folder}
                self.names.update(os.path.join(folder, name) for name in os.listdir(folder))
            else:
                self.content[os.stat(path).st_ino] = read(path)

        def durable_content(path: str) -> bool:  # by inode: a rename keeps the content
            return self.content.get(os.stat(path).st_ino) == read(path)

        def a_commit(dst: str) -> bool:  # a new name in a state commit() makes entries in
            state = os.path.basename(os.path.dirname(dst))
            return state in ("incoming", "hold") and not os.path.lexists(dst)

        def rename(src, dst):
            src, dst = os.fspath(src), os.fspath(dst)
            if dst.startswith(self.queue) and a_commit(dst) and not durable_content(src):
                self.unsealed.append(dst)
            elif dst.startswith(self.queue):
                if not durable_content(src):
                    self.problems.append(f"{dst} named before its content was durable")
                qid = os.path.basename(dst)
                msg = spool.message_path(qid)
                if os.path.exists(dst) and os.path.exists(msg) and same_file(dst, msg) and msg not in self.names:
                    self.problems.append(f"{dst} replaced while msg/{qid} is not durable")
            return real_rename(src, dst)

        def link(src, dst, **kw):
            src, dst = os.fspath(src), os.fspath(dst)
            # the content must be durable; the msg/ name need not be yet, as recover() puts
            # a lost one back from the entry (acknowledged only once both names are)
            if dst.startswith(self.queue) and not durable_content(src):
                if a_commit(dst):
                    self.unsealed.append(dst)
                else:
                    self.problems.append(f"{dst} linked before {src} was durable")
            return real_link(src, dst, **kw)

        monkeypatch.setattr(groupcommit, "syncfs", syncfs)
        monkeypatch.setattr(groupcommit, "fsync_path", fsync_path)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "link", link)

    def _snapshot(self) -> None:
        self.names, self.content = set(), {}
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                self.names.add(path)
                self.content[os.stat(path).st_ino] = read(path)

    def has(self, path: str) -> bool:
        """The name is in the crash image, with the content it has now."""
        return path in self.names and self.content.get(os.stat(path).st_ino) == read(path)


@pytest.mark.parametrize("size", [10, SPILL_SIZE * 2], ids=["small", "spilled"])
@pytest.mark.parametrize("hold", [False, True])
def test_committed_message_survives_a_crash(spool, monkeypatch, size, hold):
    image = CrashImage(spool, monkeypatch)
    envelope = enqueue(spool, b"c" * size, hold=hold)
    qid = envelope.id
    entry = spool.entry_path(qid, "hold" if hold else "incoming")
    assert image.has(entry)  # acknowledged only once the entry is durable...
    # ...and the message with it: under its msg/ name, or in the entry itself (recover()
    # links a lost msg/ name back)
    assert image.has(spool.message_path(qid)) or (same_file(entry, spool.message_path(qid)) and image.has(entry))
    assert image.problems == []


@pytest.mark.parametrize("how", ["defer", "update"])
def test_message_survives_a_crash_after_its_entry_is_rewritten(spool, monkeypatch, how):
    image = CrashImage(spool, monkeypatch)
    envelope = enqueue(spool)  # small: the entry is the message file
    qid = envelope.id
    assert spool.claim(qid)
    envelope.attempts = 1
    if how == "defer":
        spool.defer(envelope, time.time() + 60)
        entry = spool.entry_path(qid, "deferred")
    else:
        spool.update(envelope)
        entry = spool.entry_path(qid, "active")
    assert image.problems == []
    assert image.has(entry) and image.has(spool.message_path(qid))


# -- safeio -------------------------------------------------------------------------------
def test_write_file_replaces_atomically_with_mtime(tmp_path):
    final = tmp_path / "final"
    final.write_bytes(b"old")
    safeio.write_file(tmp_path / "t1", final, b"new", mtime=12345.0)
    assert final.read_bytes() == b"new" and os.stat(final).st_mtime == 12345.0
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_write_file_over_a_hard_link_leaves_the_other_name_alone(tmp_path):
    (tmp_path / "a").write_bytes(b"message")
    safeio.link(tmp_path / "a", tmp_path / "b")
    safeio.write_file(str(tmp_path / "t"), str(tmp_path / "b"), b"envelope")
    assert (tmp_path / "a").read_bytes() == b"message" and (tmp_path / "b").read_bytes() == b"envelope"
    assert os.stat(tmp_path / "a").st_nlink == 1


def test_write_file_failure_keeps_the_old_file(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(oserror(errno.ENOSPC)))
    with pytest.raises(OSError):
        safeio.write_file(tmp_path / "t1", final, b"new")
    monkeypatch.undo()
    assert final.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_create_never_reuses_a_name(tmp_path):
    fd = safeio.create(tmp_path / "x")
    os.close(fd)
    with pytest.raises(FileExistsError):
        safeio.create(tmp_path / "x")


def test_link_makes_a_second_name(tmp_path):
    (tmp_path / "a").write_bytes(b"data")
    safeio.link(str(tmp_path / "a"), str(tmp_path / "b"))
    assert same_file(str(tmp_path / "a"), str(tmp_path / "b")) and os.stat(tmp_path / "a").st_nlink == 2
    (tmp_path / "c").write_bytes(b"other")
    with pytest.raises(FileExistsError):  # never replaces an existing name
        safeio.link(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_bytes() == b"other"
    with pytest.raises(FileNotFoundError):
        safeio.link(tmp_path / "missing", tmp_path / "d")


def test_move_and_unlink_quietly(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    assert safeio.move(tmp_path / "a", tmp_path / "b") is True
    assert safeio.move(tmp_path / "a", tmp_path / "c") is False
    safeio.unlink_quietly(tmp_path / "b")
    safeio.unlink_quietly(tmp_path / "b")
    assert os.listdir(tmp_path) == []


def test_write_all_large(tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    fd = safeio.create(tmp_path / "big")
    try:
        safeio.write_all(fd, data)
    finally:
        os.close(fd)
    assert (tmp_path / "big").read_bytes() == data


# -- group commit: flushes shared by everything in flight ----------------------------------
def test_spool_flushes_are_grouped(tmp_path, monkeypatch):
    # many commits at once share the flushes (DESIGN: group commit)
    s = Spool(tmp_path / "spool", run=OffHub(monkeypatch, yields=True))
    s.setup()
    jobs = [gevent.spawn(enqueue, s, b"x" * (SPILL_SIZE if i % 4 == 0 else 3)) for i in range(40)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert len(s.ids("incoming")) == 40
    assert 1 <= s.commits.rounds < 10  # one a commit without grouping


def test_concurrent_deferrals_share_flush_rounds(tmp_path, monkeypatch):
    s = Spool(tmp_path / "spool", run=OffHub(monkeypatch, yields=True))
    s.setup()
    envelopes = [enqueue(s) for _ in range(20)]
    for env in envelopes:
        assert s.claim(env.id)
    before = s.commits.rounds
    jobs = [gevent.spawn(partial(s.defer, env, time.time() + 60)) for env in envelopes]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert len(s.ids("deferred")) == 20
    assert 1 <= s.commits.rounds - before < 10


# -- the operator's side: locate, delete, rewrite (geosmtp-queue) --------------------------
def test_locate_finds_the_entry_in_every_state(spool):
    env = enqueue(spool)
    assert spool.locate(env.id) == "incoming"
    for src, dst in [("incoming", "active"), ("active", "deferred"), ("deferred", "hold"), ("hold", "corrupt")]:
        assert spool.move(env.id, src, dst)
        assert spool.locate(env.id) == dst
    assert spool.locate(new_id()) is None
    assert spool.locate("../../etc/passwd") is None
    assert spool.locate("") is None


def test_locate_is_none_once_delivered(spool):
    env = enqueue(spool)
    assert spool.claim(env.id)
    spool.done(env.id)
    assert spool.settle(5.0)
    assert spool.locate(env.id) is None


def test_locate_sees_an_entry_that_moves_while_it_looks(spool, monkeypatch):
    # the entry goes active→deferred just after deferred/ was looked at: the next round finds it
    env = enqueue(spool)
    assert spool.claim(env.id)
    real = os.path.lexists
    moved = []

    def lexists(path):
        result = real(path)
        if path == spool.entry_path(env.id, "deferred") and not moved:
            moved.append(spool.move(env.id, "active", "deferred"))
        return result

    monkeypatch.setattr(os.path, "lexists", lexists)
    assert spool.locate(env.id) == "deferred" and moved == [True]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("size", [len(DATA), 3 * SPILL_SIZE])
def test_delete_removes_entry_and_message_in_any_state(spool, state, size):
    env = enqueue(spool, big() if size > len(DATA) else DATA)
    if state != "incoming":
        assert spool.move(env.id, "incoming", state)
    other = enqueue(spool)
    assert spool.delete(env.id, state)
    assert not os.path.exists(spool.entry_path(env.id, state))
    assert not os.path.exists(spool.message_path(env.id))
    assert spool.locate(env.id) is None
    assert not spool.delete(env.id, state)  # a second time: nothing there
    assert spool.locate(other.id) == "incoming" and body(spool, other.id) == DATA


def test_delete_of_a_wrong_state_changes_nothing(spool):
    env = enqueue(spool)
    assert not spool.delete(env.id, "deferred")
    assert spool.locate(env.id) == "incoming" and body(spool, env.id) == DATA


def test_delete_during_delivery_is_noticed_at_the_end_of_the_attempt(spool):
    env = enqueue(spool)
    assert spool.claim(env.id)
    assert spool.delete(env.id, "active")
    assert spool.update(env) is False
    assert spool.defer(env, time.time() + 60) is False
    assert files_under(Path(spool.root) / "queue") == [] and files_under(Path(spool.root) / "msg") == []


@pytest.mark.parametrize("size", [len(DATA), 3 * SPILL_SIZE])
def test_rewrite_of_a_held_entry_keeps_the_message(spool, size):
    data = big() if size > len(DATA) else DATA
    env = enqueue(spool, data, hold=True)
    original = read(spool.message_path(env.id)).partition(b"\n")[0]
    env.extra["return_to_sender"] = "spam run"
    assert spool.rewrite(env, "hold")
    assert spool.load(env.id, "hold").extra == {"return_to_sender": "spam run"}
    assert os.stat(spool.entry_path(env.id, "hold")).st_nlink == 1  # a file of its own now
    assert read(spool.message_path(env.id)).partition(b"\n")[0] == original
    assert body(spool, env.id) == data
    assert os.listdir(os.path.join(spool.root, "tmp")) == []
    assert spool.move(env.id, "hold", "incoming") and spool.load(env.id, "incoming").extra["return_to_sender"]


def test_rewrite_repairs_a_corrupt_entry(spool):
    env = enqueue(spool)
    assert spool.move(env.id, "incoming", "corrupt")
    os.unlink(spool.entry_path(env.id, "corrupt"))
    write(spool.entry_path(env.id, "corrupt"), b"{not json\n")
    with pytest.raises(ValueError):
        spool.load(env.id, "corrupt")
    assert spool.rewrite(env, "corrupt")
    assert spool.load(env.id, "corrupt").id == env.id


def test_rewrite_refuses_the_states_the_queue_manager_uses(spool):
    env = enqueue(spool)
    for state in ("incoming", "active", "deferred"):
        with pytest.raises(ValueError):
            spool.rewrite(env, state)
    assert not spool.rewrite(env, "hold")  # not there: nothing is created
    assert spool.locate(env.id) == "incoming" and not os.path.exists(spool.entry_path(env.id, "hold"))
