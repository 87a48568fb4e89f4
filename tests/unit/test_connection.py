"""geosmtp.connection over real sockets: bounded command lines and the DATA reader.

Every test uses a real `socket.socketpair()`; nothing is mocked. The server side gets a
socket timeout so a test bug ends in ReadTimeout, never a hang. Data is either sent before
the read (it fits in the socket buffer, so recv never blocks) or fed from a thread that
sends one chunk at a time and waits, by bounded polling of FIONREAD, until the reader has
taken it: then every recv() returns exactly one chunk and chunk boundaries are real.
"""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

import gevent
import gevent.socket
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from geosmtp.connection import (
    FLOOD_LIMIT,
    RECV_SIZE,
    BareNewline,
    Connection,
    ConnectionClosed,
    DataResult,
    DataTooSlow,
    LineFlood,
    LineTooLong,
    ReadTimeout,
    readable_now,
)
from geosmtp.limits import DataClock, Limits

LIMIT = 512  # RFC 5321 4.5.3.1.4: command line incl. CRLF
SAFETY = 5.0  # seconds: the socket timeout that turns a test bug into ReadTimeout
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


class Feeder(threading.Thread):
    """Sends chunks one by one; before each next chunk waits until the reader took the last."""

    def __init__(self, writer: socket.socket, reader: socket.socket, chunks: list[bytes],
                 close: bool = False, gap: float = 0.0):
        super().__init__(daemon=True)
        self.writer, self.reader, self.chunks, self.close = writer, reader, chunks, close
        self.gap = gap  # seconds between chunks: a client that drips
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + SAFETY
        try:
            for i, chunk in enumerate(self.chunks):
                self.writer.sendall(chunk)
                if i == len(self.chunks) - 1:
                    break
                while unread(self.reader) and time.monotonic() < deadline:
                    time.sleep(0.0001)
                time.sleep(self.gap)
            if self.close:
                self.writer.shutdown(socket.SHUT_WR)
        except (OSError, ValueError) as exc:  # the reader closed early; the test's asserts will say why
            self.error = exc


class Pair:
    def __init__(self):
        self.server, self.client = socket.socketpair()
        self.server.settimeout(SAFETY)
        self.client.settimeout(SAFETY)
        self.conn = Connection(self.server)
        self.feeders: list[Feeder] = []

    def send(self, data: bytes) -> None:
        self.client.sendall(data)

    def feed(self, chunks: list[bytes], close: bool = False, gap: float = 0.0) -> Feeder:
        feeder = Feeder(self.client, self.server, [c for c in chunks if c], close, gap)
        feeder.start()
        self.feeders.append(feeder)
        return feeder

    def line(self, limit: int = LIMIT) -> bytes:
        return self.conn.read_line(limit, SAFETY)

    def data(self, max_size=10_000_000, max_line=1000, normalize=False, timeout=SAFETY, limits=None):
        """read_data; `timeout` is the data_timeout (the longest silence), or `limits` all."""
        parts: list[bytes] = []
        limits = limits or Limits(data_timeout=timeout, data_deadline=SAFETY, min_data_rate=1.0)
        result = self.conn.read_data(parts.append, max_size, max_line, normalize, DataClock(lambda: limits))
        return b"".join(parts), result, parts

    def close(self) -> None:
        for sock in (self.client, self.server):
            sock.close()
        for feeder in self.feeders:
            feeder.join(SAFETY)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


# -- read_line ----------------------------------------------------------------------------
def test_crlf_line(pair):
    pair.send(b"EHLO client.test\r\n")
    assert pair.line() == b"EHLO client.test"
    assert pair.conn.pending() == 0


def test_empty_line(pair):
    pair.send(b"\r\n")
    assert pair.line() == b""


def test_pipelined_lines_stay_pending(pair):
    # RFC 2920: a client may send a group of commands at once; they wait in the buffer
    pair.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    assert pair.line() == b"MAIL FROM:<a@b.test>"
    assert pair.conn.pending() == len(b"RCPT TO:<c@d.test>\r\nDATA\r\n")
    assert pair.line() == b"RCPT TO:<c@d.test>"
    assert pair.conn.pending() == len(b"DATA\r\n")
    assert pair.line() == b"DATA"
    assert pair.conn.pending() == 0


def test_discard_pending(pair):
    # RFC 3207 4: bytes pipelined after STARTTLS must be thrown away
    pair.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert pair.line() == b"STARTTLS"
    assert pair.conn.discard_pending() == len(b"MAIL FROM:<evil@x.test>\r\n")
    assert pair.conn.pending() == 0


@pytest.mark.parametrize(
    "bad",
    [
        b"NOOP\n",  # bare LF ends the line
        b"NO\rOP\r\n",  # lone CR inside
        b"NOOP\r\r\n",
        b"\rNOOP\r\n",
        b"\n",
        b"NOOP\n\r\n",
    ],
)
def test_bare_newline_in_command_is_consumed(pair, bad):
    # RFC 5321 2.3.8: lines end in CRLF; the bad line is consumed and the next one readable
    pair.send(bad + b"QUIT\r\n")
    with pytest.raises(BareNewline):
        pair.line()
    rest = bad[bad.index(b"\n") + 1:] + b"QUIT\r\n"
    while rest.startswith(b"\r\n"):  # "NOOP\n\r\n": the leftover CRLF is an empty line
        assert pair.line() == b""
        rest = rest[2:]
    assert pair.line() == b"QUIT"


def test_line_at_limit_is_accepted(pair):
    line = b"X" * (LIMIT - 2)
    pair.send(line + b"\r\n")
    assert pair.line() == line


@pytest.mark.parametrize("extra", [1, 2, 100, 5000])
def test_line_over_limit_then_session_continues(pair, extra):
    pair.send(b"X" * (LIMIT - 2 + extra) + b"\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        pair.line()
    assert pair.line() == b"NOOP"


def test_long_line_discarded_across_many_recvs(pair):
    chunks = [b"Y" * 1000] * 40 + [b"Y\r\nQUIT\r\n"]  # 40 000 octets: long, but not a flood
    pair.feed(chunks)
    with pytest.raises(LineTooLong):
        pair.line()
    assert pair.line() == b"QUIT"


def test_flood_without_line_end(pair):
    pair.send(b"Z" * (FLOOD_LIMIT + 10_000))
    with pytest.raises(LineFlood):
        pair.line()


def test_flood_in_small_pieces(pair):
    pair.feed([b"Z" * 4096] * ((FLOOD_LIMIT // 4096) + 4))
    with pytest.raises(LineFlood):
        pair.line()


def test_closed_by_peer(pair):
    pair.send(b"QUIT\r\n")
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.line() == b"QUIT"
    with pytest.raises(ConnectionClosed):
        pair.line()


def test_closed_mid_line(pair):
    pair.send(b"MAIL FROM:<a@b")
    pair.client.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed):
        pair.line()


def test_socket_timeout_is_read_timeout(pair):
    # read_line sets the socket timeout to what is left of its own; the socket.timeout that
    # recv() raises comes out as ReadTimeout
    started = time.monotonic()
    with pytest.raises(ReadTimeout):
        pair.conn.read_line(LIMIT, 0.05)
    assert time.monotonic() - started < SAFETY / 2


def test_line_must_arrive_whole_within_timeout():
    # A client dripping one byte at a time still times out: the limit is for the whole line
    server, client = gevent.socket.socketpair()
    conn = Connection(server)

    def drip():
        for _ in range(100):  # bounded: 100 bytes, 20 ms apart, never a line end
            client.sendall(b"x")
            gevent.sleep(0.02)

    dripper = gevent.spawn(drip)
    started = time.monotonic()
    try:
        with pytest.raises(ReadTimeout):
            conn.read_line(LIMIT, 0.2)
        assert time.monotonic() - started < 1.5
    finally:
        dripper.kill()
        server.close()
        client.close()


def test_replies_are_flushed_before_a_read_blocks(pair):
    pair.conn.write(b"250 first\r\n")
    pair.conn.write(b"250 second\r\n")
    assert unread(pair.client) == 0  # buffered, not sent
    pair.send(b"NOOP\r\n")
    assert pair.line() == b"NOOP"
    assert pair.client.recv(100) == b"250 first\r\n250 second\r\n"


# -- read_data ----------------------------------------------------------------------------
def test_simple_message(pair):
    pair.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    body, result, _ = pair.data()
    assert body == b"Subject: hi\r\n\r\nbody\r\n"
    assert result == DataResult(len(body), None)
    assert pair.conn.pending() == 0


def test_empty_message(pair):
    pair.send(b".\r\n")
    body, result, _ = pair.data()
    assert body == b"" and result == DataResult(0, None)


def test_message_of_one_empty_line(pair):
    pair.send(b"\r\n.\r\n")
    body, result, _ = pair.data()
    assert body == b"\r\n" and result == DataResult(2, None)


@pytest.mark.parametrize(
    "wire, message",
    [
        # RFC 5321 4.5.2: the client doubled every leading "."; we take one away
        (b"..\r\n.\r\n", b".\r\n"),
        (b"..leading\r\n.\r\n", b".leading\r\n"),
        (b"a\r\n...\r\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n"),  # a lone leading "." is removed too
        (b"a.\r\nb..c\r\n.\r\n", b"a.\r\nb..c\r\n"),  # dots elsewhere stay
        (b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n"),
    ],
)
def test_dot_unstuffing(pair, wire, message):
    pair.send(wire)
    body, result, _ = pair.data()
    assert body == message and result == DataResult(len(message), None)


@pytest.mark.parametrize(
    "chunks",
    [
        [b"abc\r", b"\n", b".", b"\r", b"\n"],
        [b"abc\r\n", b".\r\n"],
        [b"abc\r\n.", b"\r\n"],
        [b"abc\r\n.\r", b"\n"],
        [b"abc", b"\r\n.\r\n"],
        [bytes([b]) for b in b"abc\r\n..x\r\n.\r\n"],  # one octet per recv
    ],
)
def test_terminator_split_across_recvs(pair, chunks):
    pair.feed(chunks)
    body, result, _ = pair.data()
    expected = b"".join(chunks)[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
    assert body == expected and result.problem is None


def test_bytes_after_terminator_stay_buffered(pair):
    # RFC 2920: QUIT (or the next MAIL) may follow the final dot in the same packet
    pair.send(b"hi\r\n.\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
    body, result, _ = pair.data()
    assert body == b"hi\r\n" and result.problem is None
    assert pair.conn.pending() == len(b"MAIL FROM:<a@b.test>\r\nQUIT\r\n")
    assert pair.line() == b"MAIL FROM:<a@b.test>"
    assert pair.line() == b"QUIT"


def test_partial_command_after_terminator_stays_buffered(pair):
    pair.feed([b"hi\r\n.\r\nQU", b"IT\r\n"])
    body, _, _ = pair.data()
    assert body == b"hi\r\n"
    assert pair.line() == b"QUIT"


@pytest.mark.parametrize("size, problem", [(100, None), (101, "size")])
def test_size_limit_is_inclusive(pair, size, problem):
    line = b"x" * (size - 2) + b"\r\n"
    pair.send(line + b".\r\n")
    _, result, _ = pair.data(max_size=100)
    assert result.problem == problem


def test_over_size_reads_on_to_the_terminator(pair):
    # SPEC: the server reads on to the end of data, then replies 552 5.3.4
    lines = [b"%05d" % i + b"x" * 90 + b"\r\n" for i in range(200)]
    pair.feed([b"".join(lines[i:i + 7]) for i in range(0, 200, 7)] + [b".\r\nQUIT\r\n"])
    body, result, _ = pair.data(max_size=1000)
    assert result.problem == "size"
    assert len(body) <= 1000
    assert pair.line() == b"QUIT"


@pytest.mark.parametrize("length, problem", [(1000, None), (1001, "line")])
def test_line_limit_counts_crlf(pair, length, problem):
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF
    pair.send(b"a\r\n" + b"L" * (length - 2) + b"\r\nb\r\n.\r\nQUIT\r\n")
    _, result, _ = pair.data(max_line=1000)
    assert result.problem == problem
    assert pair.line() == b"QUIT"


def test_long_line_without_end_for_many_recvs(pair):
    pair.feed([b"ok\r\n"] + [b"L" * 3000] * 20 + [b"\r\nmore\r\n.\r\nQUIT\r\n"])
    _, result, _ = pair.data(max_line=1000)
    assert result.problem == "line"
    assert pair.line() == b"QUIT"


def test_long_line_ending_in_cr_then_terminator(pair):
    # the over-long line is dropped while its CR is still pending; the CRLF.CRLF must be seen
    pair.feed([b"L" * 5000 + b"\r", b"\n.\r\nQUIT\r\n"])
    _, result, _ = pair.data(max_line=1000)
    assert result.problem == "line"
    assert pair.line() == b"QUIT"


@pytest.mark.parametrize(
    "wire",
    [
        b"a\nb\r\n.\r\n",  # bare LF
        b"a\rb\r\n.\r\n",  # bare CR
        b"a\r\r\nb\r\n.\r\n",
        b"a\n\nb\r\n.\r\n",
        b"\n.\r\n.\r\n",  # bare LF first: "\n.\r\n" was no terminator, the next one is
        b"x\r",  # a CR just before the terminator's CRLF: "x\r\r\n.\r\n"
    ],
)
def test_bare_newlines(pair, wire):
    if wire == b"x\r":
        wire += b"\r\n.\r\n"
    pair.send(wire + b"QUIT\r\n")
    _, result, _ = pair.data()
    assert result.problem == "bare"  # 550 5.6.0 by default
    assert pair.line() == b"QUIT"


@pytest.mark.parametrize(
    "wire, normalized",
    [
        (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n..b\r\n.\r\n", b"a\r\n.b\r\n"),  # after normalizing, the dot is unstuffed
    ],
)
def test_bare_newlines_normalized(pair, wire, normalized):
    pair.send(wire + b"QUIT\r\n")
    body, result, _ = pair.data(normalize=True)
    assert result == DataResult(len(normalized), None)
    assert body == normalized
    assert pair.line() == b"QUIT"


# SMTP smuggling (CVE-2023-51764 and friends): only <CRLF>.<CRLF> ends the message
SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r\n.\r\r\n"]
SMUGGLED = b"MAIL FROM:<admin@victim.test>\r\nRCPT TO:<x@victim.test>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize("ending", SMUGGLE)
@pytest.mark.parametrize("normalize", [False, True])
def test_smuggled_end_of_data_is_not_an_end(pair, ending, normalize):
    pair.send(b"Subject: a\r\n\r\nhello" + ending + SMUGGLED + b".\r\nQUIT\r\n")
    body, result, _ = pair.data(normalize=normalize)
    assert result.problem == (None if normalize else "bare")
    assert pair.conn.pending() == len(b"QUIT\r\n")  # read through the real terminator
    if normalize:
        assert b"MAIL FROM:<admin@victim.test>" in body


@pytest.mark.parametrize("start", [b".\n", b".\r", b".\r\r\n"])
def test_smuggled_dot_at_start(pair, start):
    pair.send(start + SMUGGLED + b".\r\nQUIT\r\n")
    _, result, _ = pair.data()
    assert result.problem == "bare"
    assert pair.line() == b"QUIT"


@pytest.mark.parametrize("ending", SMUGGLE)
def test_smuggling_split_across_recvs(pair, ending):
    stream = b"hello" + ending + SMUGGLED + b".\r\nQUIT\r\n"
    pair.feed([bytes([b]) for b in stream[:-6]] + [stream[-6:]])
    _, result, _ = pair.data()
    assert result.problem == "bare"
    assert pair.line() == b"QUIT"


def test_big_message_streams_in_bounded_pieces(pair):
    line = b"x" * 998 + b"\r\n"
    total = 3 * 1024 * 1024
    count = total // len(line)
    pair.feed([line * 100] * (count // 100) + [b".\r\n"])
    body, result, parts = pair.data(max_line=1000)
    assert result == DataResult(len(line) * (count // 100) * 100, None)
    assert body == line * (count // 100) * 100
    # memory stays at one receive buffer: no sink call is bigger than a recv plus a line
    assert max(map(len, parts)) <= RECV_SIZE + 1000


def test_data_timeout_and_socket_timeout_restored(pair):
    pair.server.settimeout(4.0)
    pair.send(b"partial body\r\n")
    with pytest.raises(ReadTimeout):
        pair.data(timeout=0.05)
    assert pair.server.gettimeout() == 4.0


def test_socket_timeout_restored_after_success(pair):
    pair.server.settimeout(3.5)
    pair.send(b"x\r\n.\r\n")
    pair.data(timeout=1.0)
    assert pair.server.gettimeout() == 3.5


def test_closed_during_data(pair):
    pair.send(b"half a message\r\n")
    pair.client.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed):
        pair.data()


def test_data_flushes_pending_replies_first(pair):
    pair.conn.write(b"354 go ahead\r\n")
    pair.send(b".\r\n")
    pair.data()
    assert pair.client.recv(100) == b"354 go ahead\r\n"


# -- properties ---------------------------------------------------------------------------
# any octet but CR, LF and NUL (a NUL refuses the message: test_any_nul_is_refused)
_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
_LINES = st.lists(st.one_of(_LINE, st.sampled_from([b".", b"..", b".x", b""])), max_size=25)


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@PROPERTY
@given(lines=_LINES, cuts=st.lists(st.integers(min_value=0), max_size=12),
       trailer=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"]))
def test_any_chunking_gives_the_same_message(lines, cuts, trailer):
    stream = stuff(lines) + b".\r\n"
    expected = b"".join(ln + b"\r\n" for ln in lines)
    chunks = split(stream, cuts)
    chunks[-1] += trailer  # pipelined commands ride with the final dot
    p = Pair()
    try:
        p.feed(chunks)
        body, result, _ = p.data()
    finally:
        p.close()
    assert body == expected
    assert result == DataResult(len(expected), None)
    q = Pair()  # the same stream in one piece
    try:
        q.send(stream + trailer)
        assert q.data()[:2] == (body, result)
        assert q.conn.pending() == len(trailer)
    finally:
        q.close()


@PROPERTY
@given(lines=_LINES, bare=st.sampled_from([b"\r", b"\n"]), where=st.integers(min_value=0),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_any_bare_cr_or_lf_is_refused(lines, bare, where, cuts):
    body = stuff(lines)
    at = where % (len(body) + 1)
    stream = body[:at] + bare + body[at:] + b"\r\n.\r\n"
    # the only <CRLF>.<CRLF> is the one we put at the end (DATA<CRLF> precedes the stream)
    assume((b"\r\n" + stream).find(b"\r\n.\r\n") == len(stream) - 3)
    p = Pair()
    try:
        p.feed(split(stream, cuts) + [b"QUIT\r\n"])
        _, result, _ = p.data()
        assert result.problem == "bare"
        assert p.line() == b"QUIT"
    finally:
        p.close()


@PROPERTY
@pytest.mark.parametrize("bare", [b"\n", b"\r"])
@given(lines=_LINES, bare_at=st.lists(st.booleans(), max_size=25), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_normalized_bare_newlines_and_dot_stuffing_under_any_chunking(bare, lines, bare_at, cuts):
    """normalize_newlines: lines ended by a bare LF or a bare CR count as CRLF lines, and a
    dot-stuffed line after one is unstuffed, wherever the receives cut the stream. With bare
    CRs (the fuzzer's case) the stream may hold far more than max_line octets before its
    first LF: the answer is the message all the same, never "line too long"."""
    endings = [bare if i < len(bare_at) and bare_at[i] and i < len(lines) - 1 else b"\r\n"
               for i in range(len(lines))]
    stream = b"".join((b"." + ln if ln.startswith(b".") else ln) + end
                      for ln, end in zip(lines, endings)) + b".\r\n"
    expected = b"".join(ln + b"\r\n" for ln in lines)
    p = Pair()
    try:
        p.feed(split(stream, cuts) + [b"QUIT\r\n"])
        body, result, _ = p.data(max_line=60, normalize=True)
        assert (body, result) == (expected, DataResult(len(expected), None))
        assert p.line() == b"QUIT"
    finally:
        p.close()


@PROPERTY
@given(lines=st.lists(_LINE, min_size=1, max_size=10), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_command_lines_survive_any_chunking(lines, cuts):
    stream = b"".join(ln + b"\r\n" for ln in lines)
    p = Pair()
    try:
        p.feed(split(stream, cuts))
        got = []
        for _ in lines:
            try:
                got.append(p.line())
            except LineTooLong:
                got.append(None)
        assert got == [ln if len(ln) + 2 <= LIMIT else None for ln in lines]
    finally:
        p.close()


def test_bare_cr_lines_longer_than_max_line_in_all_before_any_lf(pair):
    """Found by the fuzzer: 250 in one piece, "line too long" when the first receive held
    more than max_line octets of short bare-CR lines and no LF."""
    lines = [b"line %02d of a message with bare CR line ends" % i for i in range(40)]
    wire = b"\r".join(lines) + b"\r\n.\r\n"
    pair.feed([wire[:1500], wire[1500:] + b"QUIT\r\n"])
    body, result, _ = pair.data(max_line=1000, normalize=True)
    expected = b"\r\n".join(lines) + b"\r\n"
    assert (body, result) == (expected, DataResult(len(expected), None))
    assert pair.line() == b"QUIT"


# -- the DATA deadline and the minimum rate (over real sockets, real time) ----------------------
DRIP = Limits(data_timeout=SAFETY, data_deadline=0.3, min_data_rate=1000)


def test_data_dripping_below_the_minimum_rate_is_too_slow(pair):
    # one octet every 20 ms never meets the 5 s silence bound, but earns only 1 ms each
    feeder = pair.feed([b"Subject: drip\r\n\r\n"] + [b"x"] * 200 + [b"\r\n.\r\n"], gap=0.02)
    start = time.monotonic()
    with pytest.raises(DataTooSlow):
        pair.data(limits=DRIP)
    assert DRIP.data_deadline < time.monotonic() - start < 1.5
    assert feeder.is_alive()  # cut off while still dripping, long before its end


def test_data_at_the_minimum_rate_outlasts_the_deadline(pair):
    # 100 octets every 20 ms (5000 B/s, five times the minimum) for about 0.6 s: twice the deadline
    body = [b"y" * 98 + b"\r\n"] * 30
    pair.feed([b"Subject: steady\r\n\r\n"] + body + [b".\r\n"], gap=0.02)
    start = time.monotonic()
    got, result, _ = pair.data(limits=DRIP)
    assert result.problem is None and got.endswith(b"y" * 98 + b"\r\n")
    assert time.monotonic() - start > DRIP.data_deadline


def test_silence_is_a_read_timeout_not_too_slow(pair):
    pair.send(b"Subject: silent\r\n")
    with pytest.raises(ReadTimeout) as caught:
        pair.data(limits=Limits(data_timeout=0.1, data_deadline=SAFETY, min_data_rate=1))
    assert not isinstance(caught.value, DataTooSlow)


def test_line_deadline_shortened_mid_line_counts_from_its_start(pair):
    limit = [SAFETY]
    pair.send(b"MAIL FROM:")

    def shorten():
        time.sleep(0.2)
        limit[0] = 0.3  # as stress would, while the line drips
        pair.client.sendall(b"<")

    t = threading.Thread(target=shorten, daemon=True)
    t.start()
    start = time.monotonic()
    with pytest.raises(ReadTimeout):
        pair.conn.read_line(LIMIT, lambda: limit[0])
    t.join(SAFETY)
    assert 0.25 < time.monotonic() - start < 1.0


# -- NUL in a message (RFC 5322 2.3): refused in both modes ------------------------------------
# a next hop that drops NULs would see <CRLF>.<CRLF> in the first two
NUL_WIRES = [
    b"hello\r\n\x00.\r\n",
    b"hello\r\n.\x00\r\n",
    b"\x00.\r\n",  # the DATA line's CRLF before it
    b"a NUL \x00 mid line\r\n",
    b"hello\r\n..\x00\r\n",  # dot-stuffed
    b"bare\nand \x00\r\n",  # a bare LF as well
]


@pytest.mark.parametrize("wire", NUL_WIRES)
@pytest.mark.parametrize("normalize", [False, True])
def test_nul_refuses_the_message_and_reads_to_the_end(pair, wire, normalize):
    pair.send(wire + SMUGGLED + b".\r\nQUIT\r\n")
    _, result, _ = pair.data(normalize=normalize)
    assert result.problem == "nul"  # (the NUL is seen first, a bare LF beside it or not)
    assert pair.line() == b"QUIT"  # read through the real terminator


@pytest.mark.parametrize("wire", NUL_WIRES[:2])
def test_nul_split_across_receives(pair, wire):
    stream = wire + SMUGGLED + b".\r\nQUIT\r\n"
    pair.feed([bytes([b]) for b in stream[:-6]] + [stream[-6:]])
    _, result, _ = pair.data(normalize=True)
    assert result.problem == "nul"
    assert pair.line() == b"QUIT"


def test_nul_after_a_big_clean_start(pair):
    line = b"x" * 998 + b"\r\n"
    pair.feed([line * 300, b"late \x00\r\n", line * 300, b".\r\nQUIT\r\n"])
    _, result, _ = pair.data(max_line=1000)
    assert result.problem == "nul"
    assert pair.line() == b"QUIT"


# -- unasked: has the client sent more than it was asked for? -----------------------------
def test_unasked_nothing_sent(pair):
    pair.server.settimeout(3.0)
    assert pair.conn.unasked() == 0
    assert pair.server.gettimeout() == 3.0  # the socket's own timeout is put back


def test_unasked_sees_the_socket_and_keeps_the_bytes(pair):
    pair.send(b"EHLO early.test\r\n")
    deadline = time.monotonic() + SAFETY
    while not unread(pair.server) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pair.conn.unasked() > 0
    assert pair.line() == b"EHLO early.test"  # nothing lost
    assert pair.conn.unasked() == 0


def test_unasked_sees_the_buffer(pair):
    pair.send(b"DATA\r\nSubject: not asked for\r\n")
    assert pair.line() == b"DATA"
    assert pair.conn.unasked() > 0


def test_unasked_after_the_peer_closed(pair):
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.conn.unasked() == 0
    with pytest.raises(ConnectionClosed):
        pair.line()


@PROPERTY
@given(lines=st.lists(_LINE, min_size=1, max_size=10), where=st.integers(min_value=0),
       cuts=st.lists(st.integers(min_value=0), max_size=10), normalize=st.booleans())
def test_any_nul_is_refused(lines, where, cuts, normalize):
    """One NUL anywhere in the message, received in any pieces, in either mode: refused, and
    the data read through the real end."""
    body = stuff(lines)
    where %= len(body) + 1
    stream = body[:where] + b"\0" + body[where:] + b"\r\n.\r\nQUIT\r\n"
    p = Pair()
    try:
        p.feed(split(stream, cuts))
        _, result, _ = p.data(normalize=normalize)
        assert result.problem == "nul"
        assert p.line() == b"QUIT"
    finally:
        p.close()


def test_readable_now_sees_input_and_the_peers_end_without_waiting():
    a, b = socket.socketpair()
    try:
        began = time.monotonic()
        assert readable_now(a) is False
        b.sendall(b"421 idle timeout\r\n")
        assert readable_now(a) is True
        a.recv(100)
        assert readable_now(a) is False
        b.close()
        assert readable_now(a) is True  # the end: the next read returns b""
        assert time.monotonic() - began < 1.0  # none of them waited
    finally:
        a.close()
