"""An HTTP/1.1 client for rspamd's worker protocol: kept connections, one request at a time
on each, the request body streamed from a file, the reply bounded in size and in time.

http.client (the standard library) does the HTTP; its connections are made with gevent's
socket, so a request waits cooperatively whether or not the process is monkey-patched (the
server is; unit tests are not). No third-party client is needed: one POST and one GET to
one server, with our own limits, is all rspamd asks of us.

Connections are kept per process in a small pool, as geosmtp.checks.policy_client does for
policy servers: a greenlet takes one, uses it alone and puts it back. rspamd's normal worker
(3.4) answers "Connection: close" to every request, so against it each request opens its
own connection; a server that keeps them (rspamd's proxy worker, a load balancer) gets them
reused. A kept connection is retired after `max_idle` unused, when the server said close,
after any error, and when the server closed it meanwhile (noticed before sending; if the
race is lost, the request fails before any reply octet and is sent once more on a new
connection).

`url` is "http://IP:port" or "unix:/path": an IP address, never a name (the system resolver
is not something we use).
"""
from __future__ import annotations

import http.client
import ipaddress
import os
import re
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable

import gevent
from gevent import socket

from geosmtp.checks.kept import KeptConnections

SEND_CHUNK = 64 * 1024


class RspamdUnavailable(Exception):
    """No reply from rspamd: it cannot be reached, closed the connection, or was too slow."""


class RspamdBadReply(Exception):
    """rspamd (or whatever listens there) answered something we cannot use."""


def parse_url(url: str) -> tuple[int, object, str]:
    """(socket family, address, Host header) for "http://127.0.0.1:11333", "http://[::1]:11333"
    or "unix:/run/rspamd/normal.sock"."""
    if url.startswith("unix:"):
        path = url[5:]
        if not path.startswith("/"):
            raise ValueError("unix: needs an absolute path, e.g. \"unix:/run/rspamd/normal.sock\"")
        return socket.AF_UNIX, path, "localhost"
    m = re.fullmatch(r"http://(?:\[([^\]/\s]+)\]|([^:/\[\]\s]+))(?::(\d{1,5}))?/?", url)
    if not m:
        raise ValueError("must be \"http://IP:port\" (\"http://127.0.0.1:11333\", \"http://[::1]:11333\") "
                         "or \"unix:/path\"")
    try:
        ip = ipaddress.ip_address(m.group(1) or m.group(2))
    except ValueError:
        raise ValueError(f"{m.group(1) or m.group(2)!r} is not an IP address") from None
    port = int(m.group(3) or 11333)
    if not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    host = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, (str(ip), port), host


class _Connection(http.client.HTTPConnection):
    """An HTTPConnection over a gevent socket of the given family (TCP or a unix socket)."""

    def __init__(self, family: int, sockaddr: object, host: str, connect_timeout: float):
        super().__init__(host, timeout=connect_timeout)
        self.family = family
        self.sockaddr = sockaddr
        self.opened = time.monotonic()
        self.used = self.opened
        self.pid = os.getpid()

    def connect(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.sockaddr)
            if self.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict = field(default_factory=dict)


class _Stale(Exception):
    """A kept connection the server had closed: nothing of the reply came."""


class RspamdClient(KeptConnections):
    """Requests to one rspamd worker over up to `max_connections` kept connections."""

    def __init__(self, url: str, connect_timeout: float = 2.0, read_timeout: float = 15.0,
                 max_reply_size: int = 1 << 20, max_idle: float = 60.0, max_connections: int = 16):
        super().__init__(max_idle, max_connections)
        self.url = url
        self.family, self.sockaddr, self.host = parse_url(url)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_reply_size = max_reply_size

    def _open(self) -> _Connection:
        conn = _Connection(self.family, self.sockaddr, self.host, self.connect_timeout)
        try:
            conn.connect()
        except (socket.timeout, TimeoutError):
            conn.close()
            raise RspamdUnavailable(f"connect to {self.url} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            conn.close()
            raise RspamdUnavailable(f"cannot connect to {self.url}: {exc.strerror or exc}") from None
        return conn

    # -- requests -----------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: Iterable[tuple[str, bytes]] = (),
                body: Callable[[], BinaryIO] | None = None) -> Reply:
        """One request; `body` opens the file to send (from its current position to its end,
        with that length as Content-Length), again if the request must be sent twice.
        RspamdUnavailable or RspamdBadReply when there is no usable reply."""
        wait = self.connect_timeout + self.read_timeout
        if not self._slots.acquire(timeout=wait):
            raise RspamdUnavailable(f"all {self.max_connections} connections to {self.url} busy for {wait:g}s")
        try:
            headers = list(headers)
            for attempt in (1, 2):
                conn, kept = self._checkout()
                try:
                    return self._exchange(conn, kept, method, path, headers, body)
                except _Stale:
                    if attempt == 2:
                        raise RspamdUnavailable(f"{self.url} closed the connection without a reply") from None
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def _exchange(self, conn: _Connection, kept: bool, method: str, path: str,
                  headers: list[tuple[str, bytes]], body: Callable[[], BinaryIO] | None) -> Reply:
        done = False
        try:
            conn.sock.settimeout(self.read_timeout)
            conn.putrequest(method, path, skip_accept_encoding=True)
            if body is None:
                self._send_head(conn, headers, None)
            else:
                with body() as fh:
                    length = remaining_length(fh)
                    self._send_head(conn, headers, length)
                    send_exactly(conn.sock, fh, length)
            reply = self._read_reply(conn)
            done = True
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            if kept:  # a kept connection the server had closed meanwhile: once more, afresh
                raise _Stale() from None
            raise RspamdUnavailable(f"{self.url}: {describe(exc)}") from None
        except (socket.timeout, TimeoutError):
            raise RspamdUnavailable(f"no reply from {self.url} in {self.read_timeout:g}s") from None
        except http.client.HTTPException as exc:  # a status line or header that is not HTTP
            raise RspamdBadReply(f"{self.url}: not an HTTP reply ({describe(exc)})") from None
        except OSError as exc:
            raise RspamdUnavailable(f"{self.url}: {describe(exc)}") from None
        finally:
            if not done:
                conn.close()
        return reply

    @staticmethod
    def _send_head(conn: _Connection, headers: list[tuple[str, bytes]], length: int | None) -> None:
        for name, value in headers:
            conn.putheader(name, value)
        if length is not None:
            conn.putheader("Content-Length", str(length))
        conn.endheaders()

    def _read_reply(self, conn: _Connection) -> Reply:
        """The whole reply within read_timeout (a server dripping octets gets no more time),
        at most max_reply_size octets of body; the connection kept when the server allows it."""
        limit = self.max_reply_size
        with gevent.Timeout(self.read_timeout, socket.timeout("reply not complete in time")):
            resp = conn.getresponse()
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                conn.close()
                raise RspamdBadReply(f"{self.url}: reply of {declared} octets, over max_reply_size {limit}")
            data = resp.read(limit + 1)
        if len(data) > limit:
            conn.close()
            raise RspamdBadReply(f"{self.url}: reply over max_reply_size {limit} octets")
        if resp.isclosed() and not resp.will_close:
            self._checkin(conn)
        else:
            conn.close()
        return Reply(resp.status, data, {k.lower(): v for k, v in resp.getheaders()})


def remaining_length(fh: BinaryIO) -> int:
    """Octets from the file's position to its end (the file is not read for it)."""
    pos = fh.tell()
    try:
        return os.fstat(fh.fileno()).st_size - pos
    except (AttributeError, OSError, ValueError):  # not a real file (io.BytesIO in a test)
        end = fh.seek(0, os.SEEK_END)
        fh.seek(pos)
        return end - pos


def send_exactly(sock, fh: BinaryIO, length: int) -> None:
    """Send `length` octets of `fh` in chunks; a file that ends early is an error (the
    Content-Length we sent would be a lie and the stream out of step)."""
    left = length
    while left > 0:
        chunk = fh.read(min(SEND_CHUNK, left))
        if not chunk:
            raise RspamdUnavailable(f"message file ended {left} octets early")
        sock.sendall(chunk)
        left -= len(chunk)


def describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
