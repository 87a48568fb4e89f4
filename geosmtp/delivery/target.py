"""The one contract for every way a message leaves the queue: a delivery target, and the
router that picks one for each recipient.

A target (Maildir, LMTP, the relay by MX or smarthost) is handed a Message: one message and
the recipients it has at one destination. It returns one Outcome per recipient, in the
order of msg.recipients: the reply (2xx delivered, 4xx try again later, 5xx failed for
good) and the host that gave it, if any. It never touches the spool; the queue manager alone
turns outcomes into recipient states, retries and bounces.

On a timeout or a lost connection every recipient not yet answered gets a 4xx: it is tried
again on the next attempt. A target never raises for a delivery that failed; an exception
out of deliver() is a bug (the queue defers the whole message and logs it).

Recipients with the same destination() share one deliver() call: one transaction for LMTP or
a smarthost, one per domain by MX, one call for every local mailbox of a message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping, Protocol

from geosmtp.directory import DirectoryUnavailable
from geosmtp.replies import Reply

OpenBody = Callable[[], BinaryIO]  # the spooled message (our Received: first), opened anew each call


@dataclass(frozen=True, slots=True)
class Message:
    """One message for one destination, as a target sees it."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]  # the addresses to deliver to, as RCPT TO gives them
    size: int = 0  # octets that will be sent, prefix included (SIZE=)
    prefix: bytes = b""  # header fields added in front of the message (DKIM-Signature), CRLF lines
    eightbit: bool = False  # BODY=8BITMIME (RFC 6152)
    smtputf8: bool = False  # needs SMTPUTF8 (RFC 6531)
    id: str = ""  # the queue id
    created: float = 0.0  # arrival time
    slots: tuple[int, ...] = ()  # each recipient's place in the envelope (names Maildir files)
    originals: tuple[str, ...] = ()  # each recipient as the client gave it in RCPT TO
    redelivery: bool = False  # its last attempt was cut by a crash: it may be there already


@dataclass(frozen=True, slots=True)
class Outcome:
    reply: Reply
    remote: str | None = None  # "name[address]" of the server that replied, if any
    tls: str | None = None  # "TLSv1.3 verified", "TLSv1.2 unverified", "none"; None: no session


class Target(Protocol):
    kind: str  # "maildir", "lmtp" or "relay": in logs and metrics

    def destination(self, domain: str) -> str:
        """What recipients are grouped by: the same value, the same deliver() call."""
        ...

    def deliver(self, destination: str, msg: Message, open_body: OpenBody) -> list[Outcome]: ...

    def close(self) -> None:
        """Let go of kept connections (a reload made a new target); deliveries in flight finish."""
        ...


NO_ROUTE = Reply(451, "4.4.0", "No route for remote delivery is configured")
DIRECTORY_DOWN = Reply(451, "4.3.0", "Directory lookup failed, delivery deferred")


class Unanswered:
    """The target of a recipient whose domain the directory could not place (its database
    is down): every recipient gets a 4xx, so the queue tries again later."""

    kind = "directory"

    def destination(self, domain: str) -> str:
        return "unavailable"

    def deliver(self, destination: str, msg: Message, open_body: OpenBody) -> list[Outcome]:
        return [Outcome(DIRECTORY_DOWN) for _ in msg.recipients]

    def close(self) -> None:
        pass


UNANSWERED = Unanswered()


class Router:
    """Which target a recipient's domain goes to: a local domain (`is_local`, the directory's
    answer) to its own target (or the local default), any other domain to the remote one
    (None: there is no way out)."""

    def __init__(self, local: Target, is_local: Callable[[str], bool], remote: Target | None = None,
                 per_domain: Mapping[str, Target] | None = None):
        self.local = local
        self.is_local = is_local
        self.remote = remote
        self.per_domain = dict(per_domain or {})

    def target(self, domain: str) -> Target | None:
        domain = domain.lower()
        try:
            local = self.is_local(domain)
        except DirectoryUnavailable:
            return UNANSWERED
        if local:
            return self.per_domain.get(domain, self.local)
        return self.remote

    def close(self) -> None:
        """Close every target once (several domains may share one)."""
        seen = {id(t): t for t in (self.local, self.remote, *self.per_domain.values()) if t is not None}
        for target in seen.values():
            target.close()
