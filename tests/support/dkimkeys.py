"""DKIM keys made for a test (RSA with cryptography, Ed25519 with PyNaCl), their DNS key
records, and signing with dkimpy: what the dkim/dmarc check tests sign with."""
from __future__ import annotations

import base64

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


class RSAKey:
    def __init__(self, bits: int = 1024):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
        self.algorithm = b"rsa-sha256"


class Ed25519Key:
    def __init__(self):
        key = nacl.signing.SigningKey.generate()
        self.private = key.encode(encoder=nacl.encoding.Base64Encoder)
        self.record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(key.verify_key.encode()).decode()
        self.algorithm = b"ed25519-sha256"


def sign(message: bytes, key, selector: str, domain: str, **kw) -> bytes:
    """The message with a DKIM-Signature by `key` in front."""
    kw.setdefault("include_headers", SIGNED)
    kw.setdefault("signature_algorithm", key.algorithm)
    return dkim.sign(message, selector.encode(), domain.encode(), key.private, **kw) + message
