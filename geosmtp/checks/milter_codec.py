"""The milter protocol's packets (Sendmail's libmilter, version 6, as Postfix speaks it).

Every packet is a 4-octet length in network order (the command octet included), one command
octet, then data: NUL-terminated strings, 32-bit and 16-bit numbers in network order. The MTA
sends SMFIC_* commands; the milter answers with SMFIR_* replies. The first exchange is the
option negotiation (SMFIC_OPTNEG): we offer the modifications the milter may make (SMFIF_*) and
the steps it may ask us to skip or not to answer (SMFIP_*); it answers with what it wants, and
optionally the macros it wants at each stage.

This module only encodes and decodes; it never blocks. Strings we write never hold a NUL
(it would end the string early and shift every field after it): a NUL becomes "?".
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

VERSION = 6

# -- commands, MTA to milter ------------------------------------------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# -- replies, milter to MTA -------------------------------------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# -- actions the milter may take at the end of a message (SMFIF_*) -----------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ACTIONS_OFFERED = 0x1FF  # all of them

# -- protocol steps (SMFIP_*): what the milter does not want sent, or will not answer ----------
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80  # (SMFIP_NOHREPL)
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400  # the milter may answer SMFIR_SKIP to a body chunk
SMFIP_RCPT_REJ = 0x800  # the milter wants rejected recipients too (not offered)
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000  # header values as they are, the space after the colon included
# what we can do: every skip and no-reply step, SKIP and LEADSPC; not RCPT_REJ, not UNKNOWN
PROTOCOL_OFFERED = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
                    | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA
                    | SMFIP_SKIP | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT
                    | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_HDR_LEADSPC)

# per command: (the SMFIP_ flag that skips it, the SMFIP_ flag that says it gets no reply)
STEPS = {
    SMFIC_CONNECT: (SMFIP_NOCONNECT, SMFIP_NR_CONN),
    SMFIC_HELO: (SMFIP_NOHELO, SMFIP_NR_HELO),
    SMFIC_MAIL: (SMFIP_NOMAIL, SMFIP_NR_MAIL),
    SMFIC_RCPT: (SMFIP_NORCPT, SMFIP_NR_RCPT),
    SMFIC_DATA: (SMFIP_NODATA, SMFIP_NR_DATA),
    SMFIC_HEADER: (SMFIP_NOHDRS, SMFIP_NR_HDR),
    SMFIC_EOH: (SMFIP_NOEOH, SMFIP_NR_EOH),
    SMFIC_BODY: (SMFIP_NOBODY, SMFIP_NR_BODY),
    SMFIC_BODYEOB: (0, 0),
}

# -- macro stages (SMFIM_*), for SMFIC_MACRO and the milter's SETSYMLIST ----------------------
SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVFROM, SMFIM_ENVRCPT, SMFIM_DATA, SMFIM_EOM, SMFIM_EOH = range(7)
STAGE_COMMAND = {SMFIM_CONNECT: SMFIC_CONNECT, SMFIM_HELO: SMFIC_HELO, SMFIM_ENVFROM: SMFIC_MAIL,
                 SMFIM_ENVRCPT: SMFIC_RCPT, SMFIM_DATA: SMFIC_DATA, SMFIM_EOM: SMFIC_BODYEOB,
                 SMFIM_EOH: SMFIC_EOH}

# -- connect families ---------------------------------------------------------------------------
SMFIA_UNKNOWN = b"U"
SMFIA_UNIX = b"L"
SMFIA_INET = b"4"
SMFIA_INET6 = b"6"

CHUNK = 65535  # the largest body chunk (MILTER_CHUNK_SIZE)
HEADER_SIZE = 4


class ProtocolError(Exception):
    """What the milter sent is not a packet of the protocol (or not one we can take)."""


class TooBig(ProtocolError):
    """A packet longer than we accept: refused from its length, never read."""


# -- writing --------------------------------------------------------------------------------
def cstr(value: str | bytes) -> bytes:
    """A NUL-terminated string; a NUL inside becomes "?" (it would end the field early)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return raw.replace(b"\x00", b"?") + b"\x00"


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def optneg(actions: int = ACTIONS_OFFERED, protocol: int = PROTOCOL_OFFERED, version: int = VERSION) -> bytes:
    return packet(SMFIC_OPTNEG, struct.pack(">III", version, actions, protocol))


def macros(cmd: bytes, values: list[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO for the command `cmd`: name, value pairs."""
    return packet(SMFIC_MACRO, cmd + b"".join(cstr(n) + cstr(v) for n, v in values))


def connect_data(hostname: str, family: bytes, port: int, address: str) -> bytes:
    """SMFIC_CONNECT's data: the client's name, its family, port and address."""
    data = cstr(hostname) + family
    if family != SMFIA_UNKNOWN:
        data += struct.pack(">H", port & 0xFFFF) + cstr(address)
    return data


def strings(cmd: bytes, *values: str | bytes) -> bytes:
    """A command whose data is NUL-terminated strings (HELO, MAIL, RCPT, HEADER)."""
    return packet(cmd, b"".join(cstr(v) for v in values))


# -- reading --------------------------------------------------------------------------------
def packet_length(head: bytes, limit: int) -> int:
    """The length from a packet's first 4 octets: at least 1, at most `limit`, or ProtocolError."""
    (length,) = struct.unpack(">I", head)
    if length < 1:
        raise ProtocolError("a packet of length 0")
    if length > limit:
        raise TooBig(f"a packet of {length} octets (more than {limit})")
    return length


@dataclass(frozen=True)
class Negotiated:
    """The milter's answer to SMFIC_OPTNEG."""

    version: int
    actions: int  # SMFIF_* it may take
    protocol: int  # SMFIP_* steps it does not want or will not answer
    symlists: dict[int, tuple[str, ...]] = field(default_factory=dict)  # stage -> macro names

    def skips(self, cmd: bytes) -> bool:
        return bool(self.protocol & STEPS[cmd][0])

    def no_reply(self, cmd: bytes) -> bool:
        return bool(self.protocol & STEPS[cmd][1])


def parse_optneg(data: bytes, offered_actions: int = ACTIONS_OFFERED,
                 offered_protocol: int = PROTOCOL_OFFERED) -> Negotiated:
    """The milter's SMFIC_OPTNEG data. Refused (ProtocolError) like Postfix: a version we do
    not speak, actions we did not offer, protocol steps we did not offer."""
    if len(data) < 12:
        raise ProtocolError(f"option negotiation of {len(data)} octets")
    version, actions, protocol = struct.unpack(">III", data[:12])
    if not 2 <= version <= VERSION:
        raise ProtocolError(f"milter protocol version {version}")
    if actions & ~offered_actions:
        raise ProtocolError(f"actions 0x{actions:x} beyond those offered (0x{offered_actions:x})")
    if protocol & ~offered_protocol:
        raise ProtocolError(f"protocol steps 0x{protocol:x} beyond those offered (0x{offered_protocol:x})")
    symlists: dict[int, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:  # SETSYMLIST: (stage, "name name ...") pairs
        if len(rest) < 5:
            raise ProtocolError("a truncated macro list in the option negotiation")
        (stage,) = struct.unpack(">I", rest[:4])
        end = rest.find(b"\x00", 4)
        if end < 0:
            raise ProtocolError("a macro list without its NUL")
        if stage in STAGE_COMMAND:
            names = rest[4:end].decode("ascii", "replace").replace(",", " ").split()
            symlists[stage] = tuple(names[:64])
        rest = rest[end + 1:]
    return Negotiated(version, actions, protocol, symlists)


def split_strings(data: bytes, count: int | None = None) -> list[bytes]:
    """The NUL-terminated strings of a reply's data: exactly `count` if given. ProtocolError for
    a missing terminator or a wrong count."""
    if not data.endswith(b"\x00"):
        raise ProtocolError("a string without its NUL")
    parts = data[:-1].split(b"\x00")
    if count is not None and len(parts) != count:
        raise ProtocolError(f"{len(parts)} strings where {count} belong")
    return parts


def split_index(data: bytes) -> tuple[int, bytes]:
    if len(data) < 4:
        raise ProtocolError("a header index cut short")
    return struct.unpack(">I", data[:4])[0], data[4:]


_REPLY_LINE = re.compile(rb"([45])(\d\d)(?:[ -](.*))?", re.S)
_ENHANCED = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})")


def parse_replycode(data: bytes) -> tuple[int, str | None, str]:
    """SMFIR_REPLYCODE's "ddd x.y.z text" (one NUL-terminated string), made into (code,
    enhanced code or None, text), one line: Postfix crashed on odd ones, so every shape is
    taken or refused plainly. A multi-line reply ("550-5.7.1 first\\r\\n550 5.7.1 second")
    becomes its lines' texts joined by "; ". A code with no text, or a bare enhanced code,
    gets no text here (the caller writes its default). Sendmail's "%%" is one "%". A code
    that is not 4xx/5xx is a ProtocolError."""
    raw = data[:-1] if data.endswith(b"\x00") else data
    if b"\x00" in raw:
        raise ProtocolError("a reply code with a NUL inside")
    lines = [line for line in re.split(rb"\r\n|\r|\n", raw.strip()) if line.strip()]
    if not lines:
        raise ProtocolError("an empty reply code")
    code = None
    enhanced = None
    texts = []
    for line in lines:
        m = _REPLY_LINE.fullmatch(line.strip())
        if not m:
            raise ProtocolError(f"a malformed reply code {line[:60]!r}")
        this = int(m.group(1) + m.group(2))
        if code is None:
            code = this
        elif this != code:
            raise ProtocolError(f"a multi-line reply with codes {code} and {this}")
        text = (m.group(3) or b"").strip()
        e = _ENHANCED.match(text)
        if e and (len(text) == e.end() or text[e.end():e.end() + 1] in b" \t"):
            if enhanced is None and e.group(1) == m.group(1):
                enhanced = e.group(0).decode()
            text = text[e.end():].strip()
        if text:
            texts.append(text.replace(b"%%", b"%").decode("utf-8", "replace"))
    return code, enhanced, "; ".join(texts)
