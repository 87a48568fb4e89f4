"""End to end: PIPELINING (RFC 2920). Commands sent in one write get exactly one reply each, in
order, whatever fails on the way; a server never waits for more input while replies are due."""
import json

from geosmtp import replies
from tests.support.e2e import (
    code, connect, known_ids, nothing_more, queue_id, send_marker, wait_closed, wait_delivered,
)


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
