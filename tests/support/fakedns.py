"""A fake authoritative DNS server on loopback (UDP and TCP on one port), built on dnslib.

Tests load records with mx()/a()/aaaa()/txt()/ptr()/cname()/null_mx(), make names fail with
servfail()/hang(), and point the server under test at `.address` ("127.0.0.1:PORT").
Every question received is recorded in `.queries`, so a test can see what was (not) cached.

Answers are what an authoritative server gives: unknown names are NXDOMAIN and a name
that exists without the asked type is NOERROR with no answer; both carry an SOA in the
authority section (TTL and MINIMUM = `negative_ttl`) so resolvers can cache the negative.
UDP replies bigger than 512 bytes (or the client's EDNS size) are truncated (TC), as a
real server does, so the client has to retry over TCP -- and such a name then shows up
twice in `.queries` (set `truncate_udp = False` to send big UDP replies whole).
"""
from __future__ import annotations

import ipaddress
import socketserver
import sys
import threading

from dnslib import (
    AAAA, CNAME, EDNS0, MX, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSHeader, DNSLabel, DNSRecord,
)
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

_QUIET = DNSLogger("-request,-reply,-recv,-send,-truncated,-error,-data", False)
_MAX_CHAIN = 8  # CNAME hops followed inside our own data
_UDP_DEFAULT = 512  # RFC 1035 limit without EDNS


def _norm(name) -> str:
    """'Mx1.Example.TEST.' -> 'mx1.example.test' (the root is '')."""
    return str(name).rstrip(".").lower()


def _zone_of(name: str) -> str:
    """The zone we pretend `name` lives in: its last two labels (for the SOA owner)."""
    labels = name.split(".") if name else []
    return ".".join(labels[-2:])


def _txt_strings(text: str | bytes) -> list[bytes]:
    """One TXT value as character-strings of at most 255 bytes (RFC 1035 3.3.14)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


class _Silence(DNSError):
    """Raised by the resolver to send nothing at all (dnslib's handler swallows DNSError)."""


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = False  # SO_REUSEADDR would let two UDP sockets share a port

    def handle_error(self, request, client_address):
        pass  # nothing a UDP client can do wrong is worth a traceback here


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    conn_timeout = 10.0

    def get_request(self):
        conn, addr = super().get_request()
        conn.settimeout(self.conn_timeout)  # dnslib's handler reads without a timeout
        return conn, addr

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # timeouts and resets are expected
            super().handle_error(request, client_address)


class _Resolver(BaseResolver):
    """Answers from the owning FakeDNS's data."""

    def __init__(self, fake: "FakeDNS"):
        self.fake = fake

    def resolve(self, request, handler):
        return self.fake._answer(request, handler)


class FakeDNS:
    """Authoritative fake DNS on `host`, UDP and TCP on the same free port."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port: int | None = None
        self.negative_ttl = 60
        self.hang_timeout = 60.0  # how long a TCP query to a hung name is held open
        self.truncate_udp = True  # False: send big UDP replies whole (no TC, no TCP retry)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._records: dict[str, dict[str, tuple[int, list]]] = {}  # name -> type -> (ttl, rdata)
        self._servfail: set[str] = set()
        self._hang: set[str] = set()
        self.queries: list[tuple[str, str]] = []  # (qname lowercase without dot, qtype), in order
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------------------
    def start(self, attempts: int = 50) -> "FakeDNS":
        """Bind TCP to a free port, then UDP to the same one (retrying if UDP is taken)."""
        resolver = _Resolver(self)
        for _ in range(attempts):
            tcp = DNSServer(resolver, address=self.host, port=0, logger=_QUIET,
                            handler=DNSHandler, server=_TCPServer)
            port = tcp.server.server_address[1]
            try:
                udp = DNSServer(resolver, address=self.host, port=port, logger=_QUIET,
                                handler=DNSHandler, server=_UDPServer)
            except OSError:
                tcp.server.server_close()
                continue
            self.port = port
            self._servers = [udp, tcp]
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")
        self._stopped.clear()
        for srv in self._servers:
            t = threading.Thread(target=srv.server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"fakedns-{self.port}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop both servers and release hung queries."""
        self._stopped.set()
        for srv in self._servers:
            srv.server.shutdown()
            srv.server.server_close()
        for t in self._threads:
            t.join(5)
        self._servers, self._threads = [], []

    def __enter__(self) -> "FakeDNS":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """'127.0.0.1:PORT', as `[relay] dns_servers` takes it."""
        return f"{self.host}:{self.port}"

    # -- data ------------------------------------------------------------------------------
    def _set(self, name: str, qtype: str, ttl: int, rdata: list) -> None:
        """Replace one RRset; an empty one removes the type (and a name left with none)."""
        key = _norm(name)
        with self._lock:
            node = self._records.setdefault(key, {})
            if rdata:
                node[qtype] = (ttl, rdata)
            else:
                node.pop(qtype, None)
                if not node:
                    del self._records[key]

    def mx(self, domain: str, hosts: list[tuple[int, str]], ttl: int = 60) -> None:
        """Replace the MX records of `domain` with [(preference, host), ...]."""
        self._set(domain, "MX", ttl, [MX(host, pref) for pref, host in hosts])

    def null_mx(self, domain: str, ttl: int = 60) -> None:
        """The RFC 7505 'no mail here' record: a single MX 0 '.'."""
        self.mx(domain, [(0, ".")], ttl)

    def a(self, name: str, *ips: str, ttl: int = 60) -> None:
        """Replace the A records of `name`."""
        self._set(name, "A", ttl, [A(ip) for ip in ips])

    def aaaa(self, name: str, *ips: str, ttl: int = 60) -> None:
        """Replace the AAAA records of `name`."""
        self._set(name, "AAAA", ttl, [AAAA(ip) for ip in ips])

    def txt(self, name: str, *texts: str | bytes, ttl: int = 60) -> None:
        """Replace the TXT records of `name`: one record per text, each split in 255-byte strings."""
        self._set(name, "TXT", ttl, [TXT(_txt_strings(t)) for t in texts])

    def ptr(self, ip: str, *names: str | list[bytes], ttl: int = 60) -> None:
        """Replace the PTR records of address `ip` (at its in-addr.arpa / ip6.arpa name). A
        name is text ("mail.example.test") or a list of raw labels ([b"a\\r\\nb", b"test"]),
        for the hostile reverse zones a client can publish."""
        owner = ipaddress.ip_address(ip).reverse_pointer
        self._set(owner, "PTR", ttl, [PTR(n if isinstance(n, str) else DNSLabel(list(n))) for n in names])

    def cname(self, name: str, target: str, ttl: int = 60) -> None:
        """Make `name` an alias; in-data targets are followed in the answer."""
        self._set(name, "CNAME", ttl, [CNAME(target)])

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for every type at `name`."""
        with self._lock:
            self._servfail.add(_norm(name))

    def hang(self, name: str) -> None:
        """Never answer questions about `name` (the client has to time out)."""
        with self._lock:
            self._hang.add(_norm(name))

    def remove(self, name: str) -> None:
        """Forget everything about `name` (records, servfail, hang)."""
        key = _norm(name)
        with self._lock:
            self._records.pop(key, None)
            self._servfail.discard(key)
            self._hang.discard(key)

    def clear(self) -> None:
        """Forget all names."""
        with self._lock:
            self._records.clear()
            self._servfail.clear()
            self._hang.clear()

    def reset_queries(self) -> None:
        """Forget the questions received so far (the list object stays the same)."""
        with self._lock:
            self.queries.clear()

    # -- answering -------------------------------------------------------------------------
    def _answer(self, request: DNSRecord, handler) -> DNSRecord:
        reply = request.reply(ra=1, aa=1)  # authoritative, and also playing the client's resolver
        if len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        qname, qtype = _norm(request.q.qname), QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            rcode, answers, negative = self._lookup(qname, qtype)
        if rcode is None:  # hung name: no reply ever (TCP: hold the connection open)
            if handler.protocol == "tcp":
                self._stopped.wait(self.hang_timeout)
            raise _Silence("hung")
        reply.header.rcode = rcode
        for rr in answers:
            reply.add_answer(rr)
        if negative is not None:
            zone = _zone_of(negative)
            if rcode == RCODE.NXDOMAIN and zone == negative:  # a missing name owns no SOA: its parent
                zone = negative.partition(".")[2]
            soa = SOA(f"ns.{zone}", f"hostmaster.{zone}", (1, 3600, 600, 86400, self.negative_ttl))
            reply.add_auth(RR(zone or ".", QTYPE.SOA, rdata=soa, ttl=self.negative_ttl))
        return self._fit(request, reply, handler.protocol if self.truncate_udp else "tcp")

    def _lookup(self, qname: str, qtype: str):
        """(rcode or None for 'hang', answer RRs, owner for the negative SOA or None); locked."""
        answers: list[RR] = []
        name = qname
        for _ in range(_MAX_CHAIN):
            if name in self._hang:
                return None, [], None
            if name in self._servfail:
                return RCODE.SERVFAIL, [], None
            node = self._records.get(name)
            if node is None:
                break
            types = list(node) if qtype == "ANY" else [qtype] if qtype in node else []
            if types:
                for t in types:
                    ttl, rdata = node[t]
                    answers += [RR(name, getattr(QTYPE, t), rdata=rd, ttl=ttl) for rd in rdata]
                return RCODE.NOERROR, answers, None
            if "CNAME" not in node:
                break
            ttl, (target,) = node["CNAME"]
            answers.append(RR(name, QTYPE.CNAME, rdata=target, ttl=ttl))
            name = _norm(target.label)
        else:
            return RCODE.SERVFAIL, [], None  # a CNAME loop
        exists = name in self._records or any(n.endswith("." + name) for n in self._records)
        return (RCODE.NOERROR if exists else RCODE.NXDOMAIN), answers, name

    @staticmethod
    def _fit(request: DNSRecord, reply: DNSRecord, protocol: str) -> DNSRecord:
        """Echo EDNS and truncate UDP replies that are too big (keeping the question)."""
        limit = _UDP_DEFAULT
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            limit = max(_UDP_DEFAULT, opt.rclass)
            reply.add_ar(EDNS0(udp_len=limit))
        if protocol != "udp" or len(reply.pack()) <= limit:
            return reply
        short = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1), q=request.q)
        if opt is not None:
            short.add_ar(EDNS0(udp_len=limit))
        return short
