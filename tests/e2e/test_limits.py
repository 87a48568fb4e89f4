"""End to end: limits and abuse (SPEC "Limits and abuse") — timeouts, too many errors,
connection limits, floods and garbage — and that one client's trouble never reaches another."""
import random
import socket
import threading
import time

import pytest

from geosmtp import replies
from tests.e2e.test_proxy_protocol import BALANCER, header, proxied
from tests.support.haproxy import LOCAL_HEADER
from tests.support.e2e import (
    abort, code, connect, expect, known_ids, nothing_more, queue_id, rss_kib, send_marker, send_message,
    spool_tmp, start_data, wait_closed, wait_delivered,
)
from tests.support.server import ServerProcess
from tests.support.smtp import RawClient

TIMEOUT = 1  # seconds: command_timeout and data_timeout of the `strict` server
MAX_ERRORS = 3


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("strict"), {
        "limits": {"command_timeout": TIMEOUT, "data_timeout": TIMEOUT, "max_errors": MAX_ERRORS},
    }).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("crowded"), {
        "limits": {"max_connections": 3, "max_connections_per_ip": 2},
    }).start()
    yield srv
    srv.stop()


def reply_or_closed(c: RawClient, timeout: float):
    """The next reply, or None if the connection closed (or was reset) first."""
    c.sock.settimeout(timeout)
    try:
        return c.reply()
    except (ConnectionError, OSError):
        return None


def timed_reply(c: RawClient, timeout: float):
    start = time.monotonic()
    reply = reply_or_closed(c, timeout)
    return reply, time.monotonic() - start


# -- timeouts -------------------------------------------------------------------------------
def test_idle_client_gets_421_4_4_2_and_is_closed(strict):
    c = connect(strict.port, ehlo=None)
    reply, took = timed_reply(c, TIMEOUT + 4)
    assert reply is not None, "closed without a reply"
    expect(reply, replies.COMMAND_TIMEOUT)
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3
    assert wait_closed(c)
    c.close()


def test_idle_client_in_a_transaction_times_out_and_nothing_is_queued(strict):
    before = known_ids(strict)
    c = connect(strict.port)
    assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
    reply, took = timed_reply(c, TIMEOUT + 4)
    expect(reply, replies.COMMAND_TIMEOUT)
    assert wait_closed(c)
    c.close()
    assert known_ids(strict) == before


def test_slow_drip_is_cut_off_by_the_whole_line_timeout(strict):
    """One byte every 0.3 s never lets a single read time out; the line as a whole must."""
    c = connect(strict.port)
    line = b"MAIL FROM:<a@remote.test>\r\n"
    start = time.monotonic()
    reply = None
    for byte in line:  # bounded: 27 bytes, 8 s at most
        try:
            c.send(bytes([byte]))
        except OSError:
            break
        if not nothing_more(c, 0.3):
            break
    reply = reply_or_closed(c, 3)
    took = time.monotonic() - start
    assert reply is not None, "closed without a reply"
    expect(reply, replies.COMMAND_TIMEOUT)
    assert took < TIMEOUT + 2.5, f"cut off only after {took:.1f}s"
    assert wait_closed(c)
    c.close()


def test_slow_but_steady_client_is_not_cut_off(strict):
    """The timeout is per command, not per session."""
    c = connect(strict.port)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < TIMEOUT * 2.5:  # bounded by time
        assert c.code("NOOP") == "250 2.0.0"
        n += 1
        time.sleep(TIMEOUT * 0.5)
    queue_id(send_message(c, "a@remote.test", ["bob@example.test"], b"Subject: steady\r\n\r\nok"))
    assert n >= 4
    c.close()


def test_data_timeout_is_421_4_4_2_and_nothing_is_queued(strict):
    before = known_ids(strict)
    c = connect(strict.port)
    start_data(c, "a@remote.test", ["alice@example.test"])
    c.send(b"Subject: stalled\r\n\r\nhalf a line")
    reply, took = timed_reply(c, TIMEOUT + 4)
    assert reply is not None, "closed without a reply"
    expect(reply, replies.DATA_TIMEOUT)
    assert took < TIMEOUT + 3
    assert wait_closed(c)
    c.close()
    marker = send_marker(strict)
    assert known_ids(strict) - before == {marker}
    assert not spool_tmp(strict)


def test_data_timeout_right_after_354(strict):
    before = known_ids(strict)
    c = connect(strict.port)
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    expect(reply_or_closed(c, TIMEOUT + 4), replies.DATA_TIMEOUT)
    c.close()
    marker = send_marker(strict)
    assert known_ids(strict) - before == {marker}


@pytest.fixture(scope="module")
def paced(tmp_path_factory):
    """A message body may be silent 5 s at a time, but must average 1000 B/s with 1 s in hand."""
    srv = ServerProcess(tmp_path_factory.mktemp("paced"), {
        "limits": {"data_timeout": 5, "data_deadline": 1, "min_data_rate": 1000},
    }).start()
    yield srv
    srv.stop()


def test_data_dripped_below_the_minimum_rate_is_451_4_4_2_closed_and_not_queued(paced):
    before = known_ids(paced)
    c = connect(paced.port)
    start_data(c, "a@remote.test", ["alice@example.test"])
    c.send(b"Subject: drip\r\n\r\n")
    start = time.monotonic()
    for _ in range(40):  # one byte every 0.2 s never meets the 5 s silence; bounded: 8 s
        try:
            c.send(b"x")
        except OSError:
            break
        if not nothing_more(c, 0.2):
            break
    took = time.monotonic() - start
    expect(reply_or_closed(c, 3), replies.DATA_TOO_SLOW)
    assert 0.8 < took < 2.5, took
    assert wait_closed(c)
    c.close()
    marker = send_marker(paced)
    assert known_ids(paced) - before == {marker}
    assert not spool_tmp(paced)
    assert "message refused: too slow" in paced.log()


def test_data_at_a_good_rate_outlasts_the_deadline(paced):
    c = connect(paced.port)
    start_data(c, "a@remote.test", ["alice@example.test"])
    start = time.monotonic()
    for _ in range(20):  # 2,000 octets every 0.1 s (20 kB/s) for 2 s: twice the deadline
        c.send(b"y" * 1998 + b"\r\n")
        time.sleep(0.1)
    c.send(b".\r\n")
    qid = queue_id(c.reply())
    assert time.monotonic() - start > 1.5
    c.close()
    wait_delivered(paced, "alice@example.test", qid)


# -- too many errors ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["BOGUS", "MAIL FROM:nobrackets", "RCPT TO:<alice@example.test>", "EXPN x"])
def test_too_many_errors_is_421_4_7_0_and_close(strict, bad):
    c = connect(strict.port)
    got = []
    for _ in range(MAX_ERRORS + 1):  # bounded
        try:
            c.send((bad + "\r\n").encode())
        except OSError:
            break
        reply = reply_or_closed(c, 5)
        if reply is None:
            break
        got.append(reply)
        if reply[0] == 421:
            break
    assert got, "closed without a reply"
    expect(got[-1], replies.TOO_MANY_ERRORS)
    # RFC-wise either the limit-th error or the one after it is answered with 421
    assert len(got) in (MAX_ERRORS, MAX_ERRORS + 1), got
    assert all(500 <= r[0] < 600 for r in got[:-1]), got
    assert wait_closed(c)
    c.close()


def test_too_many_errors_in_a_pipelined_batch(strict):
    c = connect(strict.port)
    c.send(b"BOGUS\r\n" * 10 + b"NOOP\r\n")
    got = []
    while True:  # bounded: the server closes, at most 11 replies
        reply = reply_or_closed(c, 5)
        if reply is None:
            break
        got.append(code(reply))
        assert len(got) <= 11
    assert got[-1] == "421 4.7.0", got
    assert len(got) <= MAX_ERRORS + 1 and got.count("421 4.7.0") == 1, got
    c.close()


def test_errors_are_counted_per_session(strict):
    for _ in range(3):  # each new session starts from zero
        c = connect(strict.port)
        for _ in range(MAX_ERRORS - 1):
            expect(c.cmd("BOGUS"), replies.UNKNOWN_COMMAND)
        assert c.code("NOOP") == "250 2.0.0"
        c.close()


# -- connection limits ----------------------------------------------------------------------
def greeted(port, source, attempts=100):
    """A client that got 220, retrying (bounded) while an earlier session is still ending."""
    for _ in range(attempts):
        c = RawClient(port, source=source)
        reply = reply_or_closed(c, 5)
        if reply and reply[0] == 220:
            c.sock.settimeout(10)
            return c
        c.close()
        time.sleep(0.05)
    raise AssertionError("never greeted")


def refused(port, source):
    c = RawClient(port, source=source)
    reply = reply_or_closed(c, 5)
    closed = wait_closed(c)
    c.close()
    return reply, closed


def test_max_connections_per_ip(crowded):
    a = greeted(crowded.port, "127.0.0.3")
    b = greeted(crowded.port, "127.0.0.3")
    try:
        reply, closed = refused(crowded.port, "127.0.0.3")
        expect(reply, replies.TOO_MANY_FROM_YOU)
        assert closed
        # another address is still welcome, and the two open sessions still work
        other = greeted(crowded.port, "127.0.0.4")
        assert other.cmd("EHLO other.test")[0] == 250
        other.close()
        for c in (a, b):
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    finally:
        a.close()
    # once one is gone, the address may connect again
    c = greeted(crowded.port, "127.0.0.3")
    c.close()
    b.close()


def test_a_full_listener_gives_the_longest_idle_slot_to_a_new_client(crowded):
    """max_connections reached: the newcomer is served, and the session that has sent nothing
    useful for longest (NOOP is not useful; an accepted MAIL is) gets 421 4.7.0."""
    clients = [greeted(crowded.port, "127.0.0.5"), greeted(crowded.port, "127.0.0.6"),
               greeted(crowded.port, "127.0.0.7")]
    try:
        assert clients[1].code("NOOP") == "250 2.0.0"
        assert clients[0].cmd("EHLO client.test")[0] == 250
        assert clients[0].code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        with connect(crowded.port, source="127.0.0.8") as newcomer:
            expect(reply_or_closed(clients[1], 5), replies.BUSY_CLOSING_IDLE)
            assert wait_closed(clients[1])
            assert newcomer.code("NOOP") == "250 2.0.0"
            assert clients[0].code("RCPT TO:<alice@example.test>") == "250 2.1.5"
            assert clients[2].code("NOOP") == "250 2.0.0"
            # the limit is per listener: submission still takes a connection, evicting nobody
            with connect(crowded.submission_port, source="127.0.0.8") as sub:
                assert sub.code("NOOP") == "250 2.0.0"
            assert nothing_more(clients[2]) and clients[2].code("NOOP") == "250 2.0.0"
    finally:
        for c in clients:
            c.close()
    assert "evicted to make room for a new client on smtp" in crowded.log()


def test_refused_connections_are_not_counted(crowded):
    """Connections refused with 421 must not use up slots themselves."""
    a = greeted(crowded.port, "127.0.0.9")
    b = greeted(crowded.port, "127.0.0.9")
    for _ in range(5):
        reply, _ = refused(crowded.port, "127.0.0.9")
        expect(reply, replies.TOO_MANY_FROM_YOU)
    a.close()
    b.close()
    c = greeted(crowded.port, "127.0.0.9")
    d = greeted(crowded.port, "127.0.0.9")
    c.close()
    d.close()


@pytest.fixture(scope="module")
def behind_balancer(tmp_path_factory):
    """A PROXY-protocol listener (the balancer is 127.0.0.1) with 2 sessions per client."""
    srv = ServerProcess(tmp_path_factory.mktemp("per-ip-v6"), {
        "limits": {"max_connections_per_ip": 2},
        "listeners": {"smtp": {"proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"]}}})
    srv.probe_prefix = LOCAL_HEADER
    srv.start()
    yield srv
    srv.stop()


def test_max_connections_per_ip_counts_an_ipv6_client_by_its_64(behind_balancer):
    """Three addresses of one /64 are one client (as for the rate limits); another /64 is not."""
    port = behind_balancer.port
    first = [proxied(port, header(2, f"2001:db8:1:2::{n}")) for n in (1, 2)]
    try:
        for c in first:
            assert c.reply()[0] == 220
        third = proxied(port, header(1, "2001:db8:1:2:ffff::3"))
        expect(reply_or_closed(third, 5), replies.TOO_MANY_FROM_YOU)
        assert wait_closed(third)
        third.close()
        with proxied(port, header(2, "2001:db8:1:3::1")) as other:  # the next /64
            assert other.reply()[0] == 220
            assert other.code("NOOP") == "250 2.0.0"
        with proxied(port, header(2, "192.0.2.10")) as v4:
            assert v4.reply()[0] == 220
    finally:
        for c in first:
            c.close()
    behind_balancer.wait_for(lambda: "refused [2001:db8:1:2:ffff::3]" in behind_balancer.log())


# -- floods and garbage ---------------------------------------------------------------------
def flood(port, payload: bytes, result: dict):
    """Connect, send payload in 64 kB pieces without waiting, record what came back."""
    try:
        c = connect(port, ehlo=None)
    except OSError as exc:
        result["error"] = exc
        return
    try:
        for i in range(0, len(payload), 65536):
            c.send(payload[i:i + 65536])
        result["sent"] = True
    except OSError:
        result["sent"] = False
    replies_ = []
    while len(replies_) < 1000:  # bounded
        reply = reply_or_closed(c, 5)
        if reply is None:
            break
        replies_.append(reply)
        if reply[0] == 421 or reply[1][-1].startswith("5.5.6 Line too long, closing"):
            break
    result["replies"] = replies_
    result["closed"] = wait_closed(c, 5)
    c.close()


def run_with_bystander(server, payload: bytes) -> dict:
    """Flood from one client while another runs a whole transaction; the flood's outcome."""
    bystander = connect(server.port)
    assert bystander.code("MAIL FROM:<b@remote.test>") == "250 2.1.0"
    result: dict = {}
    t = threading.Thread(target=flood, args=(server.port, payload, result), daemon=True)
    t.start()
    try:
        assert bystander.code("RCPT TO:<bob@example.test>") == "250 2.1.5"
        assert bystander.cmd("DATA")[0] == 354
        bystander.send(b"Subject: bystander\r\n\r\n" + (b"x" * 98 + b"\r\n") * 500 + b".\r\n")
        qid = queue_id(bystander.reply())
    finally:
        t.join(30)
    assert not t.is_alive()
    bystander.close()
    wait_delivered(server, "bob@example.test", qid)
    return result


def test_megabyte_without_line_end_is_refused_and_others_are_served(server):
    result = run_with_bystander(server, b"A" * (1 << 20))
    errors = [r for r in result.get("replies", []) if r[0] >= 400]
    assert errors or result.get("closed"), result
    assert all(r[0] >= 500 or r[0] == 421 for r in result["replies"]), result["replies"]


def test_nul_flood_is_refused_and_others_are_served(server):
    result = run_with_bystander(server, b"\x00" * (1 << 20))
    assert all(r[0] >= 400 for r in result.get("replies", [])), result
    assert result.get("replies") or result.get("closed")


def test_binary_garbage_gets_errors_and_others_are_served(server):
    garbage = random.Random(5321).randbytes(300_000)
    result = run_with_bystander(server, garbage)
    assert all(r[0] >= 400 for r in result.get("replies", [])), result["replies"][:5]
    assert result.get("replies") or result.get("closed")
    with connect(server.port) as c:  # and a fresh client afterwards
        queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: after garbage\r\n\r\nok"))


def test_garbage_lines_with_nul_and_high_bytes(server):
    c = connect(server.port)
    for line in [b"\x00\x01\x02", b"\xff\xfe\xfd\xfc", b"\x1b[2J", b"MAIL\x00FROM:<a@b.test>", b"\x80" * 400]:
        code_, _ = c.cmd(line)
        assert 500 <= code_ < 600, line
    expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)  # none of it began a transaction
    assert c.code("NOOP") == "250 2.0.0"
    c.close()


def test_memory_stays_bounded_under_a_data_flood(server):
    pid = server.proc.pid
    with connect(server.port) as warm:  # let the process reach its steady size first
        body = b"Subject: warm\r\n\r\n" + (b"w" * 98 + b"\r\n") * 1000
        queue_id(send_message(warm, "a@remote.test", ["alice@example.test"], body))
    before = rss_kib(pid)
    c = connect(server.port)
    start_data(c, "a@remote.test", ["alice@example.test"])
    chunk = b"F" * (1 << 20)
    peak = before
    for _ in range(48):  # 48 MB on one line, more than the whole message limit
        c.send(chunk)
        peak = max(peak, rss_kib(pid))
    c.send(b"\r\n.\r\n")
    code_, lines = c.reply()
    assert code_ == 552 and lines[-1].startswith("5.3.4"), (code_, lines)
    peak = max(peak, rss_kib(pid))
    c.close()
    assert peak - before < 24 * 1024, f"RSS grew by {(peak - before) // 1024} MB"


# -- one session's trouble never reaches another --------------------------------------------
@pytest.mark.parametrize("how", ["reset", "close"])
def test_client_vanishing_mid_data_harms_no_one(server, how):
    before = known_ids(server)
    a = connect(server.port)
    b = connect(server.port)
    for c, rcpt in ((a, "alice@example.test"), (b, "bob@example.test")):
        start_data(c, "x@remote.test", [rcpt])
    a.send(b"Subject: vanishing\r\n\r\n" + (b"a" * 98 + b"\r\n") * 2000)  # 200 kB, spilled to disk
    b.send(b"Subject: survivor\r\n\r\nfirst half\r\n")
    if how == "reset":
        abort(a)
    else:  # a clean FIN without the end of data: a truncated message must not be queued
        a.sock.shutdown(socket.SHUT_WR)
        assert wait_closed(a)
        a.close()
    b.send(b"second half\r\n.\r\n")
    qid = queue_id(b.reply())
    assert b.code("NOOP") == "250 2.0.0"
    b.close()
    assert wait_delivered(server, "bob@example.test", qid).endswith(b"\n\nfirst half\nsecond half\n")
    marker = send_marker(server)
    assert known_ids(server) - before == {qid, marker}
    assert not spool_tmp(server)


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt"])
def test_client_reset_at_any_stage(server, stage):
    before = known_ids(server)
    c = RawClient(server.port)
    if stage != "greeting":
        c.reply()
        c.cmd("EHLO reset.test")
    if stage in ("mail", "rcpt"):
        c.cmd("MAIL FROM:<x@remote.test>")
    if stage == "rcpt":
        c.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")  # and never read the replies
    abort(c)
    with connect(server.port) as other:
        assert other.code("NOOP") == "250 2.0.0"
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}


def test_stalled_client_does_not_slow_others(server):
    stalled = connect(server.port)
    start_data(stalled, "x@remote.test", ["alice@example.test"])
    stalled.send(b"Subject: stalled\r\n\r\npart")
    start = time.monotonic()
    for i in range(5):
        with connect(server.port) as c:
            queue_id(send_message(c, "y@remote.test", ["carol@other.test"], b"Subject: quick %d\r\n\r\nq" % i))
    assert time.monotonic() - start < 5
    stalled.close()


def test_many_concurrent_sessions(server):
    results: list = []

    def one(i):
        try:
            with connect(server.port, source=f"127.0.1.{i % 50 + 1}") as c:
                qid = queue_id(send_message(c, f"c{i}@remote.test", ["carol@other.test"],
                                            b"Subject: c%d\r\n\r\n" % i + b"z" * 5000))
                results.append(qid)
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 50 and all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 50
    for qid in results:
        wait_delivered(server, "carol@other.test", qid)
