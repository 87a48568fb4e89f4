"""The outbound SMTP client (geosmtp.relay.client) and the connection pool (relay.pool)
against FakeMX, in this process.

FakeMX serves from plain threads; the client runs on gevent sockets, which work without
monkey-patching: every call into the client goes through run(), a greenlet whose result is
awaited with a bound, so no test can hang on it.
"""
from __future__ import annotations

import io
import time

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp.relay import client as client_module
from geosmtp.delivery.target import Message
from geosmtp.relay.client import (
    REPLY_LINE_LIMIT,
    Client,
    ConnectionLost,
    StaleConnection,
    Timeouts,
    _stuffed,
    remote_reply,
)
from geosmtp.relay.errors import PermanentError, TransientError
from geosmtp.relay.mx import MXResolver, make_resolver
from geosmtp.relay.pool import Relay, RelaySettings
from geosmtp.replies import Reply
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import DEFAULT_EXTENSIONS, FakeMX

MX_IP = "127.0.0.10"
LABEL = f"mx1.remote.test[{MX_IP}]"
HELO = "relay.example.test"
SENDER = "alice@example.test"
FAST = Timeouts(connect=2.0, command=0.5, data=0.5)
BODY = b"From: alice@example.test\r\nSubject: test\r\n\r\nhello\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
NO_PIPELINING = [e for e in DEFAULT_EXTENSIONS if e != "PIPELINING"]


def run(fn, *args, timeout: float = 10.0):
    """fn(*args) in a greenlet; its result (or exception) within `timeout` seconds."""
    g = gevent.spawn(fn, *args)
    try:
        return g.get(timeout=timeout)
    finally:
        g.kill(block=False)


def hub_wait(predicate, timeout: float = 5.0) -> None:
    """Wait for `predicate` while letting the hub run (greenlets the relay spawned, such as
    a QUIT, only make progress then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        gevent.sleep(0.02)


def outgoing(rcpts=("bob@remote.test",), body: bytes = BODY, **kw) -> Message:
    return Message(sender=kw.pop("sender", SENDER), recipients=tuple(rcpts),
                    size=kw.pop("size", len(body)), **kw)


@pytest.fixture
def mx():
    m = FakeMX(MX_IP, name="mx1.remote.test")
    m.hang_timeout = 5.0
    with m:
        yield m


@pytest.fixture
def connect(mx):
    """Open (and after the test close) greeted clients to the fake MX."""
    opened: list[Client] = []

    def make(timeouts: Timeouts = FAST, hello: bool = True) -> Client:
        c = run(Client.open, MX_IP, mx.port, LABEL, timeouts)
        opened.append(c)
        if hello:
            run(c.hello, HELO)
        return c

    yield make
    for c in opened:
        c.close()


def send(c: Client, msg: Message, body: bytes = BODY, timeout: float = 10.0) -> list[Reply]:
    return run(c.send, msg, io.BytesIO(body), timeout=timeout)


def codes(replies) -> list[str]:
    return [f"{r.code} {r.enhanced}" for r in replies]


def commands(mx: FakeMX, connection: int | None = None) -> list[str]:
    return [line for n, line in mx.commands if connection is None or n == connection]


# -- remote_reply -----------------------------------------------------------------------------
def test_remote_reply_single_line_with_enhanced_code():
    assert remote_reply(250, ["2.1.0 Sender ok"]) == Reply(250, "2.1.0", "Sender ok")


def test_remote_reply_multi_line_joined():
    r = remote_reply(550, ["5.7.1 Message rejected", "5.7.1 see https://example.test/why"])
    assert r == Reply(550, "5.7.1", "Message rejected see https://example.test/why")


def test_remote_reply_without_enhanced_code():
    r = remote_reply(250, ["mx1.remote.test greets relay", "PIPELINING", "SIZE 1000"])
    assert r.enhanced is None
    assert r.text == "mx1.remote.test greets relay PIPELINING SIZE 1000"


def test_remote_reply_first_valid_enhanced_code_wins_and_is_stripped_from_each_line():
    r = remote_reply(451, ["greylisted", "4.7.1 come back", "4.2.0 later"])
    assert r.enhanced == "4.7.1"
    assert r.text == "greylisted come back later"


@pytest.mark.parametrize("code, line, enhanced, text", [
    (550, "4.7.1 wrong class", None, "4.7.1 wrong class"),  # class must match the code
    (250, "5.0.0 wrong class", None, "5.0.0 wrong class"),
    (250, "2.0.0", "2.0.0", "(no text)"),  # the code alone
    (250, "2.0.0Ok", None, "2.0.0Ok"),  # no separator: not an enhanced code
    (554, "5.123.456 three digits", "5.123.456", "three digits"),
    (554, "5.1234.1 four digits", None, "5.1234.1 four digits"),
    (421, "  padded  ", None, "padded"),
])
def test_remote_reply_enhanced_code_rules(code, line, enhanced, text):
    r = remote_reply(code, [line])
    assert (r.enhanced, r.text) == (enhanced, text)


def test_remote_reply_control_characters_removed():
    r = remote_reply(550, ["5.1.1 no\x00such\x1b[31muser\x7f", "tab\there\rcr"])
    assert r.enhanced == "5.1.1"
    assert r.text == "no such [31muser tab here cr"
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in r.text)
    assert r.to_bytes().count(b"\r\n") == 1  # one line on the wire whatever was sent


def test_remote_reply_empty_text_and_length_limit():
    assert remote_reply(250, [""]).text == "(no text)"
    assert remote_reply(250, ["", "  "]).text == "(no text)"
    long = remote_reply(550, ["5.0.0 " + "x" * 5000])
    assert len(long.text) == 1000


# -- dot-stuffing -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk, line_start, expected", [
    (b".a\r\n", True, b"..a\r\n"),
    (b".a\r\n", False, b".a\r\n"),  # the middle of a line that began in the previous chunk
    (b"a\r\n.b\r\n.\r\n", True, b"a\r\n..b\r\n..\r\n"),
    (b"a.b\r\n", True, b"a.b\r\n"),
    (b"", True, b""),
    (b"\r\n.", False, b"\r\n.."),  # a dot at the very end, its line in the next chunk
])
def test_stuffed_examples(chunk, line_start, expected):
    assert _stuffed(chunk, line_start) == expected


def unstuff(wire: bytes) -> bytes:
    """What a server makes of `wire`: everything before the first <CRLF>.<CRLF> (or a
    leading .<CRLF>), dot-stuffing removed; asserts that the end comes only at the end."""
    if wire == b".\r\n":
        return b""
    end = wire.find(b"\r\n.\r\n")
    assert end >= 0 and end + 5 == len(wire), "the end of data is not (only) at the end"
    lines = wire[:end + 2].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class _Chunks:
    """A body file whose read() hands out pre-cut pieces, whatever size is asked for."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = list(pieces)

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


class _Wire:
    """Just enough of a Connection to watch Client._send_body write."""

    def __init__(self):
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def flush(self) -> None:
        pass

    def read_line(self, limit, timeout, strict=True) -> bytes:
        return b"250 2.0.0 Ok"

    def close(self) -> None:
        pass


def cuts(data: bytes, positions: list[int]) -> list[bytes]:
    """`data` cut at the given positions (taken modulo its length), empty pieces dropped:
    a read() returning b"" means the end of the file."""
    points = sorted({p % (len(data) + 1) for p in positions})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


_line = st.text(alphabet=".a \t", max_size=12).map(str.encode)  # lots of dots, no line ends
_lines = st.lists(_line, max_size=25)


@settings(max_examples=150, deadline=None, database=None)
@given(lines=_lines, positions=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_stuffing_then_unstuffing_gives_the_body_back(lines, positions):
    body = b"".join(line + b"\r\n" for line in lines)
    pieces = cuts(body, positions)
    out = b""
    line_start = True
    for piece in pieces:  # what Client._send_body does with each chunk
        out += _stuffed(piece, line_start)
        line_start = piece.endswith(b"\n")
    out += b".\r\n" if line_start else b"\r\n.\r\n"
    assert unstuff(out) == body


@settings(max_examples=100, deadline=None, database=None)
@given(lines=_lines, positions=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       prefix=st.sampled_from([b"", b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n", b".x: y\r\n"]),
       unterminated=st.sampled_from([b"", b"no newline", b"."]))
def test_send_body_wire_format(lines, positions, prefix, unterminated):
    """Client._send_body itself, body read in random pieces: the server gets exactly
    prefix + body (with a CRLF added when the body does not end in one)."""
    body = b"".join(line + b"\r\n" for line in lines) + unterminated
    pieces = cuts(body, positions)
    wire = _Wire()
    c = Client(wire, LABEL, FAST)
    reply = c._send_body(prefix, _Chunks(pieces))
    assert reply.code == 250
    expected = prefix + body
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(bytes(wire.out)) == expected


def test_dots_at_64k_chunk_boundaries_reach_the_server_intact(mx, connect):
    """The body is read in 64 KiB chunks: lines starting with '.' right at, just before and
    just after a chunk boundary arrive unchanged."""
    chunk = client_module.CHUNK
    filler = b"x" * 70 + b"\r\n"
    parts = []
    size = 0
    for target in (chunk, 2 * chunk - 1, 3 * chunk + 1, 4 * chunk - 2):
        pad = target - size - 2
        while pad > len(filler):
            parts.append(filler)
            size += len(filler)
            pad -= len(filler)
        parts.append(b"y" * pad + b"\r\n")  # the next line starts at `target`
        size = target
        parts.append(b".dot at %d\r\n" % target)
        size += len(parts[-1])
    parts.append(b"..\r\n.\r\n")
    body = b"".join(parts)
    for target in (chunk, 2 * chunk - 1, 3 * chunk + 1, 4 * chunk - 2):
        assert body[target:target + 1] == b"."
    c = connect()
    assert codes(send(c, outgoing(body=body), body)) == ["250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.data == body


# -- open and hello ---------------------------------------------------------------------------
def test_open_hello_send_with_pipelining(mx, connect):
    c = connect()
    assert "PIPELINING" in c.extensions and c.extensions["SIZE"] == "10485760"
    replies = send(c, outgoing(["bob@remote.test", "carol@remote.test"]))
    assert codes(replies) == ["250 2.0.0", "250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.mail_from == SENDER and msg.rcpt_tos == ["bob@remote.test", "carol@remote.test"]
    assert msg.data == BODY
    assert msg.helo == HELO
    assert msg.mail_params == {"SIZE": str(len(BODY))}
    assert commands(mx) == [f"EHLO {HELO}", f"MAIL FROM:<{SENDER}> SIZE={len(BODY)}",
                            "RCPT TO:<bob@remote.test>", "RCPT TO:<carol@remote.test>", "DATA"]
    assert c.transactions == 1 and not c.broken
    run(c.quit)
    mx.wait_idle(5)
    assert commands(mx)[-1] == "QUIT"


def test_send_without_pipelining(mx, connect):
    mx.extensions = NO_PIPELINING
    c = connect()
    assert "PIPELINING" not in c.extensions
    replies = send(c, outgoing(["bob@remote.test", "carol@remote.test"]))
    assert codes(replies) == ["250 2.0.0", "250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.data == BODY


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_refused_mail_from_applies_to_every_recipient(mx, connect, pipelining):
    if not pipelining:
        mx.extensions = NO_PIPELINING
    mx.mail_reply = "550 5.7.1 sender refused"
    c = connect()
    replies = send(c, outgoing(["bob@remote.test", "carol@remote.test"]))
    assert codes(replies) == ["550 5.7.1", "550 5.7.1"]
    assert replies[0].text == "sender refused"
    sent = commands(mx)
    if pipelining:  # sent blind with MAIL; the server answered them 503
        assert "RCPT TO:<bob@remote.test>" in sent and "DATA" in sent
    else:  # lockstep: nothing after a refused MAIL but RSET
        assert not any(line.startswith(("RCPT", "DATA")) for line in sent)
    assert sent[-1] == "RSET"
    assert not mx.transactions


def test_connect_refused_is_transient_441():
    from tests.support.fakemx import pick_port
    port = pick_port([MX_IP])  # nobody listens there
    with pytest.raises(TransientError) as exc:
        run(Client.open, MX_IP, port, LABEL, FAST)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.4.1")


@pytest.mark.parametrize("greeting, error", [
    ("554 5.7.1 go away", PermanentError),
    ("421 4.3.2 busy", TransientError),
])
def test_greeting_refusal(mx, greeting, error):
    mx.greeting = greeting
    with pytest.raises(error) as exc:
        run(Client.open, MX_IP, mx.port, LABEL, FAST)
    assert exc.value.reply.code == int(greeting[:3])
    assert exc.value.remote == LABEL


def test_multi_line_greeting(mx, connect):
    mx.greeting = "220-{name} ESMTP\n220-no spam please\n220 really"
    c = connect()
    assert "PIPELINING" in c.extensions


def test_helo_fallback_when_ehlo_is_refused(mx, connect):
    mx.ehlo_reply = "502 5.5.1 EHLO not implemented"
    c = connect()
    assert c.extensions == {}
    assert commands(mx) == [f"EHLO {HELO}", f"HELO {HELO}"]
    replies = send(c, outgoing(["bob@remote.test", "carol@remote.test"], eightbit=True, size=10))
    assert codes(replies) == ["250 2.0.0", "250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.mail_params == {}  # no SIZE, no BODY: nothing was offered
    assert msg.helo == HELO and msg.data == BODY


@pytest.mark.parametrize("ehlo_reply, error, code", [
    ("421 4.3.2 shutting down", TransientError, 421),
    ("554 5.7.1 not you", PermanentError, 554),
])
def test_ehlo_refusal_without_fallback(mx, ehlo_reply, error, code):
    mx.ehlo_reply = ehlo_reply
    c = run(Client.open, MX_IP, mx.port, LABEL, FAST)
    try:
        with pytest.raises(error) as exc:
            run(c.hello, HELO)
        assert exc.value.reply.code == code
        assert c.broken
        assert not any(line.startswith("HELO") for line in commands(mx))
    finally:
        c.close()


def test_ehlo_extensions_parsed(mx, connect):
    mx.extensions = ["pipelining", "SIZE 1000", "AUTH PLAIN LOGIN", "X-FOO  bar  "]
    c = connect()
    assert c.extensions == {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN", "X-FOO": "bar"}


# -- SIZE, 8BITMIME, SMTPUTF8 -----------------------------------------------------------------
def test_size_over_the_servers_limit_is_refused_before_mail(mx, connect):
    mx.extensions = ["PIPELINING", "SIZE 100", "8BITMIME"]
    c = connect()
    with pytest.raises(PermanentError) as exc:
        send(c, outgoing(size=101))
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (552, "5.3.4")
    assert not any(line.startswith("MAIL") for line in commands(mx))
    assert not c.broken  # nothing was said: the connection is still good for another message
    assert codes(send(c, outgoing(size=100))) == ["250 2.0.0"]


def test_size_zero_means_no_limit(mx, connect):
    mx.extensions = ["SIZE 0"]
    c = connect()
    assert codes(send(c, outgoing(size=10**9))) == ["250 2.0.0"]
    assert mx.wait_for_messages(1)[0].mail_params == {"SIZE": str(10**9)}


def test_no_size_parameter_when_not_offered(mx, connect):
    mx.extensions = ["PIPELINING", "8BITMIME"]
    c = connect()
    send(c, outgoing(eightbit=True))
    assert mx.wait_for_messages(1)[0].mail_params == {"BODY": "8BITMIME"}


def test_8bitmime_only_when_offered(mx, connect):
    mx.extensions = ["PIPELINING", "SIZE 1000"]
    c = connect()
    assert codes(send(c, outgoing(eightbit=True))) == ["250 2.0.0"]
    assert mx.wait_for_messages(1)[0].mail_params == {"SIZE": str(len(BODY))}


def test_8bit_body_refused_when_8bitmime_not_offered(mx, connect):
    """RFC 6152 3: an 8-bit body must not go to a server without 8BITMIME (we do not
    convert). A 7-bit body marked 8BITMIME goes, without BODY= (test_8bitmime_only_when_offered)."""
    mx.extensions = ["PIPELINING", "SIZE 100000"]
    c = connect()
    body = BODY + "café\r\n".encode()
    with pytest.raises(PermanentError) as exc:
        send(c, outgoing(body=body, eightbit=True), body)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (554, "5.6.3")
    assert not any(line.startswith("MAIL") for line in commands(mx))
    assert not c.broken


def test_smtputf8_refused_when_not_offered(mx, connect):
    mx.extensions = ["PIPELINING", "SIZE 100000", "8BITMIME"]
    c = connect()
    with pytest.raises(PermanentError) as exc:
        send(c, outgoing(["bøb@remote.test"], smtputf8=True))
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (553, "5.6.7")
    assert LABEL in exc.value.reply.text
    assert not any(line.startswith("MAIL") for line in commands(mx))


def test_smtputf8_sent_when_offered(mx, connect):
    c = connect()
    replies = send(c, outgoing(["bøb@remote.test"], sender="älice@example.test", smtputf8=True, eightbit=True))
    assert codes(replies) == ["250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.mail_from == "älice@example.test" and msg.rcpt_tos == ["bøb@remote.test"]
    assert msg.mail_params == {"SIZE": str(len(BODY)), "BODY": "8BITMIME", "SMTPUTF8": None}


# -- per-recipient replies, RSET, a second transaction ----------------------------------------
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_per_recipient_replies(mx, connect, pipelining):
    if not pipelining:
        mx.extensions = NO_PIPELINING
    mx.rcpt_replies = {"gone@remote.test": "550 5.1.1 no such user",
                       "full@remote.test": "452 4.2.2 mailbox full"}
    c = connect()
    rcpts = ["bob@remote.test", "gone@remote.test", "full@remote.test", "carol@remote.test"]
    replies = send(c, outgoing(rcpts))
    assert codes(replies) == ["250 2.0.0", "550 5.1.1", "452 4.2.2", "250 2.0.0"]
    assert replies[1].text == "no such user"
    [msg] = mx.wait_for_messages(1)
    assert msg.rcpt_tos == ["bob@remote.test", "carol@remote.test"]
    assert "RSET" not in commands(mx)  # the transaction ended with the final reply


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_rset_after_all_recipients_refused_then_second_transaction(mx, connect, pipelining):
    if not pipelining:
        mx.extensions = NO_PIPELINING
    mx.default_rcpt_reply = "550 5.1.1 no such user"
    c = connect()
    replies = send(c, outgoing(["x@remote.test", "y@remote.test"]))
    assert codes(replies) == ["550 5.1.1", "550 5.1.1"]
    assert commands(mx)[-1] == "RSET"
    if not pipelining:
        assert "DATA" not in commands(mx)
    mx.default_rcpt_reply = "250 2.1.5 Ok"
    replies = send(c, outgoing(["bob@remote.test"]))
    assert codes(replies) == ["250 2.0.0"]
    [msg] = mx.wait_for_messages(1)
    assert msg.connection == 1 and msg.rcpt_tos == ["bob@remote.test"]
    assert mx.connections == 1
    assert c.transactions == 2 and not c.broken


def test_rset_after_data_refused(mx, connect):
    mx.data_reply = "451 4.3.0 try again later"
    c = connect()
    replies = send(c, outgoing(["bob@remote.test", "carol@remote.test"]))
    assert codes(replies) == ["451 4.3.0", "451 4.3.0"]
    assert commands(mx)[-1] == "RSET"
    mx.data_reply = "354 go ahead"
    assert codes(send(c, outgoing())) == ["250 2.0.0"]
    assert mx.wait_for_messages(1)[0].connection == 1


def test_final_dot_refusal_then_second_transaction(mx, connect):
    replies_seen = iter(["554 5.7.1 looks like spam", "250 2.0.0 Ok: queued as B"])
    mx.final_reply = lambda msg: next(replies_seen)
    c = connect()
    assert codes(send(c, outgoing(["bob@remote.test", "carol@remote.test"]))) == ["554 5.7.1", "554 5.7.1"]
    assert "RSET" not in commands(mx)
    assert codes(send(c, outgoing())) == ["250 2.0.0"]
    assert [t.reply[:3] for t in mx.transactions] == ["554", "250"]
    assert {t.connection for t in mx.transactions} == {1}


# -- timeouts and protocol errors -------------------------------------------------------------
def timed(fn, *args):
    start = time.monotonic()
    try:
        fn(*args)
    except (TransientError, PermanentError) as exc:
        return exc, time.monotonic() - start
    pytest.fail("no error raised")


def test_greeting_timeout(mx):
    mx.hang_at = "greeting"
    exc, elapsed = timed(run, Client.open, MX_IP, mx.port, LABEL, FAST)
    assert isinstance(exc, TransientError) and not isinstance(exc, ConnectionLost)
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.2")
    assert "greeting" in exc.reply.text
    assert 0.4 <= elapsed < 2.0, elapsed


def test_ehlo_timeout(mx):
    mx.hang_at = "ehlo"
    c = run(Client.open, MX_IP, mx.port, LABEL, FAST)
    try:
        exc, elapsed = timed(run, c.hello, HELO)
        assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.2")
        assert 0.4 <= elapsed < 2.0, elapsed
        assert c.broken
    finally:
        c.close()


@pytest.mark.parametrize("stage, expect_in_text", [
    ("mail", "MAIL FROM"), ("rcpt", "RCPT TO"), ("data", "DATA"),
])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_command_stage_timeouts(mx, connect, stage, expect_in_text, pipelining):
    if not pipelining:
        mx.extensions = NO_PIPELINING
    c = connect()
    mx.hang_at = stage
    exc, elapsed = timed(send, c, outgoing())
    assert isinstance(exc, TransientError)
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.2")
    assert expect_in_text in exc.reply.text
    assert 0.4 <= elapsed < 2.0, elapsed
    assert c.broken
    assert not mx.messages


@pytest.mark.parametrize("stage", ["body", "dot"])
def test_data_timeout_is_the_data_timeout(mx, connect, stage):
    timeouts = Timeouts(connect=2.0, command=0.3, data=1.2)
    c = connect(timeouts)
    mx.hang_at = stage
    exc, elapsed = timed(send, c, outgoing())
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.2")
    assert "end of data" in exc.reply.text
    assert 1.1 <= elapsed < 2.5, elapsed  # the 10-minute kind (data), not the command one
    assert c.broken and not mx.messages


def test_reused_connection_closed_by_the_server_is_stale(mx, connect):
    c = connect()
    assert codes(send(c, outgoing())) == ["250 2.0.0"]
    mx.stop()  # closes the connection without a word
    mx.start()
    with pytest.raises(StaleConnection) as exc:
        send(c, outgoing())
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.4.2")
    assert c.broken


def test_reused_connection_timed_out_with_421_is_stale(mx, connect):
    mx.timeout = 0.3
    c = connect()
    assert codes(send(c, outgoing())) == ["250 2.0.0"]
    mx.wait_idle(5)  # "421 4.4.2 Timeout, closing" sent and the connection closed
    with pytest.raises(StaleConnection):
        send(c, outgoing())
    assert len(mx.transactions) == 1


def test_first_transaction_connection_lost_is_not_stale(mx, connect):
    c = connect()
    mx.drop_at = "mail"
    with pytest.raises(ConnectionLost) as exc:
        send(c, outgoing())
    assert not isinstance(exc.value, StaleConnection)  # a fresh connection: not retried at once


def test_connection_dropped_mid_transaction_is_connection_lost(mx, connect):
    c = connect()
    mx.drop_at = "rcpt"
    with pytest.raises(ConnectionLost) as exc:
        send(c, outgoing())
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.4.2")
    assert c.broken


def test_reply_line_at_the_limit_is_accepted(mx, connect):
    prefix = "250 2.1.0 "
    mx.mail_reply = prefix + "x" * (REPLY_LINE_LIMIT - len(prefix) - 2)  # + CRLF = the limit
    c = connect()
    assert codes(send(c, outgoing())) == ["250 2.0.0"]


@pytest.mark.parametrize("where", ["mail", "greeting"])
def test_reply_line_over_the_limit_is_transient(mx, connect, where):
    long = "250 2.1.0 " + "x" * REPLY_LINE_LIMIT
    if where == "greeting":
        mx.greeting = "220 " + "x" * REPLY_LINE_LIMIT
        with pytest.raises(TransientError) as exc:
            run(Client.open, MX_IP, mx.port, LABEL, FAST)
    else:
        mx.mail_reply = long
        c = connect()
        with pytest.raises(TransientError) as exc:
            send(c, outgoing())
        assert c.broken
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.5.0")
    assert "protocol error" in exc.value.reply.text


@pytest.mark.parametrize("reply", [
    "hello there",  # not a reply at all
    "25",  # too short
    "250-first\n251 second",  # a multi-line reply changing its code
    "250x no separator",
])
def test_malformed_replies_are_transient_protocol_errors(mx, connect, reply):
    mx.mail_reply = reply
    c = connect()
    with pytest.raises(TransientError) as exc:
        send(c, outgoing())
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (451, "4.5.0")
    assert c.broken


def test_too_many_reply_lines(mx):
    mx.ehlo_reply = "\n".join(["250-line"] * 150 + ["250 end"])
    c = run(Client.open, MX_IP, mx.port, LABEL, FAST)
    try:
        with pytest.raises(TransientError) as exc:
            run(c.hello, HELO)
        assert exc.value.reply.enhanced == "4.5.0"
    finally:
        c.close()


# -- the pool: reuse and stale connections ---------------------------------------------------
@pytest.fixture
def dns():
    with FakeDNS() as d:
        d.mx("remote.test", [(10, "mx1.remote.test")])
        d.a("mx1.remote.test", MX_IP)
        yield d


@pytest.fixture
def make_relay(dns, mx):
    made: list[Relay] = []

    def make(**settings) -> Relay:
        settings.setdefault("timeouts", FAST)
        relay = Relay(MXResolver(make_resolver([("127.0.0.1", dns.port)], timeout=1)),
                      RelaySettings(helo_name=HELO, port=mx.port, **settings))
        made.append(relay)
        return relay

    yield make
    for relay in made:
        run(relay.close)


def deliver(relay: Relay, rcpts=("bob@remote.test",), body: bytes = BODY):
    return run(relay.deliver, "remote.test", outgoing(rcpts, body), lambda: io.BytesIO(body))


def body_n(n: int) -> bytes:
    return b"Subject: message %d\r\n\r\nbody %d\r\n" % (n, n)


def subjects(msgs) -> list[bytes]:
    return [m.data.split(b"\r\n", 1)[0] for m in msgs]


def test_relay_reuses_a_kept_connection(mx, make_relay):
    relay = make_relay(idle_time=5.0)
    for n in range(3):
        [outcome] = deliver(relay, body=body_n(n))
        assert outcome.reply.code == 250 and outcome.remote == LABEL
    msgs = mx.wait_for_messages(3)
    assert mx.connections == 1
    assert [m.connection for m in msgs] == [1, 1, 1]
    assert subjects(msgs) == [b"Subject: message %d" % n for n in range(3)]
    assert commands(mx).count(f"EHLO {HELO}") == 1


def test_relay_starts_a_new_connection_after_max_transactions(mx, make_relay, monkeypatch):
    from geosmtp.relay import pool
    monkeypatch.setattr(pool, "MAX_TRANSACTIONS", 3)
    relay = make_relay(idle_time=30.0)
    for n in range(5):
        assert deliver(relay, body=body_n(n))[0].reply.code == 250
    msgs = mx.wait_for_messages(5)
    assert [m.connection for m in msgs] == [1, 1, 1, 2, 2]
    hub_wait(lambda: (1, "QUIT") in mx.commands)


def test_relay_per_recipient_outcomes(mx, make_relay):
    mx.rcpt_replies = {"gone@remote.test": "550 5.1.1 no such user"}
    relay = make_relay()
    outcomes = deliver(relay, ["bob@remote.test", "gone@remote.test"])
    assert codes(o.reply for o in outcomes) == ["250 2.0.0", "550 5.1.1"]
    assert {o.remote for o in outcomes} == {LABEL}


def test_relay_without_idle_time_does_not_keep_connections(mx, make_relay):
    relay = make_relay(idle_time=0)
    deliver(relay, body=body_n(1))
    deliver(relay, body=body_n(2))
    mx.wait_for_messages(2)
    assert mx.connections == 2
    hub_wait(lambda: commands(mx).count("QUIT") == 2)


def test_relay_does_not_reuse_a_connection_idle_too_long(mx, make_relay):
    relay = make_relay(idle_time=0.3)
    deliver(relay, body=body_n(1))
    time.sleep(0.5)  # the hub does not run: the reaper cannot close it first
    deliver(relay, body=body_n(2))
    msgs = mx.wait_for_messages(2)
    assert [m.connection for m in msgs] == [1, 2]


def test_relay_says_quit_to_a_healthy_connection_idle_too_long(mx, make_relay):
    relay = make_relay(idle_time=0.3)
    deliver(relay, body=body_n(1))
    time.sleep(0.5)  # the hub does not run: the reaper cannot close it first
    deliver(relay, body=body_n(2))
    hub_wait(lambda: (1, "QUIT") in mx.commands, timeout=1)


def test_reaper_says_quit_to_idle_connections(mx, make_relay):
    relay = make_relay(idle_time=0.3)
    deliver(relay, body=body_n(1))
    hub_wait(lambda: (1, "QUIT") in mx.commands, timeout=3)  # the hub runs: the reaper does it
    mx.wait_idle(3)


def test_relay_replaces_a_kept_connection_the_server_dropped(mx, make_relay):
    """The server went away silently (restart): the kept connection fails before the
    first reply, and the message goes at once on a new connection -- once."""
    relay = make_relay(idle_time=30.0)
    [first] = deliver(relay, body=body_n(1))
    assert first.reply.code == 250
    mx.stop()  # closes the kept connection
    mx.start()  # same port
    [second] = deliver(relay, body=body_n(2))
    assert second.reply.code == 250, second
    msgs = mx.wait_for_messages(2)
    assert subjects(msgs) == [b"Subject: message 1", b"Subject: message 2"]
    assert [m.connection for m in msgs] == [1, 2]
    assert len(mx.transactions) == 2  # nothing sent twice
    assert mx.connections == 2


def test_relay_stale_connection_then_the_next_message_reuses_the_new_one(mx, make_relay):
    relay = make_relay(idle_time=30.0)
    deliver(relay, body=body_n(1))
    mx.stop()
    mx.start()
    deliver(relay, body=body_n(2))
    deliver(relay, body=body_n(3))
    msgs = mx.wait_for_messages(3)
    assert [m.connection for m in msgs] == [1, 2, 2]
    assert len(mx.transactions) == 3


def test_relay_idle_connection_closed_with_421_is_replaced_at_once(mx, make_relay):
    """FakeMX closes an idle connection after its `timeout` with "421 4.4.2" first, as
    Postfix and Exim do. The message goes at once on a new connection, once. (At a1cbdd4 the
    421 was taken as the MAIL FROM reply: every recipient got "451 4.4.2 lost connection"
    and the message waited a whole retry interval.)"""
    mx.timeout = 0.3
    relay = make_relay(idle_time=30.0)
    deliver(relay, body=body_n(1))
    mx.wait_idle(5)  # the server timed the kept connection out
    [second] = deliver(relay, body=body_n(2))
    assert second.reply.code == 250, second
    msgs = mx.wait_for_messages(2)
    assert [m.connection for m in msgs] == [1, 2]
    assert len(mx.transactions) == 2


@pytest.mark.parametrize("how", ["silent", "421"])
def test_relay_stale_connection_path_sends_once_on_a_new_connection(mx, make_relay, monkeypatch, how):
    """The server closes the kept connection just after the relay looked at it (forced here
    by making Client.quiet() say yes): Client.send fails before the first reply with
    StaleConnection, and Relay sends the message again at once on a new connection."""
    monkeypatch.setattr(Client, "quiet", lambda self: not self.broken, raising=False)
    if how == "421":
        mx.timeout = 0.3  # FakeMX times idle connections out after this, with a 421
    relay = make_relay(idle_time=30.0)
    deliver(relay, body=body_n(1))
    if how == "421":
        mx.wait_idle(5)
    else:
        mx.stop()
        mx.start()
    [second] = deliver(relay, body=body_n(2))
    assert second.reply.code == 250, second
    msgs = mx.wait_for_messages(2)
    assert subjects(msgs) == [b"Subject: message 1", b"Subject: message 2"]
    assert [m.connection for m in msgs] == [1, 2]
    assert len(mx.transactions) == 2


def test_relay_tries_the_next_mx_when_the_first_refuses_connections(dns, mx, make_relay):
    dns.mx("remote.test", [(10, "down.remote.test"), (20, "mx1.remote.test")])
    dns.a("down.remote.test", "127.0.0.19")  # nothing listens on 127.0.0.19
    relay = make_relay()
    [outcome] = deliver(relay)
    assert outcome.reply.code == 250 and outcome.remote == LABEL


def test_relay_dns_failure_is_an_outcome_for_each_recipient(dns, make_relay):
    dns.servfail("remote.test")
    relay = make_relay()
    outcomes = deliver(relay, ["a@remote.test", "b@remote.test"])
    assert codes(o.reply for o in outcomes) == ["451 4.4.3", "451 4.4.3"]


def test_relay_timeout_outcome_and_no_reuse_of_the_broken_connection(mx, make_relay):
    relay = make_relay(idle_time=30.0)
    mx.hang_at = "dot"
    [outcome] = deliver(relay, body=body_n(1))
    assert (outcome.reply.code, outcome.reply.enhanced) == (451, "4.4.2")
    mx.hang_at = None
    [outcome] = deliver(relay, body=body_n(2))
    assert outcome.reply.code == 250
    msgs = mx.wait_for_messages(1)
    assert msgs[0].connection == 2


@pytest.mark.parametrize("drop_at", ["rcpt", "data", "body", "dot"])
def test_a_failure_after_talking_to_a_host_names_it(mx, make_relay, drop_at):
    """relay=host[ip] in the log and Remote-MTA in a bounce, whatever went wrong after the
    greeting (here: the connection dropped at some stage)."""
    mx.drop_at = drop_at
    [outcome] = deliver(make_relay())
    assert outcome.reply.code == 451
    assert (outcome.remote, outcome.tls) == (LABEL, "none")


def test_a_refusal_decided_by_us_after_ehlo_names_the_host(mx, make_relay):
    mx.extensions = [e for e in mx.extensions if not e.startswith("SIZE")] + ["SIZE 10"]
    [outcome] = deliver(make_relay())
    assert (outcome.reply.code, outcome.reply.enhanced) == (552, "5.3.4")
    assert outcome.remote == LABEL


# -- NUL: never sent --------------------------------------------------------------------------
# "\r\n\0.\r\n" is an end of data to a next hop that drops NULs. A message spooled with one
# (by an older version) is refused, not stripped: stripping would break its DKIM signature.
NUL_BODIES = [
    b"Subject: a\r\n\r\nhonest\r\n\x00.\r\nMAIL FROM:<evil@x.test>\r\n",
    b"Subject: a\r\n\r\nhonest\r\n.\x00\r\nMAIL FROM:<evil@x.test>\r\n",
    b"Subject: a\r\n\r\n" + b"x" * 70 + b"\r\n" * 1000 + b"late \x00 NUL\r\n",  # in a later chunk
]


@pytest.mark.parametrize("body", NUL_BODIES, ids=["nul-dot", "dot-nul", "late"])
def test_send_body_never_writes_a_nul_nor_the_final_dot(body):
    wire = _Wire()
    c = Client(wire, LABEL, FAST)
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]  # the NUL in a later read
    with pytest.raises(PermanentError) as exc:
        c._send_body(b"DKIM-Signature: v=1\r\n", _Chunks(chunks))
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (554, "5.6.0")
    assert b"\0" not in wire.out and not wire.out.endswith(b"\r\n.\r\n")
    assert c.broken


@pytest.mark.parametrize("body", NUL_BODIES[:2], ids=["nul-dot", "dot-nul"])
def test_nul_message_is_refused_and_the_server_never_gets_a_message(mx, connect, body):
    c = connect()
    with pytest.raises(PermanentError) as exc:
        send(c, outgoing(body=body), body)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (554, "5.6.0")
    assert c.broken  # closed mid-DATA: the server discards the transaction (RFC 5321 3.8)
    mx.wait_idle(5)
    assert mx.transactions == [] and mx.messages == []


def test_relay_bounces_a_nul_message_and_sends_the_next_one(mx, make_relay):
    relay = make_relay(idle_time=30.0)
    outcomes = deliver(relay, ["bob@remote.test", "carol@remote.test"], body=NUL_BODIES[0])
    assert codes(o.reply for o in outcomes) == ["554 5.6.0", "554 5.6.0"]
    assert deliver(relay, body=body_n(1))[0].reply.code == 250
    [msg] = mx.wait_for_messages(1)
    assert msg.connection == 2 and msg.data == body_n(1)  # the broken connection was not kept
    assert [t.data for t in mx.transactions] == [body_n(1)]
