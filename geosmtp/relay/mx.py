"""Where to send mail for a domain: MX records, then addresses (RFC 5321 5.1, RFC 7505).

The dnspython resolver is built by the caller (never from /etc/resolv.conf in tests) and
carries a cache that keeps answers, NXDOMAIN and "no such record" alike, for their TTL.
Every DNS problem comes out as a TransientError or PermanentError with the reply a bounce
or a log line will show.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from geosmtp.relay.errors import PermanentError, TransientError
from geosmtp.replies import Reply

NULL_MX = Reply(556, "5.1.10", "Recipient domain does not accept mail (null MX, RFC 7505)")
NO_DOMAIN = Reply(550, "5.4.4", "Host or domain name not found")
BAD_DOMAIN = Reply(550, "5.1.2", "Bad destination domain name")
LOOP = Reply(554, "5.4.6", "Mail for this domain loops back to myself (I am its best MX)")
NO_ADDRESS = Reply(451, "4.4.4", "No address found for any mail exchanger; will retry")


@dataclass(frozen=True, slots=True)
class Host:
    """One mail exchanger: its name (for TLS verification and logs) and its addresses."""

    name: str
    addresses: tuple[str, ...]

    def label(self, address: str) -> str:
        return f"{self.name}[{address}]"


def make_resolver(servers: list[tuple[str, int]] | None, timeout: float) -> dns.resolver.Resolver:
    """A resolver asking `servers` [(ip, port)], or the system's if None, with a TTL cache."""
    if servers is None:
        resolver = dns.resolver.Resolver(configure=True)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = dns.resolver.LRUCache(max_size=10000)
    return resolver


def literal_address(domain: str) -> str | None:
    """"[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 4.1.3) → the address; else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


class MXResolver:
    def __init__(self, resolver: dns.resolver.Resolver, own_names: frozenset[str] = frozenset(),
                 shuffle=random.shuffle):
        self.resolver = resolver
        self.own_names = own_names  # this host's names: an MX naming one of them is us
        self.shuffle = shuffle

    def _query(self, name: dns.name.Name, rdtype: str):
        """The answer's rdata, [] for "no such record", None for NXDOMAIN; raises
        TransientError on timeouts and SERVFAIL."""
        try:
            return list(self.resolver.resolve(name, rdtype, search=False))
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.NoAnswer:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
            raise TransientError(Reply(451, "4.4.3", f"DNS {rdtype} lookup for {name} failed: "
                                       f"{type(exc).__name__}; will retry")) from None

    @staticmethod
    def _name(text: str) -> dns.name.Name:
        try:
            return dns.name.from_text(text)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            raise PermanentError(BAD_DOMAIN) from None

    def addresses(self, name: str) -> tuple[str, ...] | None:
        """IPv4 then IPv6 addresses of a host; None if the name does not exist."""
        qname = self._name(name)
        v4 = self._query(qname, "A")
        if v4 is None:
            return None
        v6 = self._query(qname, "AAAA") or []
        return tuple(r.address for r in v4) + tuple(r.address for r in v6)

    def hosts(self, domain: str) -> list[Host]:
        """The hosts to try for `domain`, in order: MX by preference (random among equals),
        or the domain itself when it has no MX (RFC 5321 5.1). Raises PermanentError for a
        null MX or a domain that does not exist, TransientError for DNS trouble."""
        if domain.startswith("["):
            literal = literal_address(domain)
            if literal is None:
                raise PermanentError(BAD_DOMAIN)
            return [Host(domain, (literal,))]
        qname = self._name(domain)
        records = self._query(qname, "MX")
        if records is None:
            raise PermanentError(NO_DOMAIN)
        if not records:  # implicit MX: the domain's own addresses
            addresses = self.addresses(domain)
            if not addresses:
                raise PermanentError(NO_DOMAIN)
            return [Host(domain.lower().rstrip("."), addresses)]
        exchanges = [(r.preference, r.exchange) for r in records if r.exchange != dns.name.root]
        if not exchanges:  # RFC 7505 3: a lone "0 ." (or only "."s) means no mail at all
            raise PermanentError(NULL_MX)
        # RFC 5321 5.1: when this host is one of the MX, only those more preferred than it
        # are candidates (we are a backup MX); none left means the mail would loop
        own = [p for p, e in exchanges if e.to_text(omit_final_dot=True).lower() in self.own_names]
        if own:
            exchanges = [(p, e) for p, e in exchanges if p < min(own)]
            if not exchanges:
                raise PermanentError(LOOP)
        by_preference: dict[int, list[dns.name.Name]] = {}
        for preference, exchange in exchanges:
            by_preference.setdefault(preference, []).append(exchange)
        hosts: list[Host] = []
        trouble: TransientError | None = None
        for preference in sorted(by_preference):
            group = by_preference[preference]
            self.shuffle(group)
            for exchange in group:
                name = exchange.to_text(omit_final_dot=True).lower()
                try:
                    addresses = self.addresses(name)
                except TransientError as exc:
                    trouble = exc
                    continue
                except PermanentError:
                    continue
                if addresses:
                    hosts.append(Host(name, addresses))
        if not hosts:
            # An MX pointing nowhere is a configuration mistake the domain may fix: retry
            raise trouble or TransientError(NO_ADDRESS)
        return hosts

    def host(self, name: str) -> Host:
        """One named host (a smarthost): its addresses, no MX lookup."""
        literal = literal_address(f"[{name}]") if not name.startswith("[") else literal_address(name)
        if literal is not None:
            return Host(name, (literal,))
        addresses = self.addresses(name)
        if not addresses:
            raise TransientError(Reply(451, "4.4.4", f"No address found for relay host {name}; will retry"))
        return Host(name.lower(), addresses)
