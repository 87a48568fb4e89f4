"""DNS for checks, on our resolver settings ([relay] dns_servers, dns_timeout): never the
system resolver behind the operator's back when servers are configured.

Three outcomes per question, which SPF, DKIM, DMARC and DNSBL each map to their own results:
records (a list), nothing (NXDOMAIN or no record of the type: an empty list, which SPF
counts as a "void lookup"), or a TempError (timeout, SERVFAIL, no server answered). The
resolver's cache keeps answers and negatives for their TTL, as a real resolver does.
"""
from __future__ import annotations

import ipaddress
import time
from functools import lru_cache
from typing import Callable

import dns.exception
import gevent
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

MAX_TTL = 86400.0
MAX_NEGATIVE_TTL = 10800.0
MAX_TXT = 64 * 1024  # octets of TXT data kept for one name: beyond is hostile


class TempError(Exception):
    """The question got no usable answer now (timeout, SERVFAIL): try again later."""


class BadName(Exception):
    """The name cannot be asked (empty label, too long, not a host name)."""


class DNS:
    MEMO = 10_000  # answers kept in front of the resolver's cache

    def __init__(self, resolver: dns.resolver.Resolver, clock: Callable[[], float] = time.time):
        self.resolver = resolver
        self.clock = clock
        # (name, type) -> (expires, records): the same few questions for every message (the
        # sender's SPF and DMARC records, its DKIM key, the client in a DNSBL) answered for
        # their TTL without dnspython's whole resolution path (about 30 us each)
        self._memo: dict[tuple, tuple[float, list]] = {}

    @staticmethod
    @lru_cache(maxsize=8192)  # the same few names for every message: parse each once
    def name(text: str) -> dns.name.Name:
        try:
            name = dns.name.from_text(text.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise BadName(f"{text[:80]!r}: {exc}") from None
        if name == dns.name.root:
            raise BadName("empty name")
        return name

    def query(self, name: str | dns.name.Name, rdtype: str) -> list:
        """The rdata of the answer ([] for NXDOMAIN and for no such record)."""
        key = (name, rdtype)
        now = self.clock()
        hit = self._memo.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        records, ttl = self._resolve(self.name(name) if isinstance(name, str) else name, rdtype)
        if len(self._memo) >= self.MEMO:
            self._memo.clear()
        if ttl > 0:  # kept no longer than a real resolver would (1 day, 3 h for a negative)
            self._memo[key] = (now + min(ttl, MAX_TTL if records else MAX_NEGATIVE_TTL), records)
        return records

    def _resolve(self, qname: dns.name.Name, rdtype: str) -> tuple[list, float]:
        """(records, seconds they may be kept): the answer's TTL, or for "no such name" and
        "no such record" the SOA's negative TTL (RFC 2308 5)."""
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False)
            return list(answer), answer.expiration - self.clock()
        except dns.resolver.NXDOMAIN as exc:
            return [], _negative_ttl(exc.responses().get(qname))
        except dns.resolver.NoAnswer as exc:
            return [], _negative_ttl(exc.response())
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN) as exc:
            raise TempError(f"{qname} {rdtype}: {type(exc).__name__}") from None
        except dns.exception.DNSException as exc:  # a malformed answer: nothing usable now
            raise TempError(f"{qname} {rdtype}: {exc}") from None

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2), at most
        MAX_TXT octets in all."""
        out, total = [], 0
        for rdata in self.query(name, "TXT"):
            value = b"".join(rdata.strings)
            total += len(value)
            if total > MAX_TXT:
                break
            out.append(value)
        return out

    def addresses(self, name: str, families: tuple[str, ...] = ("A", "AAAA")) -> list[str]:
        return [r.address for rdtype in families for r in self.query(name, rdtype)]

    def ptr(self, ip: str) -> list[str]:
        """The client's reverse names, without the final dot."""
        return [r.target.to_text(omit_final_dot=True) for r in self.query(dns.reversename.from_address(ip), "PTR")]

    def in_parallel(self, fn: Callable, items: list) -> list[tuple[bool, object]]:
        """fn(item) for every item at once, one greenlet each, all within one resolver
        timeout (and a second): [(True, value) or (False, None) for a call that failed or
        did not end in time], in order. The calls still running when we are cut short (the
        engine's timeout for the check) are killed too."""
        jobs = [gevent.spawn(fn, item) for item in items]
        try:
            gevent.joinall(jobs, timeout=self.wait)
        finally:
            gevent.killall([j for j in jobs if not j.ready()], block=False)
        return [(True, j.value) if j.successful() else (False, None) for j in jobs]

    @property
    def wait(self) -> float:
        """How long in_parallel waits at most."""
        return getattr(self.resolver, "lifetime", 5.0) + 1.0

    def mx(self, name: str) -> list[tuple[int, str]]:
        return [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in self.query(name, "MX")]


def _negative_ttl(response) -> float:
    """min(SOA TTL, SOA MINIMUM) of a negative answer's authority section; 0 (not kept)
    without one."""
    for rrset in getattr(response, "authority", ()) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


def reversed_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The DNSBL form of an address: 192.0.2.1 → "1.2.0.192", IPv6 in nibbles (RFC 5782 2.4)."""
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))
