"""Changes a check asks for at the end of DATA, beyond adding fields in front: insert, change
or delete header fields inside the header section, replace the body, change the envelope
sender, add or remove recipients (what a milter may ask, SMFIR_* in geosmtp.checks.milter).

They are data (Verdict.edits), applied once after every data check has passed: the message
and header edits in one rewrite of the unpublished message file, the envelope edits in one
change of the envelope before it is published. Either all apply or the message is refused
with 451 4.3.0 and nothing is queued.

Positions count the fields of the stored header section, whose first field is our own
Received: (index 0).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from geosmtp import safeio
from geosmtp.checks.headers import COPY_CHUNK

_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2: printable ASCII but ":"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class EditRefused(Exception):
    """An edit that cannot be applied (a recipient we would not take, a bad address): the
    message is refused with 451 4.3.0, nothing queued."""


def check_field(name: str, value: str) -> None:
    """A field a check writes: a valid name, and no control character outside folding
    (CRLF followed by a space or a tab)."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"bad header field name {name!r}")
    if _UNSAFE.search(value.replace("\r\n\t", "").replace("\r\n ", "")):
        raise ValueError(f"header field {name} has a control character outside folding")


@dataclass(frozen=True, slots=True)
class HeaderInsert:
    """A field put before the field at `index` (0-based: 0 is the very top, before our
    Received:); an index past the last field puts it after the last (an "add header")."""

    index: int
    name: str
    value: str  # without the space after the colon; folded with CRLF + WSP if at all

    def __post_init__(self) -> None:
        check_field(self.name, self.value)


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """The `n`-th field called `name` (1-based, any case) gets `value`; an empty value
    deletes it. If there is no such field, a non-empty value is added after the last."""

    name: str
    n: int
    value: str

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"field index {self.n} (1-based)")
        check_field(self.name, self.value)


@dataclass(frozen=True, slots=True)
class SenderChange:
    address: str  # "" for the null sender <>


@dataclass(frozen=True, slots=True)
class RecipientAdd:
    address: str


@dataclass(frozen=True, slots=True)
class RecipientRemove:
    address: str  # as the client gave it in RCPT TO, or the delivery address


@dataclass(frozen=True, eq=False)
class BodyReplace:
    """The new body (everything after the blank line), read from `body` from its start. Its
    line ends become CRLF as it is copied; the last line gets one."""

    body: BinaryIO


HEADER_EDITS = (HeaderInsert, HeaderChange)
ENVELOPE_EDITS = (SenderChange, RecipientAdd, RecipientRemove)
EDITS = HEADER_EDITS + ENVELOPE_EDITS + (BodyReplace,)


def changes_message(edits: Iterable) -> bool:
    return any(isinstance(e, HEADER_EDITS + (BodyReplace,)) for e in edits)


# -- the message ----------------------------------------------------------------------------------
def _field_bytes(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def rewrite_message(src: BinaryIO, dst: int, section: bytes, fields: list, drop: set[int],
                    edits: Iterable) -> None:
    """Write the message `src` (at its first header; `section` its header section, `fields`
    hdr.parse_fields of it) to the descriptor `dst`: without the fields at positions `drop`,
    with the header edits applied in order, and the body replaced if a BodyReplace says so
    (the last one counts)."""
    edits = list(edits)
    if fields:
        prefix = section[:fields[0].start]
        tail = section[fields[-1].end:]
        items = []
        for i, f in enumerate(fields):  # lines that are not fields stay with the field before them
            end = fields[i + 1].start if i + 1 < len(fields) else f.end
            if i not in drop:
                items.append((f.name.lower(), section[f.start:end]))
    else:
        prefix, tail, items = section, b"", []
    for edit in edits:
        if isinstance(edit, HeaderInsert):
            items.insert(max(0, min(edit.index, len(items))), (edit.name.lower(), _field_bytes(edit.name, edit.value)))
        elif isinstance(edit, HeaderChange):
            name = edit.name.lower()
            same = [k for k, (n, _) in enumerate(items) if n == name]
            if edit.n <= len(same):
                k = same[edit.n - 1]
                if edit.value:
                    items[k] = (name, _field_bytes(edit.name, edit.value))
                else:
                    del items[k]
            elif edit.value:
                items.append((name, _field_bytes(edit.name, edit.value)))
    body = next((e.body for e in reversed(edits) if isinstance(e, BodyReplace)), None)
    safeio.write_all(dst, prefix + b"".join(raw for _, raw in items))
    if body is None:
        safeio.write_all(dst, tail)
        src.seek(len(section), os.SEEK_CUR)
        while chunk := src.read(COPY_CHUNK):
            safeio.write_all(dst, chunk)
        return
    # the blank line that ends the header section (a message of headers only has none)
    safeio.write_all(dst, tail if tail.startswith(b"\r\n") else b"\r\n")
    body.seek(0)
    for chunk in crlf_lines(iter(lambda: body.read(COPY_CHUNK), b"")):
        safeio.write_all(dst, chunk)


def crlf_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks with every line end (CRLF, a lone LF or a lone CR) as CRLF, and a CRLF at
    the end if the last line had none (our stored messages are CRLF throughout: a bare LF
    passed on could be read as a line end by one server and not by the next)."""
    pending_cr = False
    last = b""
    for chunk in chunks:
        if not chunk:
            continue
        if pending_cr:
            chunk = b"\r" + chunk
            pending_cr = False
        if chunk.endswith(b"\r"):  # its LF may begin the next chunk
            chunk, pending_cr = chunk[:-1], True
        out = re.sub(rb"\r\n|\r|\n", b"\r\n", chunk)
        if out:
            last = out
            yield out
    if pending_cr:
        yield b"\r\n"
    elif last and not last.endswith(b"\r\n"):
        yield b"\r\n"


# -- the envelope ---------------------------------------------------------------------------------
def bare(address: str) -> str:
    """An address as a milter gives it ("<a@b>", "a@b", " <a@b> ") without brackets."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def apply_envelope(envelope, edits: Iterable, resolve: Callable[[str], list[str]],
                   parse: Callable[[str], object], smtputf8: bool) -> str | None:
    """Apply the envelope edits in order to `envelope` (geosmtp.envelope.Envelope), all or
    none. `parse(address)` raises for an address that is not local@domain; `resolve(address)`
    gives the delivery addresses of an added recipient or raises EditRefused (the same rules
    as the client's own RCPT TO: no relaying for whom may not relay). Returns a quarantine
    reason when no recipient would be left (the message keeps the ones it came with and goes
    to hold/: never dropped unseen), else None."""
    from geosmtp.envelope import Recipient

    sender = envelope.sender
    recipients = list(envelope.recipients)
    for edit in edits:
        if not isinstance(edit, ENVELOPE_EDITS):
            continue
        address = bare(edit.address)
        if "\x00" in address or _UNSAFE.search(address):
            raise EditRefused(f"an address with a control character: {address[:80]!r}")
        if isinstance(edit, SenderChange):
            if address:
                _parsed(parse, address, smtputf8)
            sender = address
        elif isinstance(edit, RecipientRemove):
            key = address.lower()
            recipients = [r for r in recipients if key not in (r.original.lower(), r.address.lower())]
        else:
            _parsed(parse, address, smtputf8)
            for target in resolve(address):
                if not any(r.address == target for r in recipients):
                    recipients.append(Recipient(address=target, original=address))
    if not recipients:
        return "every recipient was removed"
    envelope.sender, envelope.recipients = sender, recipients
    return None


def _parsed(parse: Callable[[str], object], address: str, smtputf8: bool) -> None:
    try:
        parse(address)
    except Exception as exc:
        raise EditRefused(f"<{address[:200]}>: {exc}") from None
    if not smtputf8 and not address.isascii():
        raise EditRefused(f"<{address[:200]}> needs SMTPUTF8, which the client did not ask for")
