"""End to end: DATA (SPEC "DATA") — 354, the end of data, dot-stuffing, our Received: header,
size and line limits, bare newlines; and "nothing is queued" whenever the answer is not 250."""
import re
import smtplib

import pytest

from geosmtp import replies
from tests.support.e2e import (
    start_data,
    HOSTNAME, connect, expect, known_ids, nothing_more, queue_id, send_marker, send_message, spool_tmp,
    wait_delivered,
)
from tests.support.server import ServerProcess

TRUSTED = "127.0.0.2"
MAX_SIZE = 10_000
MAX_LINE = 1_000


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """max_message_size 10000 and max_line_length 1000 (the smallest RFC 5321 allows)."""
    srv = ServerProcess(tmp_path_factory.mktemp("small"),
                        {"limits": {"max_message_size": MAX_SIZE, "max_line_length": MAX_LINE}}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def normalizing(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("normalize"), {"server": {"bare_newline": "normalize"}}).start()
    yield srv
    srv.stop()


def relay_and_read_spool(srv, body: bytes) -> tuple[str, bytes]:
    """Send to a remote recipient from the trusted network; the spooled message, byte for byte."""
    with connect(srv.port, source=TRUSTED) as c:
        qid = queue_id(send_message(c, "a@example.test", ["someone@remote.test"], body))
    return qid, srv.wait_for(lambda: srv.spooled(qid))


def split_received(stored: bytes) -> tuple[bytes, bytes]:
    """A spooled message → (our Received: header, the rest exactly as the client sent it)."""
    m = re.match(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", stored)
    assert m, stored[:300]
    return m.group(0), stored[m.end():]


# -- the basics -----------------------------------------------------------------------------
def test_354_then_queued_as_id_and_delivered(server):
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        code_, lines = c.cmd("DATA")
        assert code_ == 354 and lines == ["End data with <CR><LF>.<CR><LF>"]
        c.send(b"Subject: basics\r\n\r\nhello alice\r\n.\r\n")
        code_, lines = c.reply()
        assert code_ == 250
        m = re.fullmatch(r"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", lines[-1])
        assert m, lines
        qid = m.group(1)
    msg = wait_delivered(server, "alice@example.test", qid)
    assert msg.endswith(b"Subject: basics\n\nhello alice\n")


def test_queued_message_files_are_in_the_spool(server):
    qid, stored = relay_and_read_spool(server, b"Subject: spool\r\n\r\nbody")
    assert qid in server.queue_files("deferred") or qid in server.queue_files("incoming") \
        or qid in server.queue_files("active")
    received, rest = split_received(stored)
    assert rest == b"Subject: spool\r\n\r\nbody\r\n"
    assert f"id {qid}".encode() in received


def test_smtplib_sendmail(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
        refused = s.sendmail("a@remote.test", ["bob@example.test", "nobody@example.test"],
                             b"Subject: smtplib\r\n\r\n.leading dot\r\n")
    assert list(refused) == ["nobody@example.test"]
    msgs = server.wait_for(lambda: [m for m in server.messages("bob@example.test") if b"Subject: smtplib" in m])
    assert msgs[0].endswith(b"\n.leading dot\n")


def test_empty_message_is_accepted(server):
    with connect(server.port) as c:
        start_data(c, "a@remote.test", ["carol@other.test"])
        c.send(b".\r\n")
        qid = queue_id(c.reply())
    msg = wait_delivered(server, "carol@other.test", qid)
    assert msg.startswith(b"Return-Path: <a@remote.test>\nDelivered-To: carol@other.test\nReceived: ")


def test_dot_stuffing_is_undone(server):
    body = (b"Subject: dots\r\n\r\n"
            b"..x\r\n"
            b"..\r\n"
            b"...\r\n"
            b"x..y\r\n"
            b" .z\r\n"
            b"..\r\n"
            b"last")
    qid, stored = relay_and_read_spool(server, body)
    _, rest = split_received(stored)
    assert rest == b"Subject: dots\r\n\r\n.x\r\n.\r\n..\r\nx..y\r\n .z\r\n.\r\nlast\r\n"


def test_dot_stuffing_on_the_first_line(server):
    qid, stored = relay_and_read_spool(server, b"..first line\r\nsecond")
    _, rest = split_received(stored)
    assert rest == b".first line\r\nsecond\r\n"


def test_dot_lines_reach_the_mailbox(server):
    with connect(server.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["bob@example.test"],
                                    b"Subject: dots\r\n\r\n..x\r\n..\r\nend"))
    msg = wait_delivered(server, "bob@example.test", qid)
    assert msg.endswith(b"\n\n.x\n.\nend\n")


def test_terminator_split_across_packets(server):
    with connect(server.port) as c:
        start_data(c, "a@remote.test", ["alice@example.test"])
        for piece in (b"Subject: split\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
            assert nothing_more(c, 0.05)  # no reply before the whole terminator
            c.send(piece)
        qid = queue_id(c.reply())
    msg = wait_delivered(server, "alice@example.test", qid)
    assert msg.endswith(b"\n\nbody\n")


def test_large_message_is_stored_intact(server):
    # bigger than what is kept in memory before spilling to disk
    lines = [f"{i:06d} ".encode() + b"y" * 90 for i in range(20_000)]
    body = b"Subject: big\r\n\r\n" + b"\r\n".join(lines)
    qid, stored = relay_and_read_spool(server, body)
    _, rest = split_received(stored)
    assert rest == body + b"\r\n"


def test_eight_bit_body(server):
    body = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄÖÜ ß € \x7f\r\n".encode()
    with connect(server.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], body, "BODY=8BITMIME"))
    msg = wait_delivered(server, "alice@example.test", qid)
    assert "ÄÖÜ ß €".encode() in msg


# -- our Received: header -------------------------------------------------------------------
def test_received_header_comes_first(server):
    with connect(server.port, ehlo="client.example") as c:
        qid = queue_id(send_message(c, "sender@remote.test", ["alice@example.test"],
                                    b"Received: from earlier.test by elsewhere.test\r\nSubject: r\r\n\r\nx"))
    msg = wait_delivered(server, "alice@example.test", qid)
    lines = msg.decode().split("\n")
    assert lines[0] == "Return-Path: <sender@remote.test>"
    assert lines[1] == "Delivered-To: alice@example.test"
    assert lines[2] == "Received: from client.example ([127.0.0.1])"
    assert lines[3] == f"\tby {HOSTNAME} (geosmtp) with ESMTP id {qid}"
    assert lines[4].startswith("\tfor <alice@example.test>; ")
    assert lines[5] == "Received: from earlier.test by elsewhere.test"  # the client's own, after ours


def test_received_header_after_helo_says_smtp(server):
    with connect(server.port, ehlo=None) as c:
        assert c.cmd("HELO old.example")[0] == 250
        qid = queue_id(send_message(c, "sender@remote.test", ["alice@example.test", "bob@example.test"],
                                    b"Subject: r\r\n\r\nx"))
    msg = wait_delivered(server, "bob@example.test", qid)
    head = msg.decode().split("\n")
    assert head[2] == "Received: from old.example ([127.0.0.1])"
    assert head[3].startswith(f"\tby {HOSTNAME} (geosmtp) with SMTP id {qid}; ")  # no "for" with 2 recipients


def test_received_header_cannot_be_broken_by_the_helo_name(server):
    with connect(server.port, ehlo="evil)(\\x") as c:
        qid = queue_id(send_message(c, "sender@remote.test", ["alice@example.test"], b"Subject: r\r\n\r\nx"))
    msg = wait_delivered(server, "alice@example.test", qid)
    assert msg.split(b"\n")[2] == b"Received: from evil???x ([127.0.0.1])"


# -- size and line limits -------------------------------------------------------------------
def body_of_size(size: int) -> bytes:
    """A body whose size as RFC 1870 counts it (after unstuffing, with the CRLF that
    send_message adds, without the final ".CRLF") is exactly `size`; short lines only."""
    head = b"Subject: edge\r\n\r\n" + b"..\r\n" * 10  # 10 stuffed dots: 10 octets not counted
    counted = len(head) - 10 + 2
    filler = b"z" * 98 + b"\r\n"
    n, rest = divmod(size - counted, len(filler))
    body = head + filler * n + b"z" * rest
    assert len(body) - 10 + 2 == size
    return body


def test_message_of_exactly_the_size_limit_is_accepted(small):
    # RFC 1870: the size counts CRLFs, not the dot-stuffing and not the final ".CRLF"
    with connect(small.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], body_of_size(MAX_SIZE)))
    wait_delivered(small, "alice@example.test", qid)


def test_message_over_the_size_limit_is_552_after_the_whole_body(small):
    before = known_ids(small)
    with connect(small.port) as c:
        start_data(c, "a@remote.test", ["alice@example.test"])
        c.send(b"Subject: too big\r\n\r\n" + b"x" * 70 + b"\r\n")
        c.send((b"y" * 98 + b"\r\n") * 300)  # 30 kB, three times the limit
        assert nothing_more(c, 0.3)  # no reply (and no close) before the end of data
        c.send(b"last line\r\n.\r\n")
        expect(c.reply(), replies.MESSAGE_TOO_BIG)
        # the session goes on, and the next transaction works
        expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: small\r\n\r\nok"))
    marker = send_marker(small)
    assert known_ids(small) - before == {qid, marker}
    assert not spool_tmp(small)


def test_message_one_octet_over_the_limit_is_refused(small):
    before = known_ids(small)
    with connect(small.port) as c:
        expect(send_message(c, "a@remote.test", ["alice@example.test"], body_of_size(MAX_SIZE + 1)),
               replies.MESSAGE_TOO_BIG)
    marker = send_marker(small)
    assert known_ids(small) - before == {marker}


def test_declared_size_is_not_trusted(small):
    before = known_ids(small)
    with connect(small.port) as c:
        start_data(c, "a@remote.test", ["bob@example.test"], "SIZE=100")
        c.send((b"y" * 98 + b"\r\n") * 200 + b".\r\n")
        expect(c.reply(), replies.MESSAGE_TOO_BIG)
    marker = send_marker(small)
    assert known_ids(small) - before == {marker}


def test_line_of_exactly_the_line_limit_is_accepted(small):
    line = b"w" * (MAX_LINE - 2)
    with connect(small.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: l\r\n\r\n" + line))
    assert wait_delivered(small, "alice@example.test", qid).endswith(b"\n" + line + b"\n")


@pytest.mark.parametrize("length", [MAX_LINE - 1, 5 * MAX_LINE])
def test_line_over_the_line_limit_is_552(small, length):
    before = known_ids(small)
    with connect(small.port) as c:
        body = b"Subject: l\r\n\r\n" + b"w" * length + b"\r\nafter"
        expect(send_message(c, "a@remote.test", ["alice@example.test"], body), replies.MESSAGE_LINE_TOO_LONG)
        assert c.code("NOOP") == "250 2.0.0"
    marker = send_marker(small)
    assert known_ids(small) - before == {marker}


def test_megabyte_without_a_line_end_in_data_is_552(small):
    before = known_ids(small)
    with connect(small.port) as c:
        start_data(c, "a@remote.test", ["alice@example.test"])
        chunk = b"q" * 65536
        for _ in range(16):
            c.send(chunk)
        c.send(b"\r\n.\r\n")
        code_, lines = c.reply()
        assert code_ == 552 and lines[-1].startswith("5.3.4"), (code_, lines)
        assert c.code("NOOP") == "250 2.0.0"
    marker = send_marker(small)
    assert known_ids(small) - before == {marker}


# -- bare newlines --------------------------------------------------------------------------
BARE = [
    b"Subject: bare\nx",
    b"Subject: bare\r\n\r\nline one\nline two",
    b"Subject: bare\r\n\r\nline one\rline two",
    b"Subject: bare\r\n\r\nends in bare CR\r",
    b"Subject: bare\r\n\r\n\n\n",
    b"Subject: bare\r\n\r\nx\r\r\n",
]


@pytest.mark.parametrize("body", BARE)
def test_bare_newline_is_550_5_6_0_and_nothing_is_queued(server, body):
    before = known_ids(server)
    with connect(server.port) as c:
        expect(send_message(c, "a@remote.test", ["alice@example.test"], body), replies.BARE_NEWLINE)
        assert nothing_more(c, 0.05)
        expect(c.cmd("RCPT TO:<alice@example.test>"), replies.NEED_MAIL)  # transaction over
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: fine\r\n\r\nok"))
    marker = send_marker(server)
    assert known_ids(server) - before == {qid, marker}


@pytest.mark.parametrize("body, stored", [
    (b"Subject: lf\nX-A: 1\n\nline one\nline two", b"Subject: lf\r\nX-A: 1\r\n\r\nline one\r\nline two\r\n"),
    (b"Subject: cr\r\n\r\none\rtwo\r\n", b"Subject: cr\r\n\r\none\r\ntwo\r\n\r\n"),
    (b"Subject: mixed\r\n\r\na\nb\r\nc\rd", b"Subject: mixed\r\n\r\na\r\nb\r\nc\r\nd\r\n"),
])
def test_normalize_setting_accepts_bare_newlines_as_crlf(normalizing, body, stored):
    qid, got = relay_and_read_spool(normalizing, body)
    _, rest = split_received(got)
    assert rest == stored


def test_normalize_setting_delivers_locally(normalizing):
    with connect(normalizing.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["alice@example.test"], b"Subject: n\n\nbody\nmore"))
    msg = wait_delivered(normalizing, "alice@example.test", qid)
    assert msg.endswith(b"Subject: n\n\nbody\nmore\n")
    assert b"\r" not in msg
