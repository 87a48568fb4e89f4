"""The check interface: what a check sees (Facts), what it answers (Verdict), what it is (Check).

A check is an object with one method per SMTP phase it cares about: connect, helo, mail,
rcpt, data. Each gets a Facts and returns a Verdict, or None to let the mail go on. A
check never sees the session and never writes a reply: the engine (geosmtp.checks.engine)
runs the checks of a phase in config order and the session's command loop sends the
single reply that comes of them.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Mapping

from geosmtp.replies import Reply

_NOTHING: Mapping[str, Any] = MappingProxyType({})
HEADER_SECTION_LIMIT = 256 * 1024  # octets of a message's header section the checks read
PHASES = ("connect", "helo", "mail", "rcpt", "data")

ACCEPT = "accept"  # go on (headers and results still count)
REJECT = "reject"  # 5xx: this command (or the message) is refused
DEFER = "defer"  # 4xx: try again later
CLOSE = "close"  # 421 (or 554 at connect), then the connection is closed
QUARANTINE = "quarantine"  # accepted into queue/hold/ with the reason in the envelope
ACTIONS = (ACCEPT, REJECT, DEFER, CLOSE, QUARANTINE)

# a header field a check adds: "Name: value"; the value may be folded with CRLF + WSP
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable ASCII but ":"
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def safe_text(text: str, limit: int = 400) -> str:
    """Text from outside (a check's reply, a DNS answer, a PTR name) made safe for one
    reply or header line: control characters (CR, LF, NUL...) become "?", cut at `limit`."""
    text = str(text).encode("utf-8", "replace").decode("utf-8")  # no lone surrogates either
    return _UNSAFE.sub("?", text)[:limit]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One method's result for Authentication-Results (RFC 8601 2.2): "spf=pass
    smtp.mailfrom=example.com", with an optional reason and properties in order."""

    method: str  # spf, dkim, dmarc, iprev, ...
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror, policy
    properties: tuple[tuple[str, str], ...] = ()  # ("smtp.mailfrom", "example.com"), ...
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's answer. Data, not an exception: the engine decides what it means here."""

    action: str = ACCEPT
    reply: Reply | None = None  # for reject/defer/close; None: the engine's default for the phase
    reason: str = ""  # for logs and, with quarantine, the envelope
    headers: tuple[tuple[str, str], ...] = ()  # header fields to add in front of the message
    results: Mapping[str, Any] = field(default_factory=dict)  # facts for later checks
    auth: tuple[AuthResult, ...] = ()  # for our Authentication-Results header
    remove_headers: tuple[tuple[str, int], ...] = ()  # (name, n): the n-th such field, data only
    edits: tuple = ()  # geosmtp.checks.edits: fields inserted/changed, body, envelope; data only

    def __post_init__(self) -> None:
        for name in ("headers", "auth", "remove_headers", "edits"):  # a list is fine to give; kept as a tuple
            value = getattr(self, name)
            if type(value) is not tuple:
                object.__setattr__(self, name, tuple(value))
        # the reason goes into log lines and the envelope: one line of text, whoever wrote it
        if self.reason:
            object.__setattr__(self, "reason", safe_text(self.reason))
        if self.action not in ACTIONS:
            raise ValueError(f"unknown verdict action {self.action!r}")
        if self.reply is not None:
            want = {REJECT: 5, DEFER: 4, CLOSE: (4, 5)}.get(self.action)
            if want is None or self.reply.code // 100 not in ((want,) if isinstance(want, int) else want):
                raise ValueError(f"a {self.action} verdict cannot carry a {self.reply.code} reply")
        for name, value in self.headers:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"bad header field name {name!r}")
            if _UNSAFE.search(value.replace("\r\n\t", "").replace("\r\n ", "")):
                raise ValueError(f"header field {name} has a control character outside folding")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"header field {name} is not UTF-8 text") from None
        if not self.edits:
            return
        from geosmtp.checks.edits import EDITS
        for edit in self.edits:
            if not isinstance(edit, EDITS):
                raise ValueError(f"not an edit: {edit!r}")

    # -- the ways to say it ---------------------------------------------------------------
    @classmethod
    def accept(cls, headers=(), results=None, auth=()) -> "Verdict":
        return cls(ACCEPT, headers=tuple(headers), results=results or {}, auth=tuple(auth))

    @classmethod
    def reject(cls, text: str = "", code: int = 550, enhanced: str = "5.7.1", **kw) -> "Verdict":
        return cls(REJECT, reply=make_reply(code, enhanced, text or "Refused by policy"),
                   reason=kw.pop("reason", text), **kw)

    @classmethod
    def defer(cls, text: str = "", code: int = 451, enhanced: str = "4.7.1", **kw) -> "Verdict":
        return cls(DEFER, reply=make_reply(code, enhanced, text or "Try again later"),
                   reason=kw.pop("reason", text), **kw)

    @classmethod
    def close(cls, text: str = "", code: int = 421, enhanced: str = "4.7.0", **kw) -> "Verdict":
        return cls(CLOSE, reply=make_reply(code, enhanced, text or "Closing connection", close=True),
                   reason=kw.pop("reason", text), **kw)

    @classmethod
    def quarantine(cls, reason: str, **kw) -> "Verdict":
        return cls(QUARANTINE, reason=safe_text(reason), **kw)


def make_reply(code: int, enhanced: str | None, text: str, close: bool = False) -> Reply:
    """A reply from a check or a filter, made safe: a code of the right form, an enhanced
    code whose class matches it (or none), one line of printable text."""
    if not (isinstance(code, int) and 400 <= code <= 599):
        raise ValueError(f"bad reply code {code!r}")
    if enhanced is not None and not (_ENHANCED.fullmatch(enhanced) and enhanced[0] == str(code)[0]):
        enhanced = f"{code // 100}.7.1"
    return Reply(code, enhanced, safe_text(text) or "Refused", close=close)


@dataclass(frozen=True, slots=True)
class Facts:
    """What a check sees: plain values, never the session. Fields that do not apply yet are
    None (no sender before MAIL, no message before the end of DATA)."""

    phase: str
    listener: str
    mode: str  # "smtp" (MX) or "submission"
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address  # the client, after PROXY
    trusted: bool  # inside [relay] trusted_networks
    hostname: str  # ours (the authserv-id of our Authentication-Results)
    ptr: str | None = None  # the client's forward-confirmed reverse name (fcrdns check), if any
    helo: str | None = None
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None
    sender: str | None = None  # MAIL FROM: "" for the null sender <>
    recipient: str | None = None  # the RCPT TO being decided (rcpt phase)
    recipients: tuple[str, ...] = ()  # accepted so far (RCPT TO as given)
    queue_id: str | None = None  # from DATA on
    # data phase: the finished message file, written when first asked for (message_path)
    message_file: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    size: int | None = None  # data phase: octets of the message
    results: Mapping[str, Any] = field(default_factory=lambda: _NOTHING)  # what earlier checks recorded
    open_message: Callable[[], BinaryIO] | None = None  # data phase: the message, from its first header
    session: str = ""  # the session's log id (sid=): a check keeping state per SMTP session keys it by this
    # the header section, read once for every check of the phase (replace() shares it)
    _read: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def message_path(self) -> str | None:
        """Data phase: the path of the finished message file. A small message is checked in
        memory and only written to its file at the commit: asking for the path writes it now
        (off the hub), so read the message with open_message() unless a file is needed."""
        return self.message_file() if self.message_file is not None else None

    def header_section(self, limit: int = HEADER_SECTION_LIMIT) -> bytes:
        """The message's header section (up to the blank line; at most `limit` octets)."""
        from geosmtp.checks.headers import read_header_section
        if self.open_message is None:
            return b""
        if limit not in self._read:
            with self.open_message() as fh:
                section = read_header_section(fh, limit)
                # whole: it ends with its blank line, or the message ends with it
                self._read[("whole", limit)] = (section.endswith(b"\r\n\r\n") or section == b"\r\n"
                                                or not fh.read(1))
                self._read[limit] = section
        return self._read[limit]

    def header_section_whole(self, limit: int = HEADER_SECTION_LIMIT) -> bool:
        """Whether header_section(limit) is all of the header section (not cut at `limit`)."""
        self.header_section(limit)
        return self._read.get(("whole", limit), True)

    def fields(self) -> list:
        """The header section split into fields (geosmtp.checks.headers.Field: name, value,
        offsets), once for every check of the phase."""
        from geosmtp.checks.headers import parse_fields
        if "fields" not in self._read:
            self._read["fields"] = parse_fields(self.header_section())
        return self._read["fields"]

    def headers(self) -> list[tuple[str, str]]:
        """The header fields as (name, unfolded value), in order, decoded leniently."""
        return [(f.name, f.value) for f in self.fields()]

    def header(self, name: str) -> str | None:
        """The first field called `name` (any case), unfolded, or None."""
        name = name.lower()
        return next((value for n, value in self.headers() if n.lower() == name), None)


@dataclass(frozen=True)
class CheckContext:
    """What the server lends a check it builds: our name, DNS on our resolver settings,
    the threadpool for CPU or disk work, whether a domain is ours, and Redis when [redis]
    is set."""

    hostname: str
    dns: Any  # geosmtp.checks.dns.DNS
    run: Callable = lambda fn, *args: fn(*args)
    # the directory's answer ([directory]: the TOML or SQL); with SQL it may raise
    # geosmtp.directory.DirectoryUnavailable, which the engine takes as the check's failure
    is_local: Callable[[str], bool] = lambda domain: False
    redis: Any = None  # geosmtp.redisclient.RedisStore: state several nodes share
    redis_greylist: bool = True  # [redis] greylist: greylisting keeps its triplets there


class Check:
    """Base class for a check. Subclasses define any of connect/helo/mail/rcpt/data; the
    engine calls only those a class defines. `options` is the check's table from the config
    (without the common keys), `context` the server's CheckContext."""

    def __init__(self, options: Mapping[str, Any], context: CheckContext):
        self.options = options
        self.context = context

    def close(self) -> None:
        """Release what the check holds (connections); called when a reload replaces it."""

    # def end_session(self, facts: Facts) -> None
    #     optional: the SMTP session `facts.session` has ended (state kept for it can go)

    # def connect(self, facts: Facts) -> Verdict | None
    # def helo(self, facts: Facts) -> Verdict | None
    # def mail(self, facts: Facts) -> Verdict | None
    # def rcpt(self, facts: Facts) -> Verdict | None
    # def data(self, facts: Facts) -> Verdict | None


def phases_of(check: object) -> tuple[str, ...]:
    """The phases a check takes part in: the methods its class defines."""
    return tuple(p for p in PHASES if callable(getattr(check, p, None)))
