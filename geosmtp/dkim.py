"""DKIM signing (RFC 6376, RFC 8463 for ed25519) with dkimpy.

A Signer holds the keys of the domains we sign for, loaded once. sign() takes the whole
message and returns the DKIM-Signature header lines to put in front of it (one per key of
the From: domain: a domain may have an RSA and an ed25519 key). The RSA operation runs in
OpenSSL (geosmtp.dkimcrypto: about 1 ms for RSA-2048, where dkimpy's own code takes 11); the
caller still runs sign() off the gevent hub (hashing a big message takes longer) and keeps
the result with the spool entry: every retry sends the very same bytes.
"""
from __future__ import annotations

import base64
import email.utils
import re
from dataclasses import dataclass
from pathlib import Path

import dkim
import dkim.crypto

from geosmtp import dkimcrypto

dkimcrypto.use_openssl()

# Signed when present (RFC 6376 5.4.1), in this order; From is signed once more than it
# occurs, so nobody can add a second From: without breaking the signature.
SIGNED_HEADERS = (
    "from", "reply-to", "sender", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "in-reply-to", "references", "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
HEADER_SCAN_LIMIT = 256 * 1024
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.M)


class KeyError_(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    private: bytes  # what dkimpy takes: PEM for RSA, base64 of the raw seed for ed25519


# PKCS#8 DER of an Ed25519 private key (RFC 8410 7): this fixed prefix, then the 32-byte seed
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


def load_key(domain: str, selector: str, key_file: str | Path, algorithm: str) -> Key:
    """Read a PEM private key without a passphrase: RSA as PKCS#1 or PKCS#8 (what
    `openssl genrsa`/`genpkey` write), Ed25519 as PKCS#8 (`openssl genpkey -algorithm ed25519`)."""
    try:
        pem = Path(key_file).read_bytes().replace(b"\r\n", b"\n")  # dkimpy wants LF
    except OSError as exc:
        raise KeyError_(f"{key_file}: cannot read: {exc.strerror}") from None
    m = next((b for b in _PEM.finditer(pem) if b.group(1).endswith(b"PRIVATE KEY")), None)
    if m is None:  # a certificate or a public key given by mistake, or no PEM at all
        raise KeyError_(f"{key_file}: no PEM private key in it")
    if m.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in m.group(0):
        raise KeyError_(f"{key_file}: the key is encrypted; give geosmtp a key without a passphrase")
    try:
        der = base64.b64decode(m.group(2), validate=False)
    except ValueError:
        raise KeyError_(f"{key_file}: the PEM body is not base64") from None
    if algorithm == "ed25519-sha256":
        if len(der) != 48 or not der.startswith(_ED25519_PKCS8):
            raise KeyError_(f"{key_file}: ed25519-sha256 needs an Ed25519 key in PKCS#8 PEM")
        private = base64.b64encode(der[16:])
    else:
        try:
            modulus = dkim.crypto.parse_pem_private_key(pem)["modulus"]
        except (dkim.crypto.UnparsableKeyError, Exception) as exc:
            raise KeyError_(f"{key_file}: rsa-sha256 needs an RSA key ({str(exc).splitlines()[0]})") from None
        if modulus.bit_length() < 1024:
            raise KeyError_(f"{key_file}: RSA keys shorter than 1024 bits are refused (RFC 8301)")
        private = pem
    return Key(domain.lower(), selector.lower(), algorithm, private)


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n", 0, HEADER_SCAN_LIMIT)
    return message[: end + 2] if end >= 0 else message[:HEADER_SCAN_LIMIT]


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From: address, lower-cased; None if there is none."""
    headers = header_block(message)
    for m in _FIELD.finditer(headers):
        if m.group(1).lower() != b"from":
            continue
        end = m.end()
        while True:  # the field goes on over folded lines
            nl = headers.find(b"\r\n", end)
            if nl < 0 or headers[nl + 2: nl + 3] not in (b" ", b"\t"):
                break
            end = nl + 2
        value = headers[m.end(): nl if nl >= 0 else len(headers)].decode("utf-8", "replace")
        addresses = email.utils.getaddresses([value.replace("\r\n", "")])
        for _, addr in addresses:
            if "@" in addr:
                return addr.rpartition("@")[2].strip().lower().rstrip(".") or None
        return None
    return None


class Signer:
    def __init__(self, keys: list[Key]):
        self.keys: dict[str, list[Key]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def domain_for(self, message: bytes, sender: str) -> str | None:
        """The domain to sign for: the From: domain (what DMARC aligns with), else the
        envelope sender's; None when we hold no key for either."""
        for domain in (from_domain(message), sender.rpartition("@")[2].lower() if sender else None):
            if domain and domain in self.keys:
                return domain
        return None

    def sign(self, message: bytes, sender: str) -> bytes:
        """The DKIM-Signature header lines (CRLF) for `message`, or b"" if no key applies."""
        domain = self.domain_for(message, sender)
        if domain is None:
            return b""
        present = {m.group(1).lower().decode("ascii") for m in _FIELD.finditer(header_block(message))}
        include = [name for name in SIGNED_HEADERS if name in present] + ["from"]
        out = []
        for key in self.keys[domain]:
            out.append(dkim.sign(
                message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=key.algorithm.encode("ascii"),
                include_headers=[name.encode("ascii") for name in include],
            ))
        return b"".join(out)
