"""End to end: the queue manager retries at the time a retry is due (not at the next scan),
and one dead destination holds at most destination_concurrency deliveries while mail to
other destinations goes out at once. Real server process, fake DNS, fake MX servers."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.e2e import Remotes, connect, queue_id, relay_config, remote_domain, send_message, submit
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import pick_port
from tests.support.server import ServerProcess

TRUSTED = "127.0.0.2"
TOOL = [sys.executable, str(Path(__file__).resolve().parents[2] / "bin" / "geosmtp-queue")]


@pytest.fixture
def dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def net(dns):
    remotes = Remotes(dns, pick_port(["127.0.0.1"]))
    yield remotes
    remotes.close()


def start(tmp_path, dns, net, **queue) -> ServerProcess:
    overrides = relay_config(dns, net.port)
    overrides["queue"] = queue
    return ServerProcess(tmp_path, overrides).start()


def test_a_two_second_retry_is_tried_two_seconds_later(tmp_path, dns, net):
    """retry_schedule starts at 2 s, scan_interval is 30 s: the second attempt comes about
    2 s after the first (before, it waited for the next scan of deferred/)."""
    tried: list[float] = []

    def refuse_then_accept(message) -> str:
        tried.append(time.monotonic())
        return "451 4.3.0 try again later" if len(tried) == 1 else "250 2.0.0 Ok: queued"

    domain, mx = remote_domain(net, final_reply=refuse_then_accept)
    srv = start(tmp_path, dns, net, scan_interval=30, retry_schedule=[2])
    try:
        submit(srv, [f"bob@{domain}"])
        [msg] = mx.wait_for_messages(1, timeout=10)
        assert len(tried) == 2
        waited = tried[1] - tried[0]
        assert 1.8 <= waited <= 3.5, waited  # the next scan would have been 30 s later
        assert msg.rcpt_tos == [f"bob@{domain}"]
    finally:
        srv.stop()


def test_a_defer_earlier_than_the_next_due_entry_rearms_the_sleep(tmp_path, dns, net):
    """The queue manager sleeps until the next due entry (here a retry 20 s away); a message
    deferred meanwhile for 2 s wakes it 2 s later, not at that next entry's time."""
    fast_tries: list[float] = []

    def refuse_twice(message) -> str:
        fast_tries.append(time.monotonic())
        return "451 4.3.0 try again later" if len(fast_tries) <= 2 else "250 2.0.0 Ok: queued"

    slow, slow_mx = remote_domain(net, final_reply="451 4.3.0 try again later")
    fast, fast_mx = remote_domain(net, final_reply=refuse_twice)
    # after a first failure a message waits 20 s, after a second one 2 s
    srv = start(tmp_path, dns, net, scan_interval=60, retry_schedule=[20, 2])
    try:
        slow_id = submit(srv, [f"bob@{slow}"])
        fast_id = submit(srv, [f"bob@{fast}"])
        for qid in (slow_id, fast_id):
            srv.wait_for(lambda: qid in srv.queue_files("deferred"), timeout=10)
        # the fast message is flushed: it fails again and is deferred for 2 s, while the
        # loop sleeps towards the first retry, about 20 s away
        flushed = subprocess.run([*TOOL, "-c", str(srv.config_path), "flush", fast_id], capture_output=True,
                                 text=True, timeout=30)
        assert flushed.returncode == 0, flushed.stderr
        [msg] = fast_mx.wait_for_messages(1, timeout=10)
        assert len(fast_tries) == 3
        waited = fast_tries[2] - fast_tries[1]
        assert 1.8 <= waited <= 3.5, waited  # not about 20 s: the slow message's retry
        assert slow_id in srv.queue_files("deferred")  # its own time has not come
        assert len(slow_mx.transactions) == 1
    finally:
        srv.stop()


def send_many(port: int, rcpts: list[str]) -> list[str]:
    """One message per recipient over one connection from the trusted network; the ids."""
    ids = []
    with connect(port, source=TRUSTED) as c:
        for rcpt in rcpts:
            ids.append(queue_id(send_message(c, "alice@example.test", [rcpt], b"Subject: x\r\n\r\nhi\r\n")))
    return ids


def test_a_dead_destination_holds_only_its_share_of_the_pool(tmp_path, dns, net):
    """300 messages for a destination that accepts connections and never answers, then mail
    for another destination: at most destination_concurrency (5) deliveries wait on the
    dead one (of a pool of 30; before, the dead one took all 30 and the live mail waited
    for their timeouts), the others are not claimed (they stay in deferred/ or incoming/),
    and the live mail is delivered at once. Once the dead destination answers again, all
    300 arrive."""
    dead, dead_mx = remote_domain(net, hang_at="greeting", hang_timeout=10.0)
    live, live_mx = remote_domain(net)
    overrides = relay_config(dns, net.port, command_timeout=30, per_destination=10)
    overrides["queue"] = {"scan_interval": 1, "retry_schedule": [1], "concurrency": 30,
                          "destination_concurrency": 5}
    srv = ServerProcess(tmp_path, overrides).start()
    try:
        dead_ids = send_many(srv.port, [f"u{i}@{dead}" for i in range(300)])
        srv.wait_for(lambda: dead_mx.connections >= 5, timeout=10)
        began = time.monotonic()
        send_many(srv.port, [f"u{i}@{live}" for i in range(20)])
        live_mx.wait_for_messages(20, timeout=8)
        took = time.monotonic() - began
        assert took < 6.0, took  # the dead ones hang for 10 s: the live mail did not wait for them
        assert dead_mx.connections == 5  # no more than its limit, and none closed yet
        active = srv.queue_files("active")
        assert len(set(active) & set(dead_ids)) <= 5
        waiting = set(srv.queue_files("deferred")) | set(srv.queue_files("incoming"))
        assert len(waiting & set(dead_ids)) >= 290  # not claimed: where geosmtp-queue sees them
        # the destination comes back: every parked message is delivered, none is lost
        dead_mx.hang_at = None
        dead_mx.wait_for_messages(300, timeout=60)
        srv.wait_for(lambda: not any(srv.queue_files(s) for s in ("incoming", "active", "deferred")), timeout=20)
        assert sorted(r for m in dead_mx.messages for r in m.rcpt_tos) == sorted(f"u{i}@{dead}" for i in range(300))
    finally:
        dead_mx.stop()  # hung connections end: the server stops without waiting for them
        srv.stop()
