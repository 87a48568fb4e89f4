"""SASL PLAIN and LOGIN decoding (RFC 4954, RFC 4616), scrypt password hashes, and the users
file (the "config" directory backend's users; geosmtp.directory holds them for the server).

Pure functions and a small store: no sockets, no logging. Nothing here ever puts a password,
a SASL payload or a hash into an exception message, so nothing can leak into a log.

users_file format, one user per line (blank lines and # comments allowed):

    alice@example.test:$scrypt$ln=14,r=8,p=1$<salt, base64>$<key, base64>
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from geosmtp.protocol import ascii_lower

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 14, 8, 1  # 16 MiB and ~50 ms per check on one core
_HASH = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
MAX_PASSWORD = 1024


class SaslError(Exception):
    """A malformed SASL exchange (the reason never contains the payload)."""


class BadBase64(SaslError):
    """A response that is not base64 (RFC 4954: 501 5.5.2)."""


def hash_password(password: str, *, ln: int = SCRYPT_LN, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p, dklen=32)
    return f"$scrypt$ln={ln},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def valid_hash(encoded: str) -> bool:
    m = _HASH.fullmatch(encoded)
    return bool(m) and 1 <= int(m.group(1)) <= 20


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of a password against hash_password()'s output."""
    m = _HASH.fullmatch(encoded)
    if not m or len(password) > MAX_PASSWORD:
        return False
    ln, r, p = (int(g) for g in m.group(1, 2, 3))
    salt, want = base64.b64decode(m.group(4)), base64.b64decode(m.group(5))
    got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p,
                         dklen=len(want), maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(got, want)


@functools.cache
def _dummy_hash() -> str:
    # checked when the user is unknown, so a wrong user costs the time of a wrong password
    return hash_password("unknown user, never matches")


def check(password: str, encoded: str | None) -> bool:
    """The password against a user's hash, None for an unknown user (checked against a dummy
    hash all the same, so a wrong user costs the time of a wrong password). Slow on purpose
    (scrypt): call it off the event loop."""
    ok = verify_password(password, encoded or _dummy_hash())
    return ok and encoded is not None


@dataclass
class UserStore:
    users: dict[str, str]  # address (lower case) → encoded hash

    @classmethod
    def parse(cls, text: str) -> UserStore:
        """Raises ValueError naming the line (never its content past the user name)."""
        users: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, encoded = line.partition(":")
            if not sep or "@" not in name or not valid_hash(encoded):
                raise ValueError(f"line {number}: expected address:$scrypt$... hash")
            users[ascii_lower(name.strip())] = encoded
        return cls(users)

    @classmethod
    def load(cls, path: str | os.PathLike) -> UserStore:
        """Raises OSError if unreadable, ValueError naming the file and the line."""
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                number = data.count(b"\n", 0, exc.start) + 1
                raise ValueError(f"line {number}: not UTF-8") from None
            return cls.parse(text)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    def dump(self) -> str:
        return "".join(f"{name}:{encoded}\n" for name, encoded in sorted(self.users.items()))

    def check(self, user: str, password: str) -> bool:
        """Slow on purpose (scrypt): call it off the event loop."""
        return check(password, self.users.get(ascii_lower(user)))


def read_secret(path: str | os.PathLike) -> str:
    """The first line of a file that only its owner may read (the smarthost password).
    Raises OSError, or ValueError naming the file (never its content)."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ValueError(f"{os.fspath(path)}: readable by others (mode {mode & 0o777:o}); chmod 600 it")
    with open(path, encoding="utf-8") as fh:
        try:
            secret = fh.readline().rstrip("\r\n")
        except UnicodeDecodeError:
            raise ValueError(f"{os.fspath(path)}: not UTF-8") from None
    if not secret:
        raise ValueError(f"{os.fspath(path)}: empty")
    return secret


def decode_response(text: str) -> bytes:
    """A client's base64 SASL response (RFC 4954 4); "=" is the empty response."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise BadBase64("response is not valid base64") from None


def parse_plain(data: bytes) -> tuple[str, str]:
    """RFC 4616: [authzid] NUL authcid NUL passwd → (user, password).

    We act only as the user who authenticates: an authzid naming someone else is refused.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN needs authzid NUL authcid NUL passwd")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise SaslError("PLAIN response is not UTF-8") from None
    if not authcid or not password:
        raise SaslError("empty user or password")
    if authzid and authzid.lower() != authcid.lower():
        raise SaslError("authorization identity differs from the user")
    return authcid, password


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("response is not UTF-8") from None
