"""Pure decisions: who may send, who may relay, which local recipients exist.

Functions of plain facts that return a verdict (a Reply to refuse, or None to go on). No
sockets, no configuration files: each rule is tested table by table. What exists comes from
a Directory (geosmtp.directory), whose DirectoryUnavailable goes through to the caller.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from geosmtp import replies
from geosmtp.directory import Directory
from geosmtp.protocol import Address
from geosmtp.replies import Reply


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


def check_mail(client: ClientFacts) -> Reply | None:
    if client.mode == "submission" and client.auth_user is None:
        return replies.AUTH_REQUIRED
    return None


def resolve_rcpt(client: ClientFacts, rcpt: Address, local: Directory) -> Reply | list[str]:
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


def check_sender(user: str, sender: Address | None, local: Directory,
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
    entry = local.entry(key)
    if entry is not None and entry.targets and user in (local.expand(key) or ()):
        return None
    return replies.SENDER_NOT_OWNED
