"""The HAProxy PROXY protocol, versions 1 and 2: one header in front of the client's bytes.

A load balancer that relays a TCP connection sends this header first, so the server learns
the real client's address (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).
Parsing is strict: anything that does not match the specification exactly is a ProxyError,
and the connection must then be closed (spec 2.1: "Any sequence which does not exactly match
the protocol must be discarded and cause the receiver to abort the connection"). Only a
listener configured for it may call read(): a header is never guessed at (spec 5).

parse_v1() and parse_v2() are pure and take one complete header. read() takes it from a
Connection, consuming the header's bytes and nothing more, so what follows (SMTP commands, a
TLS ClientHello) stays in the Connection's buffer. No TLV is interpreted: version 2 TLVs are
checked to tile the header exactly and then skipped, CRC32C included (spec 2.2.3 asks for
the check only from receivers that support the checksum).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from time import monotonic

from geosmtp.connection import Connection, ConnectionClosed, ReadTimeout

V1_PREFIX = b"PROXY "
V1_MIN = 15  # "PROXY UNKNOWN\r\n"
V1_MAX = 107  # octets, CRLF included: "PROXY UNKNOWN" + two full IPv6 addresses and ports

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and transport, length
# Address block sizes by family byte, for the PROXY command (spec 2.2): TCP only
V2_TCP4, V2_TCP6 = 0x11, 0x21
V2_ADDRESS_SIZE = {V2_TCP4: 12, V2_TCP6: 36}
V2_LARGEST_ADDRESSES = 216  # AF_UNIX: a LOCAL header may carry it, to be skipped
# TLVs allowed after the addresses. HAProxy's own (authority 255, unique id 128, ALPN, SSL
# with its sub-TLVs, netns, CRC32C) stay under about 700 octets; custom TLVs may add some.
V2_MAX_TLV = 2048

_TLV_HEAD = 3  # type (1 octet), length (2 octets, big-endian)


class ProxyError(Exception):
    """A bad or missing PROXY header; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    command: str  # "PROXY", or "LOCAL" (v2 LOCAL, v1 UNKNOWN): use the connection's own endpoints
    source: tuple[str, int] | None  # (ip, port) of the real client; None for LOCAL
    destination: tuple[str, int] | None  # (ip, port) the client connected to; None for LOCAL
    version: int  # 1 or 2


_LOCAL_V1 = ProxyInfo("LOCAL", None, None, 1)
_LOCAL_V2 = ProxyInfo("LOCAL", None, None, 2)

# -- version 1 ----------------------------------------------------------------------------
# Spec 2.1: "exactly 4 integers in the range [0..255] ... Heading zeroes are not permitted",
# checked here rather than left to the ipaddress module, whose strictness varies by version.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_TEXT = re.compile(rb"%s(?:\.%s){3}" % (_OCTET, _OCTET))
# Hex digits, colons and the dots of an embedded IPv4 address: no zone id ("%eth0"), which
# ipaddress would accept; the rest of the IPv6 grammar is left to ipaddress.
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_PORT_TEXT = re.compile(rb"0|[1-9][0-9]{0,4}")


def parse_v1(line: bytes) -> ProxyInfo:
    """One complete version 1 line, its CRLF included, → ProxyInfo. Raises only ProxyError.

    `"PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF` with single spaces,
    addresses of the announced family, decimal ports 0-65535 without sign or leading zero;
    or `"PROXY UNKNOWN"` then nothing or a space and anything up to the CRLF, ignored (spec
    2.1), which means "use the connection's own endpoints". The line holds one CR and one
    LF, as its last two octets: a lone CR or LF anywhere is refused.
    """
    line = bytes(line)
    if len(line) > V1_MAX:
        raise ProxyError(f"v1: line longer than {V1_MAX} octets")
    if not line.endswith(b"\r\n") or line.count(b"\r") != 1 or line.count(b"\n") != 1:
        raise ProxyError("v1: the line must end in CRLF and hold no other CR or LF")
    if not line.startswith(V1_PREFIX):
        raise ProxyError('v1: the line must begin with "PROXY "')
    body = line[len(V1_PREFIX):-2]
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return _LOCAL_V1
    fields = body.split(b" ")
    if len(fields) != 5:
        raise ProxyError("v1: expected protocol, two addresses and two ports, single-spaced")
    family, src, dst, sport, dport = fields
    if family == b"TCP4":
        source, destination = _ipv4_text(src), _ipv4_text(dst)
    elif family == b"TCP6":
        source, destination = _ipv6_text(src), _ipv6_text(dst)
    else:
        raise ProxyError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    return ProxyInfo("PROXY", (source, _port_text(sport)), (destination, _port_text(dport)), 1)


def _ipv4_text(text: bytes) -> str:
    if not _IPV4_TEXT.fullmatch(text):
        raise ProxyError("v1: bad IPv4 address")
    return text.decode("ascii")  # already canonical: the pattern allows no other spelling


def _ipv6_text(text: bytes) -> str:
    if not _IPV6_TEXT.fullmatch(text):
        raise ProxyError("v1: bad IPv6 address")
    try:
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyError("v1: bad IPv6 address") from None


def _port_text(text: bytes) -> int:
    if not _PORT_TEXT.fullmatch(text) or int(text) > 65535:
        raise ProxyError("v1: bad port")
    return int(text)


# -- version 2 ----------------------------------------------------------------------------
def v2_length(fixed: bytes) -> int:
    """The 16-octet fixed part of a version 2 header → the whole header's length in octets.

    Checks everything the fixed part can tell, so a bad header is refused before its body
    is waited for: the signature, version 2, command LOCAL (0) or PROXY (1), for PROXY the
    family TCP over IPv4 (0x11) or IPv6 (0x21), and a length that holds the addresses and at
    most V2_MAX_TLV octets of TLVs. LOCAL takes any family (spec 2.2: "the family which is
    ignored"), with up to the largest address block plus V2_MAX_TLV octets.
    """
    fixed = bytes(fixed)
    if len(fixed) != V2_FIXED:
        raise ProxyError(f"v2: the fixed part is {V2_FIXED} octets, not {len(fixed)}")
    if not fixed.startswith(V2_SIGNATURE):
        raise ProxyError("v2: bad signature")
    version, command, family = fixed[12] >> 4, fixed[12] & 0x0F, fixed[13]
    length = int.from_bytes(fixed[14:16], "big")
    if version != 2:
        raise ProxyError(f"v2: version {version}, not 2")
    if command == 0:  # LOCAL
        if length > V2_LARGEST_ADDRESSES + V2_MAX_TLV:
            raise ProxyError(f"v2: length {length} too large")
    elif command == 1:  # PROXY
        size = V2_ADDRESS_SIZE.get(family)
        if size is None:
            raise ProxyError(f"v2: family and transport 0x{family:02x} not supported (TCP only)")
        if length < size:
            raise ProxyError(f"v2: length {length} too short for the addresses")
        if length > size + V2_MAX_TLV:
            raise ProxyError(f"v2: length {length} too large")
    else:
        raise ProxyError(f"v2: unknown command {command}")
    return V2_FIXED + length


def parse_v2(header: bytes) -> ProxyInfo:
    """One complete version 2 header, exactly as long as it says, → ProxyInfo. Raises only
    ProxyError. LOCAL discards the whole block after the fixed part, as the spec asks; for
    PROXY the TLVs after the addresses must tile the rest exactly (each a 3-octet type and
    length, then that many octets) and are skipped without being interpreted."""
    header = bytes(header)
    total = v2_length(header[:V2_FIXED])
    if len(header) != total:
        raise ProxyError(f"v2: {len(header)} octets where the header says {total}")
    if header[12] & 0x0F == 0:
        return _LOCAL_V2
    family = header[13]
    if family == V2_TCP4:
        src, dst = ipaddress.IPv4Address(header[16:20]), ipaddress.IPv4Address(header[20:24])
        ports = header[24:28]
    else:  # V2_TCP6, the only other family v2_length lets through
        src, dst = ipaddress.IPv6Address(header[16:32]), ipaddress.IPv6Address(header[32:48])
        ports = header[48:52]
    _check_tlvs(header, V2_FIXED + V2_ADDRESS_SIZE[family])
    sport, dport = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
    return ProxyInfo("PROXY", (str(src), sport), (str(dst), dport), 2)


def _check_tlvs(header: bytes, pos: int) -> None:
    end = len(header)
    while pos < end:
        if end - pos < _TLV_HEAD:
            raise ProxyError("v2: truncated TLV")
        pos += _TLV_HEAD + int.from_bytes(header[pos + 1:pos + 3], "big")
        if pos > end:
            raise ProxyError("v2: TLV longer than the header")


# -- from a connection --------------------------------------------------------------------
def read(conn: Connection, timeout: float) -> ProxyInfo:
    """Read one PROXY header, version 1 or 2, from `conn` within `timeout` seconds overall.

    The version is told by the first octets: the 12-octet v2 signature, or "PROXY ". Only the
    header is consumed; whatever the peer sent after it stays in the Connection's buffer for
    the SMTP session or a TLS handshake. Raises ProxyError (and nothing else) on a bad
    header, on bytes that cannot begin one, on timeout and on a closed connection; the
    buffer is then left as it was and the connection must be closed.

    This relies on two private parts of Connection, its own class: `_buf`, the bytearray of
    received, unconsumed input (read and cut from the front only), and `_fill(deadline, size)`,
    one receive of at most `size` octets appended to it, or ReadTimeout / ConnectionClosed. The socket's timeout,
    which _fill() changes, is put back as it was.
    """
    deadline = monotonic() + timeout
    sock = conn.sock
    try:
        old_timeout = sock.gettimeout()
    except OSError:
        old_timeout = None
    try:
        return _read(conn, deadline)
    except ReadTimeout:
        raise ProxyError("timeout waiting for the PROXY header") from None
    except ConnectionClosed as exc:
        raise ProxyError(f"connection closed before the end of the PROXY header ({exc})") from None
    finally:
        try:
            sock.settimeout(old_timeout)
        except OSError:
            pass


def _read(conn: Connection, deadline: float) -> ProxyInfo:
    while True:
        start = bytes(conn._buf[:len(V2_SIGNATURE)])
        if start == V2_SIGNATURE:
            return _read_v2(conn, deadline)
        if start.startswith(V1_PREFIX):
            return _read_v1(conn, deadline)
        if not (V2_SIGNATURE.startswith(start) or V1_PREFIX.startswith(start[:len(V1_PREFIX)])):
            raise ProxyError("not a PROXY header")
        conn._fill(deadline, len(V2_SIGNATURE) - len(conn._buf))


def _read_v1(conn: Connection, deadline: float) -> ProxyInfo:
    while True:
        buf = conn._buf
        end = buf.find(b"\n", 0, V1_MAX)
        if end >= 0:
            info = parse_v1(bytes(buf[:end + 1]))
            del buf[:end + 1]
            return info
        if len(buf) >= V1_MAX:
            raise ProxyError(f"v1: no line end within {V1_MAX} octets")
        # the shortest line is "PROXY UNKNOWN\r\n"; past it, an octet at a time: never a
        # byte of what follows the line (a TLS ClientHello must stay in the socket)
        conn._fill(deadline, max(V1_MIN - len(buf), 1))


def _read_v2(conn: Connection, deadline: float) -> ProxyInfo:
    while len(conn._buf) < V2_FIXED:
        conn._fill(deadline, V2_FIXED - len(conn._buf))
    total = v2_length(conn._buf[:V2_FIXED])
    while len(conn._buf) < total:
        conn._fill(deadline, total - len(conn._buf))
    buf = conn._buf
    info = parse_v2(bytes(buf[:total]))
    del buf[:total]
    return info
