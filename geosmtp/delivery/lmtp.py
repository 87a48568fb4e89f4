"""Local delivery over LMTP (RFC 2033): hand a message to a mail store such as Dovecot.

LMTPDelivery.deliver() takes one message and the recipients it has for this server and
returns an Outcome per recipient, in order: the reply to its RCPT when that refused it
(550 5.1.1 for an unknown user: permanent), else the server's own reply after the final dot
(LMTP answers once for every accepted recipient, so a 452 for one full mailbox defers that
recipient only). A timeout or a lost connection gives every recipient not yet answered a 4xx:
they are deferred, the ones answered stand, and nothing is sent twice within one call. The
spool is never touched here.

The server is "unix:/path" (no TLS: the socket is local) or "host:port". Connections are
kept idle for a while and reused, as relay.pool does for SMTP; the number open at once is
bounded (Dovecot's lmtp service has a process_limit of its own).
"""
from __future__ import annotations

from dataclasses import replace
from time import monotonic
from typing import BinaryIO, Callable

import gevent
import gevent.lock

from geosmtp.delivery.target import Message, OpenBody, Outcome
from geosmtp.relay.client import Client, StaleConnection, Timeouts
from geosmtp.relay.errors import DeliveryError, PermanentError, TransientError
from geosmtp.relay.pool import MAX_TRANSACTIONS

UNIX = "unix:"


def parse_address(address: str) -> tuple[str, int | None]:
    """ "unix:/run/dovecot/lmtp" -> ("/run/dovecot/lmtp", None); "127.0.0.1:24" or
    "[::1]:24" -> (host, port). ValueError says what is wrong with anything else."""
    if address.startswith(UNIX):
        path = address[len(UNIX):]
        if not path.startswith("/"):
            raise ValueError(f"LMTP socket path must be absolute: {address!r}")
        return path, None
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"LMTP server must be \"unix:/path\" or \"host:port\": {address!r}")
    return host, int(port)


class LMTPDelivery:
    def __init__(self, address: str, timeouts: Timeouts = Timeouts(), *, hostname: str,
                 max_connections: int = 10, max_idle: int = 4, idle_time: float = 30.0,
                 base_of: Callable[[str], str | None] = lambda address: None):
        self.address = address
        self.base_of = base_of  # "alice+lists@x" → "alice@x" (the directory's sub-address rule)
        self.host, self.port = parse_address(address)
        self.timeouts = timeouts
        self.hostname = hostname  # our name in LHLO
        self.max_idle = max_idle
        self.idle_time = idle_time
        self._slots = gevent.lock.BoundedSemaphore(max_connections)
        self._idle: list[Client] = []
        self._reaper: gevent.Greenlet | None = None
        self.connections = 0  # opened so far (a test and a log line read it)

    # -- one message -------------------------------------------------------------------------
    kind = "lmtp"

    def destination(self, domain: str) -> str:
        return self.address  # every recipient of a message for this server: one transaction

    def deliver(self, destination: str, msg: Message, open_body: OpenBody) -> list[Outcome]:
        """Deliver `msg` to msg.recipients (the address to give in each RCPT: the one the
        message was sent to, with its +detail, so the server can file it); an Outcome for
        each, in order. `open_body()` gives the message from its first header line."""
        recipients = msg.recipients
        if not recipients:
            return []
        if msg.originals:  # the address as sent, +detail and all, when it names this mailbox
            recipients = tuple(o if o.lower() != a.lower() and self.base_of(o.lower()) == a.lower() else a
                               for a, o in zip(recipients, msg.originals))
            msg = replace(msg, recipients=recipients)
        with self._slots:
            try:
                client = self._client()
            except DeliveryError as exc:
                return [Outcome(exc.reply, exc.remote)] * len(recipients)
            return self._transact(client, msg, open_body)

    def _transact(self, client: Client, msg: Message, open_body: Callable[[], BinaryIO]) -> list[Outcome]:
        try:
            try:
                with open_body() as body:
                    replies = client.send(msg, body)
            except StaleConnection:
                # a kept connection the server had closed meanwhile: nothing was taken, so
                # the message goes once more, on a fresh connection
                client.close()
                client = self._connect()
                with open_body() as body:
                    replies = client.send(msg, body)
        except PermanentError as exc:  # it can never take this message (SMTPUTF8, SIZE)
            self._release(client)
            return [Outcome(exc.reply, exc.remote)] * len(msg.recipients)
        except TransientError as exc:
            client.close()
            return [Outcome(exc.reply, exc.remote)] * len(msg.recipients)
        self._release(client)
        return [Outcome(r, client.label, "none") for r in replies]  # a session, without TLS

    # -- connections -------------------------------------------------------------------------
    def _client(self) -> Client:
        """A kept connection still fit to use, or a new one."""
        while self._idle:
            client = self._idle.pop()
            if not client.quiet():  # the server closed it or spoke (a 421 on its idle timeout)
                client.close()
            elif monotonic() - client.idle_since < self.idle_time:
                return client
            else:
                gevent.spawn(client.quit)
        return self._connect()

    def _connect(self) -> Client:
        label = f"[{self.address}]"
        if self.port is None:
            client = Client.open_unix(self.host, label, self.timeouts)
        else:
            client = Client.open(self.host, self.port, label, self.timeouts)
        self.connections += 1
        try:
            client.lhlo(self.hostname)
        except BaseException:
            client.close()
            raise
        client.label = f"{client.server_name}{label}"  # "mail.example.com[unix:/run/dovecot/lmtp]"
        return client

    def _release(self, client: Client) -> None:
        """Keep a clean connection for the next message, or say goodbye."""
        if (client.broken or client.transactions >= MAX_TRANSACTIONS or self.idle_time <= 0
                or len(self._idle) >= self.max_idle):
            gevent.spawn(client.quit)
            return
        client.idle_since = monotonic()
        self._idle.append(client)
        if self._reaper is None:
            self._reaper = gevent.spawn(self._reap)

    def _reap(self) -> None:
        """Close connections idle too long."""
        while True:
            gevent.sleep(self.idle_time / 2)
            now = monotonic()
            keep = []
            for client in self._idle:
                if now - client.idle_since < self.idle_time and not client.broken:
                    keep.append(client)
                else:
                    gevent.spawn(client.quit)
            self._idle[:] = keep

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper = None
        idle, self._idle = self._idle, []
        gevent.joinall([gevent.spawn(c.quit) for c in idle], timeout=5)
