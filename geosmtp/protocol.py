"""Pure SMTP parsing: a command line → Command, paths → Address, parameters → dict.

No I/O and no policy. Grammar from RFC 5321 4.1.2 and 4.1.3, widened for UTF-8 only where
RFC 6531 3.3 allows it. Every failure is a ProtocolError or PathError carrying what went
wrong; nothing else escapes.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from geosmtp import replies
from geosmtp.replies import Reply


class ProtocolError(Exception):
    """A line that cannot be a command; `reply` is what the client gets."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


class PathError(ValueError):
    """A reverse-path or forward-path that breaks the grammar or a length limit."""

    def __init__(self, reason: str, *, brackets: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.brackets = brackets  # not even <...>: a command syntax error


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper case
    arg: str  # everything after the verb and one space, trailing spaces removed


_VERB = re.compile(r"[A-Za-z]{1,16}")


def parse_command(line: bytes) -> Command:
    """One command line without its CRLF → Command. Never raises anything but ProtocolError."""
    if b"\0" in line:
        raise ProtocolError(replies.NUL_IN_COMMAND)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(replies.NOT_UTF8) from None
    verb, _, arg = text.partition(" ")
    if not _VERB.fullmatch(verb):
        raise ProtocolError(replies.UNKNOWN_COMMAND)
    return Command(verb.upper(), arg.rstrip(" "))


# -- addresses ----------------------------------------------------------------------------
# RFC 5321 4.1.2 atext (RFC 5322 3.2.3); RFC 6531 3.3 adds UTF8-non-ascii to atext and qtext.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"[{_ATEXT}\u0080-\U0010FFFF]+(?:\.[{_ATEXT}\u0080-\U0010FFFF]+)*")
# qtextSMTP %d32-33 / %d35-91 / %d93-126, quoted-pairSMTP "\" %d32-126
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010FFFF](?:[A-Za-z0-9\-\u0080-\U0010FFFF]*[A-Za-z0-9\u0080-\U0010FFFF])?")

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Fold ASCII letters only: str.lower() would also fold non-ASCII ones (and even turn
    some into ASCII), making distinct addresses collide."""
    return text.translate(_ASCII_LOWER)

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, octets including "<" and ">"
MAX_LOCAL = 64  # 4.5.3.1.1
MAX_DOMAIN = 255  # 4.5.3.1.2


@dataclass(frozen=True, slots=True)
class Address:
    local: str  # as sent (a quoted local part keeps its quotes)
    domain: str  # lower-cased; "" only for the special RCPT TO:<postmaster>

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def key(self) -> str:
        """The form used for lookups: ASCII letters folded to lower case (no Unicode folding,
        which would make distinct non-ASCII addresses collide with ASCII ones)."""
        return str(self).translate(_ASCII_LOWER)

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def parse_domain(domain: str) -> str:
    """A Domain or address-literal (RFC 5321 4.1.3) → its canonical lower-case form."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise PathError("unterminated address literal")
        inner = domain[1:-1]
        if "%" in inner:  # ipaddress takes an IPv6 zone id; RFC 5321 4.1.3 has none
            raise PathError("bad address literal")
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise PathError("bad address literal") from None
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise PathError("domain too long")
    labels = domain.split(".")
    if not all(len(label.encode("utf-8")) <= 63 and _LABEL.fullmatch(label) for label in labels):
        raise PathError("bad domain")
    # fold ASCII letters only: str.lower() maps some non-ASCII letters to ASCII (KELVIN SIGN → "k")
    return domain.translate(_ASCII_LOWER)


def parse_address(text: str) -> Address:
    """`local@domain` (no brackets) → Address, non-ASCII allowed (whether it needs SMTPUTF8 is
    the caller's to decide: Address.is_ascii). A source route is not accepted here."""
    at = text.rfind("@")
    if at <= 0:
        raise PathError("address needs local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    if not (_QUOTED_STRING.fullmatch(local) or _DOT_STRING.fullmatch(local)):
        raise PathError("bad local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise PathError("local part too long")
    return Address(local, parse_domain(domain))


def split_path(arg: str, keyword: str) -> tuple[str, str]:
    """`FROM:<path> params` → ("path" without brackets, "params"). Brackets are required."""
    if arg[: len(keyword)].upper() != keyword:
        raise PathError(f"expected {keyword}", brackets=True)
    rest = arg[len(keyword) :].lstrip(" ")  # tolerate "MAIL FROM: <a@b>" like Postfix does
    if not rest.startswith("<"):
        raise PathError("address must be in angle brackets", brackets=True)
    # find the closing ">" outside any quoted string
    i, quoted = 1, False
    while i < len(rest):
        ch = rest[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise PathError("address must be in angle brackets", brackets=True)
    path, params = rest[1:i], rest[i + 1 :]
    if params and not params.startswith(" "):
        raise PathError("garbage after address", brackets=True)
    if len(path.encode("utf-8")) + 2 > MAX_PATH:
        raise PathError("path too long")
    return path, params.strip(" ")


def _strip_source_route(path: str) -> str:
    # RFC 5321 4.1.1.3 / C: A-d-l ":" Mailbox — accepted, then ignored
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise PathError("bad source route")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise PathError("bad source route")
        parse_domain(hop[1:])
    return mailbox


def parse_reverse_path(arg: str) -> tuple[Address | None, str]:
    """MAIL argument → (sender or None for <>, parameter text)."""
    path, params = split_path(arg, "FROM:")
    if path == "":
        return None, params
    return parse_address(_strip_source_route(path)), params


def parse_forward_path(arg: str) -> tuple[Address, str]:
    """RCPT argument → (recipient, parameter text). `<postmaster>` alone is allowed."""
    path, params = split_path(arg, "TO:")
    if path.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted without a domain
        return Address("postmaster", ""), params
    if path == "":
        raise PathError("empty recipient")
    return parse_address(_strip_source_route(path)), params


# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#                 esmtp-value   = 1*(%d33-60 / %d62-126), plus UTF-8 under RFC 6531
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010FFFF]+")


def parse_params(text: str) -> dict[str, str | None]:
    """`SIZE=100 BODY=8BITMIME SMTPUTF8` → {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):  # RFC 5321 4.1.2: parameters are separated by SP only
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise ProtocolError(replies.bad_parameter(key[:32] or "(empty)", "syntax"))
        key = key.upper()
        if key in params:
            raise ProtocolError(replies.bad_parameter(key, "given twice"))
        params[key] = value if eq else None
    return params
