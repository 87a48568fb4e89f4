"""The client side of the Postfix policy delegation protocol: kept connections, one request
at a time on each.

A request is "name=value" lines and an empty line; the reply is the same (SMTPD_POLICY_README).
A policy server keeps the connection open between requests, so connections are kept per
process in a small pool: a greenlet takes one out, uses it alone and puts it back, so two
sessions never interleave on one socket. A kept connection is retired after `max_idle`
unused or `max_ttl` since it opened (Postfix's smtpd_policy_service_max_idle and _max_ttl),
after any error, and when the server closed it (noticed before sending, and if the race is
lost, by the write or the read failing: the request is then tried again on a new
connection, up to `try_limit` attempts in all).

Every connect has `connect_timeout`, every reply must be complete within `read_timeout`, and
a reply is at most 8 KiB. Only greenlets use this (no threads): the pool's list is changed
without a switch in between.
"""
from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import dataclass, field

import gevent
from gevent import socket

from geosmtp.checks.kept import KeptConnections

REPLY_LIMIT = 8192  # octets of one reply, the empty line included
_END = re.compile(rb"(?:^|\n)\r?\n")  # the empty line that ends a reply (CRLF tolerated)


class PolicyUnavailable(Exception):
    """No answer from the policy server: it cannot be reached, closed, or did not reply in time."""


class UnreadableReply(Exception):
    """The policy server answered something that is not a reply (too long, cut short)."""


def parse_address(address: str) -> tuple[int, object]:
    """(socket family, address) for "127.0.0.1:10023", "inet:127.0.0.1:10023",
    "[::1]:10023" or "unix:/run/policy.sock". An IP address, never a name: asking the
    system resolver for the policy server is not something we do."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError("unix: needs an absolute path, e.g. \"unix:/run/postgrey.sock\"")
        return socket.AF_UNIX, path
    rest = address[5:] if address.startswith("inet:") else address
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s/]+):(\d{1,5})", rest)
    if not m:
        raise ValueError("must be \"IP:port\" (\"127.0.0.1:10023\", \"[::1]:10023\") or \"unix:/path\"")
    try:
        ip = ipaddress.ip_address(m.group(1) or m.group(3))
    except ValueError:
        raise ValueError(f"{m.group(1) or m.group(3)!r} is not an IP address") from None
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port)
    return socket.AF_INET, (str(ip), port)


@dataclass
class _Connection:
    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)
    pid: int = field(default_factory=os.getpid)
    requests: int = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Closed(Exception):
    """The server closed the connection (or reset it) before any octet of the reply."""


def parse_reply(data: bytes) -> dict[str, str]:
    """The attributes of one reply (without its empty line); the first of a repeated name."""
    attrs: dict[str, str] = {}
    for line in data.split(b"\n"):
        name, eq, value = line.rstrip(b"\r").partition(b"=")
        if eq:
            attrs.setdefault(name.decode("utf-8", "replace").strip().lower(), value.decode("utf-8", "replace"))
    return attrs


class PolicyClient(KeptConnections):
    """Requests to one policy server, over up to `max_connections` kept connections."""

    def __init__(self, address: str, connect_timeout: float = 2.0, read_timeout: float = 7.0,
                 max_idle: float = 300.0, max_ttl: float = 1000.0, try_limit: int = 2,
                 retry_delay: float = 1.0, max_connections: int = 16):
        self.address = address
        self.family, self.sockaddr = parse_address(address)
        super().__init__(max_idle, max_connections, max_ttl)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.try_limit = max(1, try_limit)
        self.retry_delay = retry_delay

    def _open(self) -> _Connection:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(self.sockaddr)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)

    # -- one request --------------------------------------------------------------------------
    def ask(self, request: bytes) -> dict[str, str]:
        """The reply's attributes. PolicyUnavailable or UnreadableReply when there is none."""
        wait = self.connect_timeout + self.read_timeout
        if not self._slots.acquire(timeout=wait):
            raise PolicyUnavailable(f"all {self.max_connections} connections busy for {wait:g}s")
        try:
            return self._ask(request)
        finally:
            self._slots.release()

    def _ask(self, request: bytes) -> dict[str, str]:
        for attempt in range(1, self.try_limit + 1):
            last = attempt == self.try_limit
            try:
                conn, kept = self._checkout()
            except (socket.timeout, TimeoutError):
                raise PolicyUnavailable(f"connect to {self.address} timed out after {self.connect_timeout:g}s") from None
            except OSError as exc:
                if last:
                    raise PolicyUnavailable(f"cannot connect to {self.address}: {exc.strerror or exc}") from None
                gevent.sleep(self.retry_delay)
                continue
            try:
                conn.sock.settimeout(self.read_timeout)
                conn.sock.sendall(request)
                reply, clean = self._read(conn.sock)
            except _Closed:
                conn.close()
                if last:
                    raise PolicyUnavailable(f"{self.address} closed the connection without a reply") from None
                if not kept:  # a fresh connection closed at once: give the server a moment
                    gevent.sleep(self.retry_delay)
                continue
            except (socket.timeout, TimeoutError):
                conn.close()  # a slow server stays slow: no second try
                raise PolicyUnavailable(f"no reply from {self.address} in {self.read_timeout:g}s") from None
            except OSError as exc:  # EPIPE, ECONNRESET writing to a connection the server dropped
                conn.close()
                if last:
                    raise PolicyUnavailable(f"{self.address}: {exc.strerror or exc}") from None
                if not kept:
                    gevent.sleep(self.retry_delay)
                continue
            except BaseException:  # UnreadableReply, the engine's timeout: the stream is out of step
                conn.close()
                raise
            conn.requests += 1
            if clean:
                self._checkin(conn)
            else:
                conn.close()
            return parse_reply(reply)
        raise PolicyUnavailable(f"no reply from {self.address} in {self.try_limit} attempts")

    def _read(self, sock: socket.socket) -> tuple[bytes, bool]:
        """(one reply without its empty line, whether nothing followed it) within read_timeout."""
        deadline = time.monotonic() + self.read_timeout
        buf = b""
        while True:
            m = _END.search(buf)
            if m:
                if m.end() > REPLY_LIMIT:
                    raise UnreadableReply(f"reply over {REPLY_LIMIT} octets")
                return buf[:m.start()], m.end() == len(buf)
            if len(buf) > REPLY_LIMIT:
                raise UnreadableReply(f"reply over {REPLY_LIMIT} octets")
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("reply not complete in time")
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                if buf:
                    raise UnreadableReply("connection reset in the middle of a reply") from None
                raise _Closed() from None
            if not data:
                if buf:
                    raise UnreadableReply("connection closed in the middle of a reply")
                raise _Closed()
            buf += data
