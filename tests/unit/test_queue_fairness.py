"""The queue manager's sleep (until the next due entry) and its per-destination limit, on a
real spool with a delivery target that blocks until the test lets it go."""
from __future__ import annotations

import time

import gevent
import gevent.event

from geosmtp.config import QueueConfig
from geosmtp.delivery.target import Outcome, Router
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.queue import QueueManager
from geosmtp.replies import Reply
from geosmtp.spool import Spool

MESSAGE = b"Received: by mx.example.test\r\nSubject: q\r\n\r\nbody\r\n"
SENT = Reply(250, "2.0.0", "ok")


class Remote:
    """A relay-like target: one destination per domain; a domain in `stalled` waits for
    `go` before it answers."""
    kind = "relay"

    def __init__(self, stalled: set[str]):
        self.stalled = stalled
        self.go = gevent.event.Event()
        self.delivered: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def destination(self, domain: str) -> str:
        return domain

    def deliver(self, destination, msg, open_body):
        self.in_flight[destination] = self.in_flight.get(destination, 0) + 1
        self.peak[destination] = max(self.peak.get(destination, 0), self.in_flight[destination])
        try:
            if destination in self.stalled:
                self.go.wait(10)
            self.delivered.append(msg.id)
            return [Outcome(SENT)] * len(msg.recipients)
        finally:
            self.in_flight[destination] -= 1

    def close(self) -> None:
        pass


def enqueue(spool: Spool, rcpt: str) -> str:
    writer = spool.open_message()
    writer.write(MESSAGE)
    envelope = Envelope(writer.id, time.time(), "s@example.test", [Recipient(rcpt, rcpt)], ClientInfo("192.0.2.1"),
                        size=len(MESSAGE))
    spool.commit(writer, envelope)
    return envelope.id


def manager(tmp_path, remote: Remote, **queue) -> tuple[QueueManager, Spool]:
    spool = Spool(tmp_path / "spool")
    spool.setup()
    return QueueManager(spool, Router(remote, lambda domain: False, remote), QueueConfig(**queue)), spool


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        gevent.sleep(0.01)


def test_the_loop_sleeps_until_the_next_due_entry_and_a_nearer_defer_wakes_it(tmp_path):
    qm, _ = manager(tmp_path, Remote(set()), scan_interval=30.0)
    assert qm._pause() == 30.0  # nothing scheduled: scan_interval
    qm.schedule.add("A" * 23, time.time() + 5)
    assert 4.5 < qm._pause() <= 5.0
    qm._wakeup.clear()
    qm._schedule("B" * 23, time.time() + 60)  # later than the loop's wake-up: nothing to do
    assert not qm._wakeup.is_set()
    qm._schedule("C" * 23, time.time() + 1)  # earlier: the loop is woken to sleep less
    assert qm._wakeup.is_set()
    assert 0.5 < qm._pause() <= 1.0
    qm.schedule.add("D" * 23, time.time() - 10)
    assert qm._pause() == 0.0  # overdue: at once


def test_a_stalled_destination_gets_its_limit_and_the_others_go_on(tmp_path):
    remote = Remote({"slow.test"})
    qm, spool = manager(tmp_path, remote, concurrency=10, destination_concurrency=2)
    slow = [enqueue(spool, f"u{i}@slow.test") for i in range(6)]
    fast = [enqueue(spool, f"u{i}@fast.test") for i in range(4)]
    qm.start()
    try:
        # fast.test has the same limit: its last two wait for its first two, not for slow.test
        wait_until(lambda: set(fast) <= set(remote.delivered))
        # two slow ones in delivery, the other four back in deferred/ (unclaimed, due) and parked
        assert remote.in_flight["slow.test"] == 2 and len(qm.destinations) == 4
        assert len(spool.ids("active")) == 2 and len(spool.ids("deferred")) == 4
        assert qm.destinations.in_delivery("relay:slow.test") == 2
        # a scan now starts none of them: their destination is still full, nothing is claimed
        assert qm.run_once() == 0 and len(spool.ids("active")) == 2
        remote.go.set()  # the destination answers again: each ending delivery lets the next go
        wait_until(lambda: set(slow) <= set(remote.delivered))
        wait_until(lambda: not spool.ids("active"))
    finally:
        qm.stop()
    assert remote.peak["slow.test"] == 2 and len(qm.destinations) == 0
    assert not any(spool.ids(state) for state in ("incoming", "active", "deferred"))
    assert sorted(remote.delivered) == sorted(slow + fast)


def test_a_parked_entry_flushed_or_held_meanwhile_is_found_where_it_went(tmp_path):
    remote = Remote({"slow.test"})
    qm, spool = manager(tmp_path, remote, concurrency=10, destination_concurrency=1)
    first, flushed, held = (enqueue(spool, f"u{i}@slow.test") for i in range(3))
    qm.start()
    try:
        wait_until(lambda: len(qm.destinations) == 2)
        assert spool.move(flushed, "deferred", "incoming")  # geosmtp-queue flush
        assert spool.move(held, "deferred", "hold")  # geosmtp-queue hold
        assert qm.run_once() == 0  # the flushed one keeps its place in the line: not started twice
        remote.go.set()
        wait_until(lambda: flushed in remote.delivered)
        wait_until(lambda: not spool.ids("active"))
    finally:
        qm.stop()
    assert sorted(remote.delivered) == sorted([first, flushed])
    assert spool.ids("hold") == [held] and len(qm.destinations) == 0
