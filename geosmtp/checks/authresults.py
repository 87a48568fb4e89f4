"""Authentication-Results (RFC 8601): ours written from the methods' results, and the test
for a field that claims our authserv-id (which a client must never get through, section 5).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from geosmtp.checks.interface import AuthResult

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+")  # a value, domain or addr-spec as is
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _value(text: str) -> str:
    """A property value: as it is when it is one token, else a quoted-string."""
    return _quoted(str(text))


@lru_cache(maxsize=4096)  # the same senders and domains in message after message
def _quoted(text: str) -> str:
    text = _UNSAFE.sub("", text.encode("utf-8", "replace").decode("utf-8"))[:255]
    if _TOKEN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_entry(r: AuthResult) -> str:
    out = f"{r.method}={r.result}"
    if r.reason:
        out += f" reason={_value(r.reason)}"
    for name, value in r.properties:
        out += f" {name}={_value(value)}"
    return out


def format_header(authserv_id: str, results: Iterable[AuthResult]) -> str:
    """The field's value: "authserv-id; method=result ...; ...", one method per folded line
    (or "none" when no method ran, RFC 8601 2.2)."""
    entries = [format_entry(r) for r in results]
    return f"{authserv_id};" + (";".join(f"\r\n\t{e}" for e in entries) if entries else " none")


def _skip_cfws(text: str) -> str:
    """The text after leading white space and (nested) comments."""
    i, depth = 0, 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return text[i:]


def authserv_id(value: str) -> str:
    """The authserv-id an Authentication-Results value names (its first token)."""
    rest = _skip_cfws(value)
    if rest.startswith('"'):  # authserv-id is a value: a quoted-string is allowed
        end = rest.find('"', 1)
        return rest[1:end if end > 0 else len(rest)]
    m = re.match(r"[^\s;()]+", rest)
    return m.group(0) if m else ""


def is_ours(value: str, hostname: str) -> bool:
    return authserv_id(value).rstrip(".").lower() == hostname.rstrip(".").lower()
