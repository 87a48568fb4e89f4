"""geosmtp.spool and geosmtp.safeio on a real directory: commit, claim, defer, done, recover.

Disk failures are made real where they can be (a `run` that raises ENOSPC from the write or
fsync it was asked to do, as a full disk would); we run as root, so chmod cannot be used.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time
from pathlib import Path

import gevent
import pytest

from geosmtp import safeio
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.spool import SPILL_SIZE, STATES, Spool, SpoolError, new_id, valid_id


def make_envelope(qid: str, **kw) -> Envelope:
    return Envelope(
        id=qid,
        created=kw.pop("created", time.time()),
        sender=kw.pop("sender", "sender@remote.test"),
        recipients=kw.pop("recipients", [Recipient("alice@example.test", "alice@example.test")]),
        client=ClientInfo("192.0.2.1", helo="client.test", listener="smtp"),
        **kw,
    )


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def enqueue(spool: Spool, data: bytes = b"Subject: x\r\n\r\nhi\r\n", qid: str | None = None, **kw) -> Envelope:
    writer = spool.open_message(qid)
    writer.write(data)
    envelope = make_envelope(writer.id, size=len(data), **kw)
    spool.commit(writer, envelope)
    return envelope


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
        ("Ä123456789ABCDEF", False),  # isalnum, but not ASCII
        ("0123456789ABCDE\x00", False),
    ],
)
def test_valid_id(qid, ok):
    assert valid_id(qid) is ok


# -- commit -------------------------------------------------------------------------------
def test_setup_makes_the_layout(spool):
    for sub in ["tmp", "msg", *(f"queue/{s}" for s in STATES)]:
        assert (spool.root / sub).is_dir()


def test_commit_makes_message_and_envelope(spool):
    data = b"Received: by us\r\nSubject: x\r\n\r\nhello\r\n"
    envelope = enqueue(spool, data)
    qid = envelope.id
    assert spool.message_path(qid).read_bytes() == data
    assert Envelope.from_json(spool.entry_path(qid, "incoming").read_bytes()) == envelope
    assert files_under(spool.root) == [f"msg/{qid}", f"queue/incoming/{qid}"]


def test_commit_large_message_spilled_to_disk(spool):
    piece = bytes(range(256)) * 16  # 4 KiB
    writer = spool.open_message()
    for _ in range(3 * SPILL_SIZE // len(piece) + 3):
        writer.write(piece)
    assert writer._fd is not None  # it went to tmp/ while DATA was still arriving
    spool.commit(writer, make_envelope(writer.id))
    assert spool.message_path(writer.id).read_bytes() == piece * (3 * SPILL_SIZE // len(piece) + 3)
    assert writer.size == len(piece) * (3 * SPILL_SIZE // len(piece) + 3)
    assert files_under(spool.root) == [f"msg/{writer.id}", f"queue/incoming/{writer.id}"]


def test_abort_leaves_nothing(spool):
    writer = spool.open_message()
    writer.write(b"x" * (SPILL_SIZE + 10))
    writer.abort()
    assert files_under(spool.root) == []


def test_envelope_is_json(spool):
    envelope = enqueue(spool, sender="ü@bücher.test", smtputf8=True)
    raw = json.loads(spool.entry_path(envelope.id, "incoming").read_bytes())
    assert raw["sender"] == "ü@bücher.test" and raw["smtputf8"] is True


# -- commit failures ----------------------------------------------------------------------
def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_run(fail_on, err):
    """A `run` that fails the named disk operation the way a full or broken disk would."""

    def run(fn, *args):
        if fn is fail_on:
            raise OSError(err, os.strerror(err))
        return fn(*args)

    return run


@pytest.mark.parametrize(
    "err, full",
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EFBIG, True), (errno.EIO, False), (errno.EROFS, False)],
)
def test_fsync_failure_is_a_spool_error(spool, monkeypatch, err, full):
    def fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", fsync)
    writer = spool.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert info.value.full is full
    monkeypatch.undo()
    assert files_under(spool.root) == []


def test_disk_full_while_spilling(tmp_path):
    s = Spool(tmp_path / "spool", run=failing_run(safeio.write_all, errno.ENOSPC))
    s.setup()
    writer = s.open_message()
    writer.write(b"x" * SPILL_SIZE)  # the spill fails; remembered for commit
    writer.write(b"more")
    assert isinstance(writer.error, OSError)
    with pytest.raises(SpoolError) as info:
        s.commit(writer, make_envelope(writer.id))
    assert info.value.full
    assert files_under(s.root) == []


def test_writer_error_reported_at_commit(spool):
    writer = spool.open_message()
    writer.write(b"data\r\n")
    writer.error = OSError(errno.EIO, "I/O error")
    with pytest.raises(SpoolError) as info:
        spool.commit(writer, make_envelope(writer.id))
    assert not info.value.full
    assert files_under(spool.root) == []


@pytest.mark.parametrize("err, full", [(errno.ENOSPC, True), (errno.EIO, False)])
def test_directory_fsync_failure_undoes_the_commit(tmp_path, err, full):
    # the renames happened, but they are not durable: nothing may stay to be delivered
    s = Spool(tmp_path / "spool", run=failing_run(safeio.fsync_path, err))
    s.setup()
    writer = s.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(SpoolError) as info:
        s.commit(writer, make_envelope(writer.id))
    assert info.value.full is full
    assert files_under(s.root) == []


def test_envelope_write_failure(tmp_path):
    s = Spool(tmp_path / "spool", run=failing_run(Spool._write_tmp, errno.ENOSPC))
    s.setup()
    writer = s.open_message()
    writer.write(b"data\r\n")
    with pytest.raises(SpoolError) as info:
        s.commit(writer, make_envelope(writer.id))
    assert info.value.full
    assert files_under(s.root) == []


def test_spool_works_after_a_failed_commit(spool, monkeypatch):
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", disk_full)
    writer = spool.open_message()
    writer.write(b"x\r\n")
    with pytest.raises(SpoolError):
        spool.commit(writer, make_envelope(writer.id))
    monkeypatch.setattr(os, "fsync", real_fsync)
    envelope = enqueue(spool)
    assert list(spool.due(time.time())) == [(envelope.id, "incoming")]


# -- claim --------------------------------------------------------------------------------
def test_claim_is_exclusive(spool):
    qid = enqueue(spool).id
    assert spool.claim(qid) is True
    assert spool.claim(qid) is False
    assert spool.ids("incoming") == [] and spool.ids("active") == [qid]
    assert spool.load(qid).id == qid


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
    procs = [ctx.Process(target=_race, args=(str(spool.root), ids, start, results, i % 2 == 1)) for i in range(4)]
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
    assert list(spool.due(now)) == []
    assert list(spool.due(now + 3601)) == [(qid, "deferred")]
    assert list(spool.due(now + 3601, deferred=False)) == []
    assert spool.load(qid, "deferred") == envelope  # progress saved
    assert spool.claim(qid, "deferred") and spool.ids("active") == [qid]
    assert list((spool.root / "tmp").iterdir()) == []


def test_due_lists_incoming_then_ripe_deferred(spool):
    now = time.time()
    incoming = sorted(enqueue(spool).id for _ in range(3))
    late, early = enqueue(spool), enqueue(spool)
    for env, when in ((late, now + 100), (early, now - 100)):
        assert spool.claim(env.id)
        spool.defer(env, when)
    assert list(spool.due(now)) == [(q, "incoming") for q in incoming] + [(early.id, "deferred")]


def test_update_rewrites_active_envelope(spool):
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    envelope.recipients[0].status = "delivered"
    spool.update(envelope)
    assert spool.load(envelope.id).recipients[0].status == "delivered"
    assert list((spool.root / "tmp").iterdir()) == []


def test_move_between_states(spool):
    qid = enqueue(spool).id
    assert spool.move(qid, "incoming", "hold")
    assert spool.ids("hold") == [qid]
    assert not spool.move(qid, "incoming", "hold")  # already gone
    assert spool.move(qid, "hold", "deferred", when=1_000_000.0)
    assert os.stat(spool.entry_path(qid, "deferred")).st_mtime == 1_000_000.0
    assert not spool.move(qid, "hold", "incoming", when=5.0)


def test_done_removes_envelope_then_message(spool, monkeypatch):
    qid = enqueue(spool).id
    assert spool.claim(qid)
    removed = []
    real_unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p: (removed.append(Path(p)), real_unlink(p)))
    spool.done(qid)
    monkeypatch.undo()
    # DESIGN: an envelope never points at a lost message
    assert removed == [spool.entry_path(qid, "active"), spool.message_path(qid)]
    assert files_under(spool.root) == []


def test_entries_reports_unreadable_envelopes(spool):
    good = enqueue(spool)
    spool.entry_path("0123456789ABCDEF", "corrupt").write_bytes(b"{not json")
    found = {(state, env.id if env else None) for state, env, _ in spool.entries()}
    assert found == {("incoming", good.id), ("corrupt", None)}


# -- recover ------------------------------------------------------------------------------
def test_recover_after_a_crash(spool):
    was_active = enqueue(spool)
    assert spool.claim(was_active.id)
    waiting = enqueue(spool)
    deferred = enqueue(spool)
    assert spool.claim(deferred.id)
    spool.defer(deferred, time.time() + 600)
    lost_message = enqueue(spool)
    spool.message_path(lost_message.id).unlink()  # an envelope without its message
    orphan = "0000000000000AAAAAAAAAA"
    spool.message_path(orphan).write_bytes(b"never committed")  # a message without envelope
    (spool.root / "tmp" / f"{new_id()}.msg").write_bytes(b"half written")
    (spool.root / "tmp" / f"{new_id()}.env").write_bytes(b"{")
    kept_corrupt = "0000000000000BBBBBBBBBB"
    spool.entry_path(kept_corrupt, "corrupt").write_bytes(b"garbage")

    assert spool.recover() == [was_active.id]

    assert spool.ids("active") == []
    assert spool.ids("incoming") == sorted([was_active.id, waiting.id])
    assert spool.ids("deferred") == [deferred.id]
    assert spool.ids("corrupt") == sorted([lost_message.id, kept_corrupt])
    assert list((spool.root / "tmp").iterdir()) == []
    assert sorted(os.listdir(spool.root / "msg")) == sorted([was_active.id, waiting.id, deferred.id])


def test_recover_on_an_empty_directory(tmp_path):
    s = Spool(tmp_path / "new")
    assert s.recover() == []
    assert (s.root / "queue" / "incoming").is_dir()


def test_recover_is_idempotent(spool):
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    assert spool.recover() == [envelope.id]
    assert spool.recover() == []
    assert spool.ids("incoming") == [envelope.id]


# -- safeio -------------------------------------------------------------------------------
def test_write_file_replaces_atomically_with_mtime(tmp_path):
    final = tmp_path / "final"
    final.write_bytes(b"old")
    safeio.write_file(tmp_path / "t1", final, b"new", mtime=12345.0)
    assert final.read_bytes() == b"new" and os.stat(final).st_mtime == 12345.0
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_write_file_failure_keeps_the_old_file(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", disk_full)
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


# -- GroupSync: group commit of directory fsyncs ------------------------------------------
class Recorder:
    """A `run` that yields to the hub while its fsync is 'in flight', as the threadpool does."""

    def __init__(self, delay: float = 0.005, fail: set[int] = frozenset()):
        self.log: list[tuple[str, int]] = []
        self.fsyncs = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, fn, *args):
        n = self.fsyncs = self.fsyncs + 1
        self.log.append(("start", n))
        gevent.sleep(self.delay)
        try:
            if n in self.fail:
                raise OSError(errno.EIO, "I/O error")
            return fn(*args)
        finally:
            self.log.append(("end", n))


def _callers(gs: safeio.GroupSync, rec: Recorder, delays: list[float]):
    def caller(i, delay):
        gevent.sleep(delay)
        rec.log.append(("call", i))
        try:
            gs.sync()
            outcome = "ok"
        except OSError:
            outcome = "error"
        rec.log.append(("return", i))
        return outcome

    greenlets = [gevent.spawn(caller, i, d) for i, d in enumerate(delays)]
    gevent.joinall(greenlets, timeout=10)
    assert all(g.ready() for g in greenlets), "a sync() caller hung"
    return [g.value for g in greenlets]


def _covered(log, i) -> bool:
    """Caller i returned only after an fsync that started after its call had finished."""
    call, ret = log.index(("call", i)), log.index(("return", i))
    starts = {n: k for k, (kind, n) in enumerate(log) if kind == "start"}
    ends = {n: k for k, (kind, n) in enumerate(log) if kind == "end"}
    return any(call < starts[n] and ends.get(n, len(log)) < ret for n in starts)


def test_group_sync_shares_fsyncs(tmp_path):
    rec = Recorder()
    gs = safeio.GroupSync(tmp_path, rec)
    outcomes = _callers(gs, rec, [0.0] * 50)
    assert outcomes == ["ok"] * 50
    assert 1 <= rec.fsyncs < 50
    assert all(_covered(rec.log, i) for i in range(50))


def test_group_sync_staggered_callers(tmp_path):
    rec = Recorder(delay=0.004)
    gs = safeio.GroupSync(tmp_path, rec)
    delays = [i * 0.0007 for i in range(60)]  # arriving while fsyncs are in flight
    assert _callers(gs, rec, delays) == ["ok"] * 60
    assert rec.fsyncs < 60
    assert all(_covered(rec.log, i) for i in range(60))


def test_group_sync_error_reaches_every_waiter_of_the_round(tmp_path):
    rec = Recorder(fail={1})
    gs = safeio.GroupSync(tmp_path, rec)
    assert _callers(gs, rec, [0.0] * 10) == ["error"] * 10
    assert _callers(gs, rec, [0.0] * 10) == ["ok"] * 10  # the next round works again


def test_group_sync_really_fsyncs(tmp_path):
    gs = safeio.GroupSync(tmp_path, lambda fn, *a: fn(*a))
    gs.sync()
    with pytest.raises(FileNotFoundError):
        safeio.GroupSync(tmp_path / "missing", lambda fn, *a: fn(*a)).sync()


def test_group_sync_waiter_never_hangs_when_a_round_is_killed(tmp_path):
    calls = []

    def run(fn, *args):
        calls.append(1)
        gevent.sleep(0.02)
        if len(calls) == 1:
            raise gevent.GreenletExit()  # e.g. the round's greenlet being killed
        return fn(*args)

    gs = safeio.GroupSync(tmp_path, run)
    first = gevent.spawn(gs.sync)
    second = gevent.spawn_later(0.01, gs.sync)  # arrives while the first round is in flight
    try:
        gevent.joinall([first, second], timeout=1)
        assert first.ready() and second.ready()
    finally:
        gevent.killall([first, second])


def test_spool_syncs_are_grouped(tmp_path):
    # many commits at once share the directory fsyncs (DESIGN: group commit)
    rec = Recorder(delay=0.002)
    counted = {"fsync_path": 0}

    def run(fn, *args):
        if fn is safeio.fsync_path:
            counted["fsync_path"] += 1
            return rec(fn, *args)
        return fn(*args)

    s = Spool(tmp_path / "spool", run=run)
    s.setup()

    def commit():
        writer = s.open_message()
        writer.write(b"x\r\n")
        s.commit(writer, make_envelope(writer.id))

    jobs = [gevent.spawn(commit) for _ in range(40)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert len(s.ids("incoming")) == 40
    assert counted["fsync_path"] < 40  # two directories per commit without grouping
