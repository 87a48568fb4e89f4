"""Delivery to one destination: which hosts, in what order, over which connection.

Relay.deliver() takes one message and the recipients it has at one destination (a domain,
or the smarthost, for the recipients of every domain at once) and returns an Outcome per
recipient. Within one attempt every MX host and every address of each is tried until one
of them takes part in a transaction (RFC 5321 5.1); only failures before MAIL FROM move on
to the next host, so a message is never offered twice in one attempt. Connections are kept
for a few seconds and reused for the next message to the same address; each destination
has a limit on parallel connections. TLS follows the destination's policy.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from time import monotonic
from typing import BinaryIO, Callable

import gevent
import gevent.lock
from gevent import ssl
from loguru import logger

from geosmtp.delivery.target import Message, Outcome
from geosmtp.relay.client import Client, StaleConnection, Timeouts
from geosmtp.relay.errors import DeliveryError, PermanentError, TransientError
from geosmtp.relay.mx import Host, MXResolver
from geosmtp.replies import Reply

MAX_TRANSACTIONS = 100  # per connection, then a new one (spreads load, bounds a session)
OPPORTUNISTIC, REQUIRED, VERIFY = "opportunistic", "required", "verify"


def tls_state(client: Client, policy: str) -> str:
    """What protected the transaction: the TLS version, and whether the certificate was
    checked (only the "verify" policy checks the chain and the host name)."""
    if client.tls is None:
        return "none"
    return f"{client.tls.partition(' ')[0]} {'verified' if policy == VERIFY else 'unverified'}"


@dataclass(frozen=True)
class RelaySettings:
    helo_name: str
    port: int = 25
    tls: str = OPPORTUNISTIC
    tls_policy: dict[str, str] = field(default_factory=dict)  # destination → mode
    ca_file: str | None = None
    smarthost: tuple[str, int] | None = None
    smarthost_auth: tuple[str, str] | None = None  # (user, password)
    per_destination: int = 10
    timeouts: Timeouts = Timeouts()
    idle_time: float = 5.0


def client_contexts(ca_file: str | None) -> dict[str, ssl.SSLContext]:
    """Opportunistic and "required" TLS take any certificate (RFC 7435: encryption without
    authentication beats plaintext); "verify" checks the chain and the host name."""
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname = False
    plain.verify_mode = ssl.CERT_NONE
    verify = ssl.create_default_context(cafile=ca_file)
    return {OPPORTUNISTIC: plain, REQUIRED: plain, VERIFY: verify}


class Relay:
    kind = "relay"

    def __init__(self, mx: MXResolver, settings: RelaySettings):
        self.mx = mx
        self.settings = settings
        self.contexts = client_contexts(settings.ca_file)
        self._idle: dict[tuple, list[Client]] = defaultdict(list)
        self._slots: dict[str, gevent.lock.BoundedSemaphore] = {}
        self._reaper: gevent.Greenlet | None = None

    def policy(self, destination: str) -> str:
        return self.settings.tls_policy.get(destination, self.settings.tls)

    def destination(self, domain: str) -> str:
        """What connections and limits are shared by: the smarthost, or the domain."""
        return self.settings.smarthost[0].lower() if self.settings.smarthost else domain.lower()

    # -- one message, one destination -------------------------------------------------------
    def deliver(self, destination: str, msg: Message, open_body: Callable[[], BinaryIO]) -> list[Outcome]:
        """Try to hand `msg` to the servers of `destination` (what destination() says: the
        recipients' domain, or the smarthost, which takes every domain in one transaction);
        an Outcome per recipient, in order."""
        destination = self.destination(destination)
        slot = self._slots.get(destination)
        if slot is None:
            slot = self._slots[destination] = gevent.lock.BoundedSemaphore(self.settings.per_destination)
        with slot:
            try:
                if self.settings.smarthost:
                    hosts = [self.mx.host(self.settings.smarthost[0])]
                else:
                    hosts = self.mx.hosts(destination)
            except DeliveryError as exc:
                return [Outcome(exc.reply, exc.remote)] * len(msg.recipients)
            return self._try_hosts(hosts, destination, msg, open_body)

    def _try_hosts(self, hosts: list[Host], destination: str, msg: Message,
                   open_body: Callable[[], BinaryIO]) -> list[Outcome]:
        policy = self.policy(destination)
        errors: list[DeliveryError] = []
        for host in hosts:
            for address in host.addresses:
                try:
                    client = self._client(host, address, policy)
                except DeliveryError as exc:  # this host cannot take part: try the next
                    logger.info("relay: {} ({})", exc.reply, host.label(address))
                    errors.append(exc)
                    continue
                return self._transact(client, host, address, policy, msg, open_body)
        if not errors:
            errors.append(TransientError(Reply(451, "4.4.4", "no address to try")))
        # every host refused for good (say, 554 greetings): bounce; anything else: retry
        last = errors[-1]
        if all(isinstance(e, PermanentError) for e in errors):
            return [Outcome(last.reply, last.remote)] * len(msg.recipients)
        transient = next(e for e in reversed(errors) if isinstance(e, TransientError))
        return [Outcome(transient.reply, transient.remote)] * len(msg.recipients)

    def _transact(self, client: Client, host: Host, address: str, policy: str, msg: Message,
                  open_body: Callable[[], BinaryIO]) -> list[Outcome]:
        try:
            try:
                with open_body() as body:
                    replies = client.send(msg, body)
            except StaleConnection:
                # a kept connection the server had closed meanwhile: nothing was taken, so
                # the message goes once more, on a fresh connection
                client.close()
                client = self._connect(host, address, policy)
                with open_body() as body:
                    replies = client.send(msg, body)
        except PermanentError as exc:  # this server can never take it (SIZE, SMTPUTF8)
            self._release(client, host, address, policy)
            return [Outcome(exc.reply, exc.remote, tls_state(client, policy))] * len(msg.recipients)
        except TransientError as exc:
            client.close()
            return [Outcome(exc.reply, exc.remote, tls_state(client, policy))] * len(msg.recipients)
        self._release(client, host, address, policy)
        tls = tls_state(client, policy)
        return [Outcome(r, client.label, tls) for r in replies]

    # -- connections ------------------------------------------------------------------------
    def _key(self, host: Host, address: str, policy: str) -> tuple:
        # a verified connection is only good for the name it was verified for
        return (address, policy, host.name if policy == VERIFY else None)

    def _client(self, host: Host, address: str, policy: str) -> Client:
        idle = self._idle.get(self._key(host, address, policy))
        while idle:
            client = idle.pop()
            # a kept connection the server has spoken on (an idle "421 timeout") or closed
            # is not used again
            if not client.quiet():
                client.close()
            elif monotonic() - client.idle_since < self.settings.idle_time:
                return client
            else:
                gevent.spawn(client.quit)  # healthy but kept too long: say goodbye (RFC 5321 4.1.1.10)
        return self._connect(host, address, policy)

    def _connect(self, host: Host, address: str, policy: str) -> Client:
        s = self.settings
        label = host.label(address)
        port = s.smarthost[1] if s.smarthost else s.port
        client = Client.open(address, port, label, s.timeouts)
        try:
            client.hello(s.helo_name)
            if client.server_name == s.helo_name.lower():
                # RFC 5321 5.1: we are talking to ourselves (an MX or a smarthost that
                # points back here); going on would loop the message
                raise PermanentError(Reply(554, "5.4.6", f"mail for this destination loops back to "
                                           f"myself ({label} greets as {client.server_name})"), label)
            if "STARTTLS" in client.extensions:
                try:
                    encrypted = client.starttls(self.contexts[policy], host.name, s.helo_name)
                except TransientError:
                    if policy != OPPORTUNISTIC:
                        raise
                    # RFC 7435: a failed handshake falls back to plaintext, on a new
                    # connection that does not ask for TLS
                    client.close()
                    client = Client.open(address, port, label, s.timeouts)
                    client.hello(s.helo_name)
                    encrypted = False
            else:
                encrypted = False
            if not encrypted and policy != OPPORTUNISTIC:
                raise TransientError(Reply(451, "4.7.5", f"TLS is required, but {label} does not "
                                           "offer STARTTLS"), label)
            if s.smarthost_auth:
                if not encrypted:
                    raise TransientError(Reply(451, "4.7.5", f"refusing to send a password to "
                                               f"{label} without TLS"), label)
                client.auth_plain(*s.smarthost_auth)
        except BaseException:
            client.close()
            raise
        return client

    def _release(self, client: Client, host: Host, address: str, policy: str) -> None:
        """Keep a clean connection for the next message, or say goodbye."""
        if client.broken or client.transactions >= MAX_TRANSACTIONS or self.settings.idle_time <= 0:
            gevent.spawn(client.quit)
            return
        client.idle_since = monotonic()
        self._idle[self._key(host, address, policy)].append(client)
        if self._reaper is None:
            self._reaper = gevent.spawn(self._reap)

    def _reap(self) -> None:
        """Close connections idle too long, and forget destinations nobody waits for."""
        while True:
            gevent.sleep(self.settings.idle_time / 2)
            now = monotonic()
            for key in list(self._idle):
                keep = []
                for client in self._idle[key]:
                    if now - client.idle_since < self.settings.idle_time and not client.broken:
                        keep.append(client)
                    else:
                        gevent.spawn(client.quit)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
            for name in [n for n, slot in self._slots.items() if slot.counter == self.settings.per_destination]:
                del self._slots[name]

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.kill()
            self._reaper = None
        idle = [c for clients in self._idle.values() for c in clients]
        self._idle.clear()
        gevent.joinall([gevent.spawn(c.quit) for c in idle], timeout=5)
