"""End to end: SIGTERM drains (readyz 503 first, listeners close after drain_delay, idle
sessions get 421 4.3.2, a transaction in progress may finish within drain_timeout, the rest
get 421), nothing acknowledged is lost, and the exit status is 0."""
from __future__ import annotations

import signal
import socket
import time

from geosmtp import replies
from tests.support.e2e import connect, expect, queue_id, readyz, start_data
from tests.support.server import ServerProcess, free_port



def start(tmp_path, **server) -> ServerProcess:
    mport = free_port()
    srv = ServerProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"}, "server": server})
    srv.metrics_port = mport
    return srv.start()


def test_drain_finishes_the_transaction_and_turns_the_rest_away(tmp_path):
    srv = start(tmp_path, drain_delay="1s", drain_timeout="10s")
    idle = connect(srv.port)
    busy = connect(srv.port)
    assert busy.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
    assert readyz(srv.metrics_port) == 200
    srv.proc.send_signal(signal.SIGTERM)
    # the balancer hears first; the listeners still accept during drain_delay
    srv.wait_for(lambda: readyz(srv.metrics_port) == 503, timeout=5)
    late = connect(srv.port)
    # after the delay: idle sessions are told at once
    expect(idle.reply(), replies.SHUTTING_DOWN)
    expect(late.reply(), replies.SHUTTING_DOWN)
    assert idle.closed() and late.closed()
    # new connections are refused
    srv.wait_for(lambda: _refused(srv.port), timeout=5)
    # the transaction in progress may finish, and is acknowledged for real
    assert busy.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: drained\r\n\r\nmade it\r\n.\r\n")
    qid = queue_id(busy.reply())
    # and then that session is closed too
    expect(busy.cmd("MAIL FROM:<x@remote.test>"), replies.SHUTTING_DOWN)
    assert srv.proc.wait(20) == 0
    assert (srv.spool / "msg" / qid).exists() or any(qid in p.name for p in srv.maildir("alice@example.test").rglob("*"))


def test_drain_timeout_closes_a_slow_transaction_without_acknowledging_it(tmp_path):
    srv = start(tmp_path, drain_timeout="1s")
    slow = connect(srv.port)
    start_data(slow, "x@remote.test", ["alice@example.test"])
    slow.send(b"Subject: half\r\n\r\nnever finished\r\n")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    expect(slow.reply(), replies.SHUTTING_DOWN)
    assert time.monotonic() - started < 8
    assert srv.proc.wait(20) == 0
    assert srv.queue_files("incoming") == [] and not srv.messages("alice@example.test")


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_drain_with_workers(tmp_path):
    """workers = 2: SIGTERM to the master reaches both workers; each finishes the
    transactions it has open and turns its idle sessions away; the master exits 0 and
    every acknowledged message is delivered exactly once, now or after a restart."""
    srv = start(tmp_path, workers=2, drain_delay="1s", drain_timeout="10s")
    srv.wait_for(lambda: len({line.split()[3] for line in srv.log().splitlines()
                              if f"listening on 127.0.0.1:{srv.port}" in line}) == 2)
    clients, seen = [], len(srv.log())  # the start-up probe's session does not count
    for _ in range(40):  # until both workers hold sessions (the kernel picks; bounded)
        clients.append(connect(srv.port))
        pids = {line.split()[3] for line in srv.log()[seen:].splitlines() if "connect from" in line}
        if len(clients) >= 6 and len(pids) >= 2:
            break
    assert len(pids) >= 2, "the kernel gave every connection to one worker"
    busy, idle = clients[::2], clients[1::2]
    for c in busy:
        assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_for(lambda: readyz(srv.metrics_port) == 503, timeout=5)
    for c in idle:
        expect(c.reply(), replies.SHUTTING_DOWN)
        assert c.closed()
    qids = []
    for n, c in enumerate(busy):
        assert c.cmd("DATA")[0] == 354
        c.send(f"Subject: drained {n}\r\n\r\nmade it\r\n.\r\n".encode())
        qids.append(queue_id(c.reply()))
        expect(c.cmd("NOOP"), replies.SHUTTING_DOWN)
    assert srv.proc.wait(30) == 0
    assert "Traceback" not in srv.log()

    again = ServerProcess(tmp_path / "again", {"server": {"spool_dir": str(srv.spool)},
                                               "local": {"maildir_root": str(srv.maildir_root)}}).start()
    try:
        delivered = again.wait_for(lambda: len(srv.messages("alice@example.test")) == len(qids)
                                   and srv.messages("alice@example.test"))
        for qid in qids:
            assert sum(qid.encode() in m for m in delivered) == 1, qid
    finally:
        assert again.stop() == 0
