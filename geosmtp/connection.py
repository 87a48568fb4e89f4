"""The byte stream of one SMTP connection: bounded line reads, the DATA reader, buffered writes.

Every read is bounded in size and time. Replies are buffered and flushed only before a read
would block, which is what RFC 2920 (PIPELINING) asks of a server. The session owns one
Connection; a STARTTLS upgrade replaces the socket and throws the old buffer away.
"""
from __future__ import annotations

import fcntl
import re
import select
import socket
import ssl
import struct
import termios
from dataclasses import dataclass
from time import monotonic
from typing import Callable

import gevent
from gevent.monkey import get_original

from geosmtp import linescan

RECV_SIZE = 256 * 1024
# A command line longer than the limit is discarded up to its LF; past this much discarded
# input with no LF at all, the client is not speaking SMTP and is disconnected.
FLOOD_LIMIT = 64 * 1024


_poll = get_original("select", "poll")  # the kernel's poll: with a zero timeout it never waits


def readable_now(sock: socket.socket) -> bool:
    """Whether a read on `sock` would not wait (input, or the peer's end), asked of the
    kernel at once: one poll(2) with no timeout, none of the hub's machinery of a select."""
    poller = _poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class ConnectionClosed(Exception):
    """The peer closed the connection or the socket failed."""


class ReadTimeout(Exception):
    """No complete command (or no DATA bytes) within the allowed time."""


class DataTooSlow(ReadTimeout):
    """A DATA body fell behind the minimum data rate (geosmtp.limits.DataClock)."""


class LineTooLong(Exception):
    """A line over the limit; it has been read and discarded through its end."""


class LineFlood(Exception):
    """Far too much input without a line end; the connection should be closed."""


class HandshakeFailed(Exception):
    """The TLS handshake failed or took too long; the connection is unusable."""


class BareNewline(Exception):
    """A command line ended in a bare LF, or held a lone CR; it has been consumed."""


@dataclass(slots=True)
class DataResult:
    size: int  # octets after dot-unstuffing: given to the sink, or read until a problem
    problem: str | None  # None, "size", "line", "bare" or "nul": the message must not be queued


_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


class Connection:
    def __init__(self, sock: socket.socket, send_timeout: float = 300.0):
        self.sock = sock
        self.send_timeout = send_timeout  # a client that does not read its replies
        self._buf = bytearray()
        self._out: list[bytes] = []
        self.reading = False  # blocked in a receive now: interrupting it loses nothing
        self._tls = False  # the socket is an SSLSocket (start_tls)

    # -- output -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            try:
                self.sock.settimeout(self.send_timeout)  # reads leave their own timeout set
                # send() in a loop: gevent's sendall() asks for SO_SNDBUF on every call, and
                # replies are small enough to go out in one send() nearly always
                while data:
                    data = data[self.sock.send(data):]
            except (OSError, socket.timeout) as exc:
                raise ConnectionClosed(str(exc)) from None

    def start_tls(self, context, timeout: float, server_hostname: str | None = None) -> str:
        """Wrap the live socket in TLS under one overall timeout: the server side, or the
        client side when `server_hostname` (sent as SNI, checked if the context verifies) is
        given. Returns "version cipher". The receive buffer is replaced: not one byte read
        before the handshake is ever taken as a command or reply afterwards."""
        self.flush()
        self._buf = bytearray()
        tls = None
        try:
            with gevent.Timeout(timeout, HandshakeFailed("timeout")):
                tls = context.wrap_socket(self.sock, server_side=server_hostname is None,
                                          server_hostname=server_hostname,
                                          do_handshake_on_connect=False)
                self.sock = tls
                self._tls = True
                tls.do_handshake()
        except HandshakeFailed:
            raise
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise HandshakeFailed(getattr(exc, "reason", None) or str(exc) or type(exc).__name__) from None
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- input ------------------------------------------------------------------------------
    def pending(self) -> int:
        """Bytes received but not yet consumed (pipelined input, or injected before TLS)."""
        return len(self._buf)

    def unasked(self) -> int:
        """Octets the client has sent that nothing has asked for yet: received already, or
        in the socket right now, without waiting. On a plain socket the kernel's count
        (FIONREAD: one call, nothing taken); over TLS one receive that does not wait, whose
        bytes join the buffer (so nothing is lost) and in which only whole records count.
        A peer that has closed is no input: the next read finds that out."""
        if self._buf:
            return len(self._buf)
        sock = self.sock
        if not self._tls:
            try:
                return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None
        try:
            old_timeout = sock.gettimeout()
            sock.settimeout(0.0)
            try:
                data = sock.recv(RECV_SIZE)
            finally:
                sock.settimeout(old_timeout)
        except (BlockingIOError, ssl.SSLWantReadError, socket.timeout):
            return 0
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        self._buf += data
        return len(data)

    def discard_pending(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        return n

    def _fill(self, deadline: float | None = None, size: int = RECV_SIZE) -> None:
        """One receive of at most `size` octets onto the buffer (the PROXY reader asks for
        no more than the header can still hold, so a TLS ClientHello behind it stays in the
        socket for the handshake)."""
        self.flush()  # never wait for input while the client may be waiting for our replies
        try:
            if deadline is not None:
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise ReadTimeout()
                self.sock.settimeout(remaining)
            self.reading = True
            data = self.sock.recv(size)
        except socket.timeout:
            raise ReadTimeout() from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        finally:
            self.reading = False
        if not data:
            raise ConnectionClosed("closed by peer")
        self._buf += data

    def read_line(self, limit: int, timeout: float | Callable[[], float], strict: bool = True) -> bytes:
        """One line without its CRLF. `limit` counts the CRLF (RFC 5321 4.5.3.1.4: 512).

        The whole line must arrive within `timeout` seconds, however slowly it drips: each
        receive may wait only for what is left of that time. A callable `timeout` is asked
        again before each receive (a limit shortened meanwhile counts from the line's start).
        Not `strict` (the client reading a server's replies), a bare LF ends a line too and a
        stray CR is kept.
        """
        buf = self._buf
        started = None
        while True:
            end = buf.find(b"\n", 0, limit)
            if end >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                    if strict:
                        raise BareNewline()
                    return line.rstrip(b"\r\n")
                return line[:-2]
            if started is None:
                started = monotonic()
            deadline = started + (timeout() if callable(timeout) else timeout)
            if len(buf) >= limit:
                self._discard_line(deadline)
                raise LineTooLong()
            self._fill(deadline)

    def _discard_line(self, deadline: float) -> None:
        discarded = 0
        buf = self._buf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                del buf[: end + 1]
                return
            discarded += len(buf)
            buf.clear()
            if discarded > FLOOD_LIMIT:
                raise LineFlood()
            self._fill(deadline)

    def read_data(self, sink, max_size: int, max_line: int, normalize: bool, clock) -> DataResult:
        """Read a DATA body through <CRLF>.<CRLF> and hand it, unstuffed, to sink(bytes).

        Only CR LF "." CR LF ends the message (RFC 5321 4.1.1.4): a bare LF or CR never does,
        so "\\n.\\n" and its cousins cannot smuggle a second message. A bare LF or CR makes the
        message fail (problem "bare") unless `normalize` turns them into CRLF. A NUL makes
        it fail (problem "nul") either way. Past `max_size`
        or a line over `max_line` (counting CRLF) the rest is read and dropped, so the reply
        comes at the end of the data. Memory stays at one receive buffer whatever the size.
        `clock` (a geosmtp.limits.DataClock) bounds each receive and the body as a whole.
        """
        size = 0
        problem: str | None = None
        tail = b"\r\n"  # the two bytes before the current block: DATA<CRLF> ended a line
        buf = self._buf
        self.flush()
        old_timeout = self.sock.gettimeout()
        try:
            while True:
                end = self._lines_end(buf, normalize)
                if not end:
                    if len(buf) > max_line:  # a line over the limit with no end in sight
                        problem = problem or "line"
                        tail = bytes(buf[-2:])
                        buf.clear()
                    self._receive(clock)
                    continue
                block = tail + bytes(buf[:end])  # from the CRLF that may begin "\r\n.\r\n"
                found, stuffed, clean = self._find_end(block, max_line, normalize, problem is None)
                if found >= 0:
                    content = block[2 : found + 2]
                    del buf[: found + 3]
                else:
                    content = block[2:]
                    del buf[:end]
                    tail = block[-2:]
                if problem is None and content:
                    problem, content = self._check(content, max_line, normalize, stuffed, clean)
                if problem is None:
                    size += len(content)
                    if size > max_size:
                        problem = "size"
                    elif content:
                        sink(content)
                if found >= 0:
                    return DataResult(size, problem)
                if not buf or b"\n" not in buf:
                    self._receive(clock)
        finally:
            try:
                self.sock.settimeout(old_timeout)
            except OSError:
                pass

    @staticmethod
    def _find_end(block: bytes, max_line: int, normalize: bool, checking: bool) -> tuple[int, bool, bool]:
        """(where <CRLF>.<CRLF> begins in the block or -1, whether a line in it may be
        dot-stuffed, whether its lines before the end are known clean). A big block still
        being checked is scanned by vector compares (geosmtp.linescan); a small one, or one
        the scan steps aside for, by bytes methods."""
        if checking and not normalize and len(block) >= linescan.VECTOR_MIN:
            lines = linescan.scan(block, max_line)
            if lines is not None:
                return lines.end, lines.stuffed, True
        # "\r\n." starts both the end of the data and a dot-stuffed line: a block without
        # it (most of a long message) needs neither search twice
        dot = block.find(b"\r\n.")
        found = -1 if dot < 0 else block.find(b"\r\n.\r\n", dot)
        # (after a normalised bare LF the tail is no CRLF: look again)
        return found, dot >= 0 or not block.startswith(b"\r\n"), False

    def _receive(self, clock) -> None:
        """One receive of message data, as long as `clock` allows; it learns what came."""
        before = len(self._buf)
        try:
            self._fill(monotonic() + clock.wait())
        except ReadTimeout:
            raise clock.expired() from None
        clock.got(len(self._buf) - before)

    @staticmethod
    def _lines_end(buf: bytearray, normalize: bool) -> int:
        """Where the complete lines in `buf` end (0: none yet). A line ends at LF; with
        `normalize` at a bare CR too, so short bare-CR lines are never taken for one long
        line whatever the receives' sizes. A CR as the last octet may be the first half of a
        CRLF: it ends a line only once the next octet is there."""
        end = buf.rfind(b"\n") + 1
        if normalize:
            end = max(end, buf.rfind(b"\r", 0, len(buf) - 1) + 1)
        return end

    @staticmethod
    def _check(content: bytes, max_line: int, normalize: bool, stuffed: bool = True,
               clean: bool = False) -> tuple[str | None, bytes]:
        """Whole complete lines → (problem, unstuffed lines). C-speed scans, no per-line loop.
        `stuffed` False: the caller saw no "\r\n." in these lines (with the CRLF before them).
        `clean`: geosmtp.linescan found no bare CR or LF and no long line in them."""
        # RFC 5322 2.3 and RFC 6152 2: no NUL in a message, 8BITMIME or not. A next hop that
        # drops NULs would read "\r\n\0.\r\n" as the end of data: relaying it byte for byte
        # makes us the smuggler. Refused even with `normalize`: dropping the NUL is exactly
        # what builds that end of data, no real mail program sends NULs (unlike bare LFs),
        # and the message would not be what its author (or a DKIM signature) said.
        if b"\0" in content:
            return "nul", content
        if not clean:
            # every CR and LF is part of a CRLF exactly when they number twice the CRLFs
            # (two passes; counting CR, LF and CRLF one by one takes three slower ones)
            if len(content) - len(content.translate(None, b"\r\n")) != 2 * content.count(b"\r\n"):
                if not normalize:
                    return "bare", content
                content = _ANY_NEWLINE.sub(b"\r\n", content)
                stuffed = True  # a bare LF before a "." has just become a CRLF
            if len(content) >= max_line and _has_long_line(content, max_line):
                return "line", content
        # RFC 5321 4.5.2: a line that begins with "." had one more "." added by the client
        if stuffed:
            if content[:1] == b".":
                content = content[1:]
            if b"\r\n." in content:
                content = content.replace(b"\r\n.", b"\r\n")
        return None, content


def _has_long_line(content: bytes, max_line: int) -> bool:
    """Whether some line (CRLF included) is longer than max_line, i.e. max_line bytes in a
    row without LF. Jumps a window at a time to the last LF in it: len/max_line steps."""
    pos, end = 0, len(content)
    while pos + max_line <= end:
        lf = content.rfind(b"\n", pos, pos + max_line)
        if lf < 0:
            return True
        pos = lf + 1
    return False
