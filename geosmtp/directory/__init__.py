"""The directory: which domains are local, which mailboxes and aliases exist, and the AUTH
users' password hashes. One contract, three backends (geosmtp.directory.static for the
configuration file, geosmtp.directory.sql over SQLite or PostgreSQL).

Every caller (the session's RCPT, MAIL and AUTH, the delivery router and the Maildir target)
holds a Directory and calls it on the gevent hub. A backend answers from memory, or yields
while it asks its database (PostgreSQL's sockets are green; SQLite runs in the threadpool),
within its timeout. A backend that cannot answer raises DirectoryUnavailable: never a
made-up "no such user". Callers turn that into a temporary refusal (RCPT and MAIL 451 4.3.0,
AUTH 454 4.7.0, a delivery deferred), never a 5xx and never a success.

Backends supply four lookups (is_local, entry, password_hash, primary_domain); what is built
on them (sub-addresses, alias expansion) is written here once, for all of them. Keys are
lower case: callers pass Address.key, backends store lower case.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

MAX_EXPANSION = 1000  # recipients one address may expand to through aliases


class DirectoryUnavailable(Exception):
    """The backend did not answer (down, slow, misconfigured). The message names the cause
    and never holds a password or a hash."""


@dataclass(frozen=True, slots=True)
class Entry:
    """What one local address is: a mailbox, an alias (its targets, in order), or both (an
    alias that keeps a copy names itself among its targets)."""

    mailbox: bool
    targets: tuple[str, ...] = ()


class Directory(ABC):
    delimiters: str = "+"  # recipient_delimiter: "alice+lists@" is alice's; "" turns it off
    authenticates: bool = False  # has users for AUTH

    # -- what a backend answers ---------------------------------------------------------------
    @abstractmethod
    def is_local(self, domain: str) -> bool:
        """Whether we are the final destination for `domain` (any case)."""

    @abstractmethod
    def entry(self, address: str) -> Entry | None:
        """The mailbox and alias facts of a lower-case address, or None if it is neither."""

    @abstractmethod
    def password_hash(self, user: str) -> str | None:
        """The user's "$scrypt$..." hash (geosmtp.auth), or None for no such user."""

    @abstractmethod
    def primary_domain(self) -> str | None:
        """The domain a bare "postmaster" belongs to (the first by name), if any."""

    def describe(self) -> str:
        """For the log: where the answers come from (never a password)."""
        return type(self).__name__

    def close(self) -> None:
        """Let go of connections (a reload replaced this directory)."""

    # -- built on those, the same for every backend ---------------------------------------------
    def without_detail(self, key: str) -> str | None:
        """"alice+lists@example.com" → "alice@example.com" (RFC 5233 sub-addressing, the
        first delimiter character in the local part), or None when there is no detail."""
        local, _, domain = key.rpartition("@")
        cut = min((i for i in map(local.find, self.delimiters) if i > 0), default=-1)
        return f"{local[:cut]}@{domain}" if cut > 0 else None

    def is_mailbox(self, key: str) -> bool:
        found = self.entry(key)
        return found is not None and found.mailbox

    def expand(self, key: str) -> list[str] | None:
        """A local address → the mailboxes and remote addresses it delivers to, or None if it
        does not exist. An alias may name itself to keep a copy in its own mailbox. Each
        alias is expanded once, so shared sub-aliases cost no more than their edges."""
        if self.entry(key) is None:
            # the whole address first (an alias may name one with a detail), then without it
            base = self.without_detail(key)
            return None if base is None else self.expand(base)
        out: list[str] = []
        expanded: set[str] = set()
        stack: list[tuple[str, frozenset[str]]] = [(key, frozenset())]
        while stack and len(out) < MAX_EXPANSION:
            addr, path = stack.pop()
            if not self.is_local(addr.rpartition("@")[2]):
                if addr not in out:  # another domain's address: forwarded, never looked up
                    out.append(addr)
                continue
            found = self.entry(addr)
            if found is not None and found.targets and addr not in path:
                if addr not in expanded:
                    expanded.add(addr)
                    stack.extend((t, path | {addr}) for t in reversed(found.targets))
            elif found is not None and found.mailbox and addr not in out:
                out.append(addr)
        return out
