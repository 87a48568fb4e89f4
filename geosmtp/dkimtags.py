"""DKIM tag lists (RFC 6376 3.2) and the checks a DKIM-Signature's tags must pass before
anything is verified (RFC 6376 3.5, 6.1.1), read as dkimpy reads them (a test compares
both on random input), at a fraction of its cost: patterns compiled once, no module-level
re calls per tag.

parse() raises TagError for a list that is not tag=value pairs (or names a tag twice);
check_signature() raises TagError naming the first tag that is wrong."""
from __future__ import annotations

import re
import time

MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
ALGORITHMS = (b"rsa-sha1", b"rsa-sha256", b"ed25519-sha256")
CLOCK_SLOP = 36000  # seconds: t= in the future, x= in the past, by more than this is refused

_TAG_START = re.compile(rb"[a-zA-Z]")
_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*")
_SPECIALS = re.compile(rb"[()<>\[\]:;@\\,]")
_DIGITS = re.compile(rb"\d+")
_LENGTH = re.compile(rb"\d{,76}")


class TagError(ValueError):
    pass


def parse(tag_list: bytes) -> dict[bytes, bytes]:
    """tag=value pairs separated by ";" (a last one may be empty), each side stripped of
    white space; a tag name starts with a letter."""
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        key, sep, value = spec.partition(b"=")
        key = key.strip()
        if not sep or not _TAG_START.match(key):
            raise TagError(f"not a tag=value: {spec[:40]!r}"[:80])
        if key in tags:
            raise TagError(f"tag {key[:20].decode('ascii', 'replace')} given twice")
        tags[key] = value.strip()
    return tags


def _unspaced_length(value: bytes) -> int:
    return len(b"".join(value.split()))  # bytes.split() takes the white space \s does


def _base64(name: bytes, value: bytes) -> None:
    if _BASE64.fullmatch(value) is None or _unspaced_length(value) % 4:
        raise TagError(f"{name.decode()}= value is not valid base64")


def check_signature(tags: dict[bytes, bytes], now: float | None = None) -> None:
    """What dkimpy's validate_signature_fields refuses, refused with its words."""
    for name in MANDATORY:
        if name not in tags:
            raise TagError(f"missing {name.decode()}=")
    if tags[b"a"] not in ALGORITHMS:
        raise TagError(f"unknown signature algorithm: {tags[b'a'][:40].decode('ascii', 'replace')}")
    _base64(b"b", tags[b"b"])
    # dkimpy checks the b= syntax for bh= (b= passed just above) and bh='s length only
    if _unspaced_length(tags[b"bh"]) % 4:
        raise TagError("bh= value is not valid base64")
    if b"cv" in tags and tags[b"cv"] not in (b"pass", b"fail", b"none"):  # dkimpy asks it of DKIM too
        raise TagError("cv= value is not valid")
    d = tags[b"d"]
    if d.isascii() and _SPECIALS.search(d):
        raise TagError("d= value is not valid")
    i = tags.get(b"i")
    if i is not None and (not i.lower().endswith(d.lower()) or len(i) <= len(d)
                          or i[-len(d) - 1] not in (64, 46)):  # "@" or "."
        raise TagError("i= domain is not a subdomain of d=")
    if b"l" in tags and _LENGTH.fullmatch(tags[b"l"]) is None:
        raise TagError("l= value is not a decimal integer")
    if b"q" in tags and tags[b"q"] != b"dns/txt":
        raise TagError("q= value is not dns/txt")
    now = int(time.time() if now is None else now)
    signed = None
    if b"t" in tags:
        if _DIGITS.fullmatch(tags[b"t"]) is None:
            raise TagError("t= value is not a decimal integer")
        signed = int(tags[b"t"])
        if signed > now + CLOCK_SLOP:
            raise TagError("t= value is in the future")
    if tags[b"v"] != b"1":
        raise TagError("v= value is not 1")
    if b"x" in tags:
        if _DIGITS.fullmatch(tags[b"x"]) is None:
            raise TagError("x= value is not a decimal integer")
        expires = int(tags[b"x"])
        if expires < now - CLOCK_SLOP:
            raise TagError("x= value is past")
        if signed and expires < signed:
            raise TagError("x= value is less than t= value")
