"""Pure decisions: who may send, who may relay, which local recipients exist.

Functions of plain facts that return a verdict (a Reply to refuse, or None to go on). No
sockets, no configuration files: each rule is tested table by table.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from geosmtp import replies
from geosmtp.protocol import Address
from geosmtp.replies import Reply

MAX_EXPANSION = 1000  # recipients one address may expand to through aliases


@dataclass(frozen=True)
class ClientFacts:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    mode: str  # the listener's role: "smtp" (MX) or "submission"
    trusted: bool  # inside [relay] trusted_networks
    auth_user: str | None = None


def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Iterable) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


@dataclass(frozen=True)
class LocalDirectory:
    """The local domains, the mailboxes that exist and the aliases (all keys lower-case)."""

    domains: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    delimiters: str = "+"  # recipient_delimiter: "alice+lists@" is alice's; "" turns it off

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def without_detail(self, key: str) -> str | None:
        """"alice+lists@example.com" → "alice@example.com" (RFC 5233 sub-addressing, the
        first delimiter character in the local part), or None when there is no detail."""
        local, _, domain = key.rpartition("@")
        cut = min((i for i in map(local.find, self.delimiters) if i > 0), default=-1)
        return f"{local[:cut]}@{domain}" if cut > 0 else None

    def primary_domain(self) -> str | None:
        return min(self.domains) if self.domains else None

    def expand(self, key: str) -> list[str] | None:
        """A local address → the mailboxes and remote addresses it delivers to, or None if it
        does not exist. An alias may name itself to keep a copy in its own mailbox. Each
        alias is expanded once, so shared sub-aliases cost no more than their edges."""
        if key not in self.aliases and key not in self.users:
            # the whole address first (an alias may name one with a detail), then without it
            base = self.without_detail(key)
            return None if base is None else self.expand(base)
        out: list[str] = []
        expanded: set[str] = set()
        stack: list[tuple[str, frozenset[str]]] = [(key, frozenset())]
        while stack and len(out) < MAX_EXPANSION:
            addr, path = stack.pop()
            if addr in self.aliases and addr not in path:
                if addr not in expanded:
                    expanded.add(addr)
                    stack.extend((t, path | {addr}) for t in reversed(self.aliases[addr]))
            elif addr not in out and (addr in self.users or not self.is_local(addr.rpartition("@")[2])):
                out.append(addr)
        return out


def check_mail(client: ClientFacts) -> Reply | None:
    if client.mode == "submission" and client.auth_user is None:
        return replies.AUTH_REQUIRED
    return None


def resolve_rcpt(client: ClientFacts, rcpt: Address, local: LocalDirectory) -> Reply | list[str]:
    """RCPT verdict: a refusal, or the delivery addresses the recipient stands for.

    Local domains take mail from anyone (the MX role). Any other domain, an address literal
    included, is relayed only for a trusted network or an authenticated client. Source routes
    were stripped by the parser and "%" or "!" are just local-part characters here, so they
    can only name a local mailbox, never open a relay.
    """
    if rcpt.domain == "":  # RCPT TO:<postmaster>, RFC 5321 4.5.1
        domain = local.primary_domain()
        if domain is None:
            return replies.UNKNOWN_USER
        rcpt = Address("postmaster", domain)
    if local.is_local(rcpt.domain):
        targets = local.expand(rcpt.key)
        return replies.UNKNOWN_USER if not targets else targets
    if client.trusted or client.auth_user is not None:
        return [str(rcpt)]
    return replies.RELAY_DENIED


def check_sender(user: str, sender: Address | None, local: LocalDirectory,
                 extra: Mapping[str, list[str]]) -> Reply | None:
    """May the authenticated `user` use this envelope sender? Their own address, an alias
    that delivers to them, or what `extra` lists for them ("@domain" for a whole domain).
    The null sender <> is allowed (bounces, delivery reports)."""
    if sender is None:
        return None
    key = sender.key
    if key == user or local.without_detail(key) == user:
        return None
    allowed = extra.get(user, ())
    if key in allowed or f"@{sender.domain}" in allowed:
        return None
    if key in local.aliases and user in (local.expand(key) or ()):
        return None
    return replies.SENDER_NOT_OWNED
