"""geosmtp.schedule, and the queue manager's use of it on a real spool: deferred/ is walked
once at start-up (and again as a safety net) in a thread, never at each scan on the hub; the
schedule follows every defer; entries an operator moved out of deferred/ are dropped when they
come due; entries put there behind the queue manager's back are found by the next walk."""
from __future__ import annotations

import os
import time

import gevent
import pytest

from geosmtp import queue as queue_module
from geosmtp.delivery.target import Outcome, Router
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.config import QueueConfig
from geosmtp.queue import QueueManager
from geosmtp.replies import Reply
from geosmtp.schedule import Schedule
from geosmtp.spool import Spool

LOCAL_DOMAINS = frozenset({"example.test"}).__contains__  # the directory's is_local
MESSAGE = b"Received: by mx.example.test\r\nSubject: q\r\n\r\nbody\r\n"
LATER = Reply(451, "4.2.0", "try later")


# -- Schedule -----------------------------------------------------------------------------
def test_due_gives_what_is_due_earliest_first_and_keeps_the_rest():
    s = Schedule()
    for qid, when in (("c", 30.0), ("a", 10.0), ("b", 20.0), ("d", 40.0)):
        s.add(qid, when)
    assert len(s) == 4 and s.next_due() == 10.0
    assert list(s.due(25.0)) == ["a", "b"]
    assert list(s.due(25.0)) == [] and len(s) == 2 and "c" in s and "a" not in s
    assert list(s.due(100.0)) == ["c", "d"] and len(s) == 0 and s.next_due() is None


def test_a_new_time_replaces_the_old_one_which_is_dropped_when_it_comes_up():
    s = Schedule()
    s.add("x", 10.0)
    s.add("x", 50.0)  # deferred again (after a flush and an attempt)
    assert list(s.due(20.0)) == [None]  # the old item, dropped: x is not due
    assert "x" in s
    assert list(s.due(60.0)) == ["x"]


def test_discard_and_add_missing():
    s = Schedule()
    s.add("known", 99.0)
    s.add("flushed", 5.0)
    s.discard("flushed")
    added = s.add_missing({"known": 1.0, "new": 2.0, "busy": 3.0, "flushed": 4.0}.items(), busy={"busy"})
    assert added == 2  # "known" keeps the time the queue manager gave it; "busy" is in delivery
    assert [q for q in s.due(10.0) if q] == ["new", "flushed"]
    assert list(s.due(100.0)) == ["known"]


# -- the queue manager --------------------------------------------------------------------
class Watch:
    """A `run` that runs jobs inline and records the directory walks and stats made
    outside of one (on the hub)."""

    def __init__(self, monkeypatch):
        self.jobs: list = []
        self.on_hub: list[tuple[str, str]] = []
        self.depth = 0
        for name in ("listdir", "scandir", "stat"):
            monkeypatch.setattr(os, name, self._watch(name, getattr(os, name)))

    def _watch(self, name, real):
        def call(path=".", *args, **kw):
            if self.depth == 0:
                self.on_hub.append((name, os.fspath(path)))
            return real(path, *args, **kw)
        return call

    def __call__(self, fn, *args):
        self.jobs.append(getattr(fn, "__func__", fn))
        gevent.sleep(0)  # a threadpool job gives way to the hub first
        self.depth += 1
        try:
            return fn(*args)
        finally:
            self.depth -= 1

    def walks_on_hub(self) -> list[tuple[str, str]]:
        # one stat of msg/<id> per delivery (is the message still there?) is O(1)
        return [(n, p) for n, p in self.on_hub if not (n == "stat" and "/msg/" in p)]


class Local:
    def __init__(self, reply: Reply = LATER):
        self.reply = reply
        self.ids: list[str] = []

    kind = "maildir"

    def destination(self, domain):
        return "local"

    def deliver(self, destination, msg, open_body):
        self.ids.append(msg.id)
        return [Outcome(self.reply)] * len(msg.recipients)


@pytest.fixture
def run(monkeypatch):
    return Watch(monkeypatch)


@pytest.fixture
def spool(tmp_path, run) -> Spool:
    s = Spool(tmp_path / "spool", run=run)
    s.setup()
    return s


def enqueue(spool: Spool) -> Envelope:
    writer = spool.open_message()
    writer.write(MESSAGE)
    alice = Recipient("alice@example.test", "alice@example.test")
    envelope = Envelope(writer.id, time.time(), "s@remote.test", [alice], ClientInfo("192.0.2.1"), size=len(MESSAGE))
    spool.commit(writer, envelope)
    return envelope


def deferred(spool: Spool, when: float) -> str:
    """An entry put in deferred/ as a previous run of the server would have left it."""
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    assert spool.defer(envelope, when)
    return envelope.id


def settle(qm: QueueManager) -> None:
    qm.pool.join(timeout=5)


def test_start_up_walk_schedules_every_deferred_entry_off_the_hub(spool, run):
    now = time.time()
    due, later = deferred(spool, now - 10), deferred(spool, now + 3600)
    qm = QueueManager(spool, Router(Local(), LOCAL_DOMAINS))
    run.on_hub.clear()
    assert qm.walk_deferred() == 2
    assert spool.deferred_times.__func__ in run.jobs
    assert len(qm.schedule) == 2 and due in qm.schedule and later in qm.schedule
    assert qm.run_once(now) == 1  # only the entry whose time has come
    settle(qm)
    assert qm.walk_deferred() == 0  # a second walk finds nothing new
    assert run.walks_on_hub() == []


def test_a_defer_schedules_the_entry_and_a_scan_claims_it_when_due(spool, run):
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS), QueueConfig(retry_schedule=[300.0]))
    qid = enqueue(spool).id
    run.on_hub.clear()
    assert qm.run_once() == 1
    settle(qm)
    assert qid in qm.schedule
    assert qm.run_once(time.time() + 299) == 0  # not yet
    assert qm.run_once(time.time() + 301) == 1
    settle(qm)
    assert run.walks_on_hub() == []  # the scans listed incoming/ in a thread, nothing else
    assert local.ids == [qid, qid] and qid in qm.schedule  # deferred again
    assert spool.ids("deferred") == [qid]


def test_a_delivery_that_raises_is_deferred_and_scheduled(spool):
    class Broken(Local):
        def deliver(self, *args):
            raise RuntimeError("bug")

    qm = QueueManager(spool, Router(Broken(), LOCAL_DOMAINS), QueueConfig(retry_schedule=[60.0]))
    qid = enqueue(spool).id
    assert qm.run_once() == 1
    settle(qm)
    assert spool.ids("deferred") == [qid] and qid in qm.schedule


def test_a_flushed_entry_is_tried_once_not_again_at_its_old_time(spool):
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS), QueueConfig(retry_schedule=[3600.0]))
    qid = deferred(spool, time.time() + 60)
    qm.walk_deferred()
    assert spool.move(qid, "deferred", "incoming")  # geosmtp-queue flush, then SIGUSR1
    assert qm.run_once() == 1
    settle(qm)
    assert local.ids == [qid] and spool.ids("deferred") == [qid]
    # at the old time the entry is not claimed again: its time is now an hour away
    assert qm.run_once(time.time() + 120) == 0 and local.ids == [qid]


def test_entries_moved_out_of_deferred_are_dropped_when_they_come_due(spool):
    qm = QueueManager(spool, Router(Local(), LOCAL_DOMAINS))
    held, deleted = deferred(spool, time.time() - 1), deferred(spool, time.time() - 1)
    qm.walk_deferred()
    assert spool.move(held, "deferred", "hold") and spool.delete(deleted, "deferred")
    assert qm.run_once() == 0
    assert len(qm.schedule) == 0 and spool.ids("hold") == [held]


def test_the_next_walk_finds_what_was_put_in_deferred_behind_its_back(spool):
    qm = QueueManager(spool, Router(Local(), LOCAL_DOMAINS))
    qm.walk_deferred()
    qid = deferred(spool, time.time() - 1)  # a person's mv, a restored backup...
    assert qm.run_once() == 0  # unknown to the schedule
    assert qm.walk_deferred() == 1
    assert qm.run_once() == 1


def test_the_walk_skips_an_entry_in_delivery(spool):
    qm = QueueManager(spool, Router(Local(), LOCAL_DOMAINS))
    qid = deferred(spool, time.time() - 1)
    qm._delivering.add(qid)  # claimed after the walk saw it in deferred/
    assert qm.walk_deferred() == 0


def test_a_flood_of_stale_items_gives_way_to_the_hub(spool, monkeypatch):
    qm = QueueManager(spool, Router(Local(), LOCAL_DOMAINS))
    for i in range(5 * queue_module.GIVE_WAY):
        qm.schedule.add(f"{i:020X}", time.time() - 1)  # flushed long ago: nothing in deferred/
    turns = []

    def other():
        while True:
            turns.append(time.monotonic())
            gevent.sleep(0)

    g = gevent.spawn(other)
    gevent.sleep(0)
    before = len(turns)
    assert qm.run_once() == 0
    g.kill()
    assert len(turns) - before >= 4  # the scan let the hub run other greenlets meanwhile


def test_start_walks_and_stop_ends_both_loops(spool, run):
    qid = deferred(spool, time.time() - 1)
    local = Local(Reply(250, "2.0.0", "ok"))
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS), QueueConfig(scan_interval=0.05))
    run.on_hub.clear()
    qm.start()
    try:
        deadline = time.monotonic() + 5
        while local.ids != [qid] and time.monotonic() < deadline:
            gevent.sleep(0.01)
        assert local.ids == [qid] and qm.walks >= 1
    finally:
        qm.stop(timeout=1)
    assert all(g.dead for g in qm._loops)
    assert run.walks_on_hub() == []


# -- incoming/: what commits announce, what a scan may take -------------------------------
def test_woken_by_a_commit_only_the_announced_entry_is_taken(spool, run, monkeypatch):
    """An entry is linked into incoming/ before the flush that makes it durable: one taken
    then, whose flush fails, is delivered though its client was told 451. So the queue
    takes what commits announce, and a scan takes an unannounced entry only once settled."""
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS))
    in_flight, done = enqueue(spool).id, enqueue(spool).id  # neither announced yet
    qm.notify(done)
    assert qm.run_once(incoming="announced") == 1
    assert qm.run_once(incoming="settled") == 0  # written a moment ago, nobody announced it
    settle(qm)
    assert local.ids == [done] and spool.ids("incoming") == [in_flight]
    monkeypatch.setattr(queue_module, "COMMIT_GRACE", 0.3)
    time.sleep(0.4)  # and its worker died after its commit: nobody will announce it
    assert qm.run_once(incoming="settled") == 1
    settle(qm)
    assert local.ids == [done, in_flight]


def test_start_up_and_geosmtp_queue_take_every_entry_of_incoming(spool, run):
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS))
    first = enqueue(spool).id
    qm.start()  # the first scan takes all: nothing was in flight before this process
    gevent.sleep(0.2)
    settle(qm)
    assert local.ids == [first]
    flushed = enqueue(spool).id  # as geosmtp-queue's flush puts one there, then SIGUSR1
    qm.notify()
    gevent.sleep(0.2)
    settle(qm)
    qm.stop()
    assert local.ids == [first, flushed]


def test_a_flushed_deferred_entry_dated_ahead_is_settled(spool, run):
    """flush moves a deferred entry into incoming/ with its mtime, the next attempt, which
    may lie ahead: that is no commit in flight."""
    qid = deferred(spool, time.time() + 3600)
    assert spool.move(qid, "deferred", "incoming")
    assert spool.settled_ids("incoming", time.time() - queue_module.COMMIT_GRACE) == [qid]


def test_an_entry_both_announced_and_listed_is_started_once(spool, run):
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS))
    qid = enqueue(spool).id
    qm.notify(qid)
    qm.notify()  # and geosmtp-queue asked for a look at all of incoming/
    assert qm.run_once(incoming="all") == 1
    settle(qm)
    assert local.ids == [qid]


def test_a_stale_announcement_leaves_a_parked_entry_alone(spool, run):
    """Found in review: an entry taken by a listing and parked (its destination full) got
    its late notice handled as if it were still in incoming/, and was lost from the parked
    and the scheduled ones until the next walk."""
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS))
    qid = enqueue(spool).id
    qm._delivering.add(qid)  # a listing took it (in delivery, or parked: _waiting_ids)
    qm.notify(qid)  # its notice comes after
    assert qm.run_once(incoming="announced") == 0
    assert local.ids == [] and spool.ids("incoming") == [qid]


def test_the_periodic_listing_runs_however_often_commits_wake_the_queue(spool, run, monkeypatch):
    """Found in review: the listing for unannounced entries ran only when the wait timed
    out, which steady traffic never lets happen."""
    monkeypatch.setattr(queue_module, "COMMIT_GRACE", 0.0)
    local = Local()
    qm = QueueManager(spool, Router(local, LOCAL_DOMAINS), QueueConfig(scan_interval=0.5))
    qm.start()
    try:
        gevent.sleep(0.2)
        lost = enqueue(spool).id  # its notice was lost
        deadline = time.monotonic() + 3
        while lost not in local.ids and time.monotonic() < deadline:
            qm.notify(enqueue(spool).id)  # traffic: a wake-up every 50 ms
            gevent.sleep(0.05)
        assert lost in local.ids
    finally:
        qm.stop()
