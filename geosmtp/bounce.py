"""Delivery status notifications (bounces and delay warnings): RFC 3464 in RFC 6522 multipart/report.

Pure: build() turns an envelope, the recipients to report and the original header section
into the bytes of one DSN message (CRLF line ends), which the caller spools and sends with
the null reverse-path <> to envelope.sender. The layout:

    multipart/report; report-type=delivery-status
      1. text/plain; charset=utf-8        what happened, for a person
      2. message/delivery-status          RFC 3464 fields, for a program
      3. text/rfc822-headers              the original header section (left out if none)

When an address or the original header section is not ASCII, parts 2 and 3 are
message/global-delivery-status and message/global-headers instead (RFC 6533), non-ASCII
addresses get the "utf-8" address type, and the message is 8bit. Otherwise the whole DSN is
7-bit ASCII (part 1 quoted-printable if a reply text is not ASCII), so any server takes it.

Text from outside (reply texts, addresses, host names) never puts a line break into a header
field: every value is cleaned to one line, then folded at spaces.
"""
from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import BinaryIO, Sequence

from geosmtp.envelope import Envelope, Recipient

FAILED = "failed"
DELAYED = "delayed"

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
}
FOLD_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be no longer than 78 characters
HEADER_LIMIT = 64 * 1024  # octets of the original header section returned in a DSN
MAX_WORD = 900  # octets; keeps every line under the 998-octet limit (RFC 5322 2.1.1)
TEXT_WIDTH = 76
INDENT = "    "

# C0 and C1 controls (CR and LF among them), DEL, and the Unicode line and paragraph separators
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
# RFC 5321 4.2: a reply starts with a three-digit code, then SP, "-" or the end of the line;
# RFC 3463 2: class "." subject "." detail, each 1-3 digits (class one of 2, 4, 5)
_REPLY = re.compile(
    r"([2-5])[0-9][0-9](?=[ \r\n-]|\Z)(?:[ -]([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=[ \r\n]|\Z))?", re.ASCII)


def should_notify(envelope: Envelope) -> bool:
    """False for the null sender <>: a bounce is never bounced (RFC 5321 4.5.5 and 6.1)."""
    return envelope.sender != ""


def header_section(fh: BinaryIO, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of the message `fh` is positioned at, as CRLF lines.

    Reads up to and including the empty line that ends it (or to EOF), at most `limit` octets
    of result, and only whole lines: a line that would cross `limit` and everything after it
    is left out. LF-only lines come back with CRLF; a last line without an end gets one.
    """
    fast = _crlf_header_section(fh, limit)
    if fast is not None:
        return fast
    out: list[bytes] = []
    size = 0
    while size < limit:
        room = limit - size
        raw = fh.readline(room + 1)  # one more than fits: tells a long line from one that ends here
        if not raw:
            break
        if raw.endswith(b"\r\n"):
            content = raw[:-2]
        elif raw.endswith(b"\n"):
            content = raw[:-1]
        elif len(raw) > room:
            break  # a line longer than the room left
        else:  # the last line, at EOF without an end
            content = raw[:-1] if raw.endswith(b"\r") else raw
        line = content + b"\r\n"
        if len(line) > room:
            break
        out.append(line)
        size += len(line)
        if not content:
            break  # the empty line that ends the header section
    return b"".join(out)


_PROBE = 8192  # octets read at once for the fast path: the header section of most mail


def _crlf_header_section(fh: BinaryIO, limit: int) -> bytes | None:
    """header_section() in one read for the usual case, a CRLF header section that ends
    within the first _PROBE octets and `limit`, with no bare LF; None (fh where it was)
    for the line-by-line reading of anything else."""
    if not fh.seekable():
        return None
    start = fh.tell()
    chunk = fh.read(min(_PROBE, limit))
    blank = chunk.find(b"\r\n\r\n")
    end = 2 if chunk.startswith(b"\r\n") else blank + 4 if blank >= 0 else 0
    section = chunk[:end]
    if not end or section.count(b"\n") != section.count(b"\r\n"):
        fh.seek(start)
        return None
    fh.seek(start + end)
    return section


def status_of(reply: str | None, default: str) -> str:
    """The RFC 3463 status code of an SMTP reply: "550 5.1.1 User unknown" -> "5.1.1".

    A reply without a well-formed enhanced code (or with one whose class is not the basic
    code's first digit) gets "X.0.0" from the basic code; no reply, or one that does not
    start with a 2xx, 4xx or 5xx code, gets `default`.
    """
    if not reply:
        return default
    m = _REPLY.match(reply)
    if not m or m.group(1) == "3":
        return default
    if m.group(2) == m.group(1):
        return f"{m.group(2)}.{m.group(3)}.{m.group(4)}"
    return f"{m.group(1)}.0.0"


def build(envelope: Envelope, recipients: Sequence[Recipient], *, kind: str, reporting_mta: str,
          original_headers: bytes, now: float, message_id: str | None = None,
          retry_until: float | None = None) -> bytes:
    """The DSN message telling envelope.sender about `recipients` (CRLF line ends).

    kind is FAILED (given up) or DELAYED (still being retried, until `retry_until` if known).
    original_headers is the original header section, as header_section() returns it; b""
    leaves the third part out. Raises ValueError for the null sender (see should_notify()),
    no recipients or an unknown kind.

    The result is ASCII unless an address or the original header section is not; then it
    needs an 8BITMIME transport, and SMTPUTF8 too when envelope.sender is not ASCII.
    """
    if kind not in SUBJECTS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if not should_notify(envelope):
        raise ValueError("no DSN for the null sender <>")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    mta = _no_space(reporting_mta)
    headers = _clean_headers(original_headers)
    international = not (
        headers.isascii() and mta.isascii() and envelope.sender.isascii()
        and all(r.address.isascii() and r.original.isascii() for r in recipients)
    )
    text, text_cte = _text_part(envelope, recipients, kind, mta, bool(headers), retry_until, international)
    status = _status_part(envelope, recipients, kind, mta, retry_until, international)
    parts = [
        (f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {text_cte}\r\n"
         "Content-Description: Notification\r\n").encode("ascii") + b"\r\n" + text,
        (b"Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n"
         if international else b"Content-Type: message/delivery-status\r\n")
        + b"Content-Description: Delivery report\r\n\r\n" + status,
    ]
    if headers:
        parts.append(
            (b"Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n"
             if international else b"Content-Type: text/rfc822-headers\r\n")
            + b"Content-Description: Undelivered message headers\r\n\r\n" + headers
        )
    boundary = _boundary(parts)
    message_id = _no_space(message_id or "").strip("<>") or f"{secrets.token_hex(12)}@{mta}"
    top = "".join([
        _field("Date", _date(now)),
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _field("To", f"<{_one_line(envelope.sender)}>"),
        _field("Subject", SUBJECTS[kind]),
        _field("Message-ID", f"<{message_id}>"),
        _field("Auto-Submitted", "auto-replied"),  # RFC 3834 5
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
        _field("Content-Transfer-Encoding", "8bit" if international else "7bit"),
    ])
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    return b"".join([
        _encode(top), b"\r\nThis is a MIME-encapsulated message.\r\n",
        *(delimiter + part for part in parts),
        f"\r\n--{boundary}--\r\n".encode("ascii"),
    ])


# -- the parts ----------------------------------------------------------------------------
def _text_part(envelope: Envelope, recipients: Sequence[Recipient], kind: str, mta: str, has_headers: bool,
               retry_until: float | None, international: bool) -> tuple[bytes, str]:
    paras = [[f"This is the mail delivery system at {mta}."]]
    if kind == FAILED:
        paras.append(["Your message could not be delivered to the recipients below. The mail system "
                      "has given up; the reply or the reason for each recipient follows."])
    else:
        until = f"until {_date(retry_until)}" if retry_until is not None else "for a while"
        paras.append(["Your message has not yet been delivered to the recipients below. This is only a "
                      f"warning: the mail system will keep trying {until}, and will tell you if it gives "
                      "up. You do not need to do anything or to send the message again."])
    paras.append([f"Queue ID: {envelope.id}", f"Arrived: {_date(envelope.created)}"])
    if has_headers:
        paras.append(["The header section of your message is attached."])
    for r in recipients:
        block = [f"<{r.address}>" + (f" (originally <{r.original}>)" if r.original != r.address else "")]
        if r.remote:
            block.append(f"{INDENT}Remote host: {r.remote}")
        reason = r.last_reply or ("unknown" if kind == FAILED else "none yet")
        block.append(f"{INDENT}{'Reply' if r.remote else 'Reason'}: {reason}")
        if r.updated is not None:
            block.append(f"{INDENT}Last attempt: {_date(r.updated)}")
        paras.append(block)
    text = "\n\n".join("\n".join(_wrap(line) for line in para) for para in paras)
    text = (text + "\n").encode("utf-8", "replace")
    if text.isascii():
        return text.replace(b"\n", b"\r\n"), "7bit"
    if international:
        return text.replace(b"\n", b"\r\n"), "8bit"
    # keep a DSN about ASCII addresses 7-bit from end to end
    return quopri.encodestring(text).replace(b"\n", b"\r\n"), "quoted-printable"


def _status_part(envelope: Envelope, recipients: Sequence[Recipient], kind: str, mta: str,
                 retry_until: float | None, international: bool) -> bytes:
    default = "5.0.0" if kind == FAILED else "4.0.0"
    blocks = [_field("Reporting-MTA", f"dns; {mta}") + _field("Arrival-Date", _date(envelope.created))]
    for r in recipients:
        fields = []
        if r.original != r.address:
            fields.append(_field("Original-Recipient", _address(r.original, international)))
        fields.append(_field("Final-Recipient", _address(r.address, international)))
        fields.append(_field("Action", kind))
        fields.append(_field("Status", status_of(r.last_reply, default)))
        if r.remote:
            fields.append(_field("Remote-MTA", f"dns; {_remote_name(r.remote)}"))
            if r.last_reply:
                fields.append(_field("Diagnostic-Code", f"smtp; {_one_line(r.last_reply)}"))
        if r.updated is not None:
            fields.append(_field("Last-Attempt-Date", _date(r.updated)))
        if kind == DELAYED and retry_until is not None:
            fields.append(_field("Will-Retry-Until", _date(retry_until)))
        blocks.append("".join(fields))
    text = "\r\n".join(blocks)
    if not international:
        # RFC 3464 fields are ASCII: a non-ASCII reply text keeps its characters as \x{HHHH}
        text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)
    return _encode(text)


# -- helpers ------------------------------------------------------------------------------
def _clean_headers(data: bytes) -> bytes:
    """The header section as whole CRLF lines: no bare CR or LF, nothing after an empty line,
    no line over the limit (cut short), and for non-ASCII, valid UTF-8."""
    if not data:
        return b""
    lines = re.split(rb"\r\n|\r|\n", data)
    out = []
    for line in lines:
        if not line:
            break  # the end of the header section (or of the data)
        if len(line) > MAX_WORD:
            line = line[:MAX_WORD]
        out.append(line)
    section = b"".join(line + b"\r\n" for line in out)
    if not section.isascii():
        section = section.decode("utf-8", "replace").encode("utf-8")  # message/global-headers is UTF-8
    return section


def _boundary(parts: Sequence[bytes]) -> str:
    while True:
        # "=_" cannot occur in quoted-printable text; the check covers every other content
        boundary = f"=_geosmtp_{_random_token()}"
        mark = f"--{boundary}".encode("ascii")
        if not any(mark in part for part in parts):
            return boundary


def _random_token() -> str:
    return secrets.token_hex(16)


def _one_line(value: str) -> str:
    """`value` with every control character (CR and LF among them) and run of white space made one space."""
    return " ".join(_CONTROLS.sub(" ", value).split())


def _wrap(line: str) -> str:
    """One line of part 1, cleaned and wrapped; long words are broken, so no line comes near
    the 998-octet limit. A line starting with INDENT keeps it on every wrapped line."""
    indent = INDENT if line.startswith(INDENT) else ""
    return textwrap.fill(_one_line(line), TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False)


def _no_space(value: str) -> str:
    """A host name or message id: one word."""
    return "".join(_one_line(value).split())


def _field(name: str, value: str) -> str:
    """A header field, folded at spaces (RFC 5322 2.2.3), ending in CRLF. No word is longer than
    MAX_WORD octets, so no line is over the 998-octet limit."""
    words = []
    for word in _one_line(value).split(" "):
        if len(word.encode("utf-8", "replace")) > MAX_WORD:
            word = word.encode("utf-8", "replace")[:MAX_WORD].decode("utf-8", "ignore")
        words.append(word)
    lines = []
    line = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > FOLD_WIDTH and line != f"{name}:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _address(address: str, international: bool) -> str:
    """An RFC 3464 address: "rfc822; a@b", or "utf-8; ..." (RFC 6533 3) for a non-ASCII one."""
    address = _one_line(address)
    if international and not address.isascii():
        return f"utf-8; {address}"  # the utf-8-address form, allowed in message/global-delivery-status
    return f"rfc822; {address}"


def _remote_name(remote: str) -> str:
    """ "mx1.example.com[192.0.2.1]" -> "mx1.example.com"; "[192.0.2.1]" stays as it is."""
    remote = _one_line(remote)
    name = remote.split("[", 1)[0].strip()
    return name or remote


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))  # "Tue, 14 Nov 2023 22:13:20 +0000"


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "replace")  # "replace": a lone surrogate from a JSON envelope
