"""End to end: PIPELINING (RFC 2920). Commands sent in one write get exactly one reply each, in
order, whatever fails on the way; a server never waits for more input while replies are due."""
import base64
import contextlib
import json
import os
import signal
import smtplib
import time

import pytest

from geosmtp import replies
from tests.support.e2e import (
    code, connect, expect, known_ids, nothing_more, queue_id, send_marker, wait_closed, wait_delivered,
)
from tests.support.server import PASSWORDS, ServerProcess
from tests.support.smtp import RawClient


def replies_to(c, n):
    return [code(c.reply()) for _ in range(n)]


def test_pipelined_transaction(server):
    c = connect(server.port)
    c.send(b"MAIL FROM:<p@remote.test>\r\n"
           b"RCPT TO:<alice@example.test>\r\n"
           b"RCPT TO:<nobody@example.test>\r\n"
           b"RCPT TO:<bob@example.test>\r\n"
           b"DATA\r\n")
    assert replies_to(c, 4) == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    assert nothing_more(c)  # exactly five replies
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    qid = queue_id(c.reply())
    assert c.reply()[0] == 221
    assert wait_closed(c)
    assert c.buf == b""
    c.close()
    for rcpt in ("alice@example.test", "bob@example.test"):
        assert wait_delivered(server, rcpt, qid).endswith(b"Subject: pipelined\n\nbody\n")


def test_whole_session_in_two_writes(server):
    """EHLO to DATA in one write (the client may not pipeline past DATA), then the rest."""
    c = connect(server.port, ehlo=None)
    c.send(b"EHLO client.test\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<carol@other.test>\r\nDATA\r\n")
    code_, lines = c.reply()
    assert code_ == 250 and "PIPELINING" in lines
    assert replies_to(c, 2) == ["250 2.1.0", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    c.send(b"Subject: one\r\n\r\n1\r\n.\r\n"
           b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<carol@other.test>\r\nDATA\r\n")
    first = queue_id(c.reply())
    assert replies_to(c, 2) == ["250 2.1.0", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    c.send(b"Subject: two\r\n\r\n2\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    second = queue_id(c.reply())
    assert replies_to(c, 2) == ["250 2.0.0", "250 2.0.0"]
    assert c.reply()[0] == 221
    assert wait_closed(c)
    c.close()
    assert first != second
    assert wait_delivered(server, "carol@other.test", first).endswith(b"\n\n1\n")
    assert wait_delivered(server, "carol@other.test", second).endswith(b"\n\n2\n")


def test_pipelined_errors_get_one_reply_each_in_order(server):
    c = connect(server.port)
    batch = [
        ("RCPT TO:<alice@example.test>", "503 5.5.1"),  # no MAIL yet
        ("MAIL FROM:<p@remote.test>", "250 2.1.0"),
        ("MAIL FROM:<q@remote.test>", "503 5.5.1"),  # nested
        ("RCPT TO:<alice@example.test>", "250 2.1.5"),
        ("BOGUS", "500 5.5.2"),
        ("RCPT TO:<someone@remote.test>", "554 5.7.1"),
        ("RCPT TO:bob@example.test", "501 5.5.4"),
        ("RCPT TO:<bob@example.test> NOTIFY=NEVER", "555 5.5.4"),
        ("NOOP " + "x" * 600, "500 5.5.6"),
        ("VRFY bob", "252 2.1.5"),
        ("EXPN team", "502 5.5.1"),
        ("RCPT TO:<nobody@example.test>", "550 5.1.1"),
        ("RCPT TO:<jörg@example.test>", "553 5.6.7"),
        ("NOOP", "250 2.0.0"),
        ("RSET", "250 2.0.0"),
        ("DATA", "503 5.5.1"),
        ("MAIL FROM:<p@remote.test> SIZE=999999999999", "552 5.3.4"),
        ("MAIL FROM:<p@remote.test>", "250 2.1.0"),
        ("RCPT TO:<nobody@example.test>", "550 5.1.1"),
        ("DATA", "554 5.5.1"),
        ("HELP", "214 2.0.0"),
    ]
    c.send("".join(f"{line}\r\n" for line, _ in batch).encode())
    assert replies_to(c, len(batch)) == [want for _, want in batch]
    assert nothing_more(c)
    c.close()


def test_pipelined_rcpts_after_a_refused_mail_are_refused(server):
    before = known_ids(server)
    c = connect(server.port)
    c.send(b"MAIL FROM:<bad address>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nRSET\r\n")
    got = [code(c.reply()) for _ in range(4)]
    assert got[0].startswith("501") and got[1:] == ["503 5.5.1", "503 5.5.1", "250 2.0.0"]
    c.close()
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}


def test_pipelined_data_with_no_valid_recipient_does_not_read_a_body(server):
    c = connect(server.port)
    c.send(b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n")
    assert replies_to(c, 3) == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]
    # the server is back to reading commands
    assert c.code("NOOP") == "250 2.0.0"
    c.close()


def test_many_pipelined_commands(server):
    c = connect(server.port, source="127.0.0.2")
    n = 300
    c.send(b"".join(b"RSET\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<x%d@remote.test>\r\n" % i for i in range(n)))
    got = replies_to(c, 3 * n)
    assert got == ["250 2.0.0", "250 2.1.0", "250 2.1.5"] * n
    assert nothing_more(c)
    c.close()


def test_pipelined_replies_are_flushed_before_waiting(server):
    """An unfinished line after a batch must not hold back the replies to the batch."""
    c = connect(server.port)
    c.send(b"NOOP\r\nMAIL FROM:<p@remote.test>\r\nRCPT TO:<ali")
    assert replies_to(c, 2) == ["250 2.0.0", "250 2.1.0"]
    c.send(b"ce@example.test>\r\n")
    assert code(c.reply()) == "250 2.1.5"
    c.close()


def test_pipelined_relay_recipients_from_trusted_client(server):
    c = connect(server.port, source="127.0.0.2")
    c.send(b"MAIL FROM:<p@example.test>\r\nRCPT TO:<x@remote.test>\r\nRCPT TO:<y@remote.test>\r\n"
           b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert replies_to(c, 4) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    c.send(b"Subject: pipe relay\r\n\r\nx\r\n.\r\nQUIT\r\n")
    qid = queue_id(c.reply())
    assert c.reply()[0] == 221
    c.close()
    wait_delivered(server, "alice@example.test", qid)
    server.wait_for(lambda: qid in server.queue_files("deferred"))
    env = json.loads((server.spool / "queue" / "deferred" / qid).read_text())
    pending = sorted(r["address"] for r in env["recipients"] if r["status"] == "pending")
    assert pending == ["x@remote.test", "y@remote.test"]


# -- not waiting for the server (Postfix 3.9 smtpd_forbid_unauth_pipelining) -----------------
# RFC 2920 3.1: DATA ends a group, and nothing may come before the greeting. A client that
# does not wait is a bot: 554 5.5.0, the session closed, nothing queued.
MESSAGE = b"Subject: %s\r\n\r\nbody\r\n.\r\n"


def replay(n: int = 2) -> bytes:
    """A recorded session sent blindly: n whole transactions, no reply waited for."""
    return b"".join(b"MAIL FROM:<bot@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                    + MESSAGE % b"replay %d" % i for i in range(n))


@pytest.fixture(scope="module")
def plain_auth(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("pipe-auth"),
                        {"listeners": {"submission": {"allow_plaintext_auth": True}}}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("pipe-off"), {"server": {"forbid_unauth_pipelining": False}}).start()
    yield srv
    srv.stop()


@contextlib.contextmanager
def stopped(srv: ServerProcess):
    """The server process frozen: connections complete in the kernel's backlog and what a
    client sends waits there, so the server finds it before it could greet."""
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)


def early_client(srv: ServerProcess, data: bytes, source: str | None = None) -> RawClient:
    with stopped(srv):
        c = RawClient(srv.port, source=source)
        c.send(data)
        time.sleep(0.05)  # on loopback the bytes are in the server's socket at once; margin
    return c


def assert_refused_and_closed(c: RawClient, got) -> None:
    expect(got, replies.PROTOCOL_SYNC)
    assert wait_closed(c)
    c.close()


def test_commands_before_the_greeting(server):
    before = known_ids(server)
    c = early_client(server, b"EHLO bot.test\r\n" + replay(1))
    assert_refused_and_closed(c, c.reply())  # instead of the 220
    assert "improper pipelining before the greeting" in server.log()
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}


def test_input_after_data_before_354(server):
    before = known_ids(server)
    c = connect(server.port)
    c.send(b"MAIL FROM:<bot@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n" + MESSAGE % b"one")
    assert replies_to(c, 2) == ["250 2.1.0", "250 2.1.5"]
    assert_refused_and_closed(c, c.reply())  # instead of the 354
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}


def test_replayed_session_queues_nothing(server):
    """Before: the second message, sent before its 354, was queued."""
    before = known_ids(server)
    c = connect(server.port)
    c.send(replay(2))
    assert replies_to(c, 2) == ["250 2.1.0", "250 2.1.5"]
    assert_refused_and_closed(c, c.reply())
    marker = send_marker(server)
    assert known_ids(server) - before == {marker}


def test_data_answered_with_354_only_once_the_client_waits(server):
    """The same bytes, DATA last in its write: legal PIPELINING (RFC 2920 3.1)."""
    c = connect(server.port)
    c.send(b"MAIL FROM:<p@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert replies_to(c, 2) == ["250 2.1.0", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    c.send(MESSAGE % b"waited" + b"QUIT\r\n")  # after the end of data, commands again
    qid = queue_id(c.reply())
    assert c.reply()[0] == 221
    c.close()
    wait_delivered(server, "alice@example.test", qid)


def test_smtplib_still_works(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("pipelining")
        assert s.sendmail("p@remote.test", ["alice@example.test"], b"Subject: smtplib\r\n\r\nhi\r\n") == {}


def test_trusted_network_may_pipeline_anything(server):
    before = known_ids(server)
    c = early_client(server, b"EHLO trusted.test\r\n" + replay(2), source="127.0.0.2")
    assert c.reply()[0] == 220
    assert c.reply()[0] == 250  # EHLO
    got = [code(c.reply()) for _ in range(8)]
    assert [g[:3] for g in got] == ["250", "250", "354", "250"] * 2
    c.close()
    marker = send_marker(server)
    assert len(known_ids(server) - before - {marker}) == 2


def test_authenticated_client_may_pipeline_past_data(plain_auth):
    before = known_ids(plain_auth)
    c = connect(plain_auth.submission_port)
    token = base64.b64encode(b"\0alice@example.test\0" + PASSWORDS["alice@example.test"].encode())
    assert c.code(b"AUTH PLAIN " + token) == "235 2.7.0"
    c.send(replay(2).replace(b"bot@remote.test", b"alice@example.test"))
    got = [code(c.reply()) for _ in range(8)]
    assert [g[:3] for g in got] == ["250", "250", "354", "250"] * 2
    c.close()
    marker = send_marker(plain_auth)
    assert len(known_ids(plain_auth) - before - {marker}) == 2


def test_not_yet_authenticated_on_submission_is_checked(plain_auth):
    with stopped(plain_auth):
        c = RawClient(plain_auth.submission_port)
        c.send(b"EHLO bot.test\r\nAUTH PLAIN\r\n")
        time.sleep(0.05)
    assert_refused_and_closed(c, c.reply())


def test_setting_off_allows_both(allowed):
    before = known_ids(allowed)
    c = early_client(allowed, b"EHLO old.test\r\n" + replay(2))
    assert c.reply()[0] == 220
    assert c.reply()[0] == 250
    got = [code(c.reply()) for _ in range(8)]
    assert [g[:3] for g in got] == ["250", "250", "354", "250"] * 2
    c.close()
    marker = send_marker(allowed)
    assert len(known_ids(allowed) - before - {marker}) == 2
