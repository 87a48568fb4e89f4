"""RSA verification done by OpenSSL (the `cryptography` package) instead of dkimpy's Python
integers, and each public key parsed once: for geosmtp's own verifier (verify_digest) and
for dkimpy where it is still called (the tests' reference verifications).

dkimpy (pinned) verifies with its own big-integer code and parses the key's ASN.1 for every
message: that cost about 0.6 ms a message, more than the rest of a 1 KB message's DKIM
check. use_openssl() puts two functions of the same contract in the dkim module, which
calls them by their global names (in verify_sig_process and evaluate_pk):
RSASSA_PKCS1_v1_5_verify(hash object, signature, {"modulus", "publicExponent"}) -> bool and
parse_public_key(DER) -> that dict. (Signing does not go through dkimpy at all: see
geosmtp.dkim.) Outcomes do not change (the tests verify the same good and bad signatures
both ways), but one: a signature that is not exactly as long as the key's modulus (leading
zero octets added, or dropped by a careless signer) is invalid (RFC 8017 8.2.2 step 1),
where dkimpy's integer arithmetic let it pass.
"""
from __future__ import annotations

from functools import lru_cache

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@lru_cache(maxsize=2048)
def parse_public_key(data: bytes) -> dict:
    """dkimpy's parser, once per key (the same few keys sign most mail)."""
    return dkim.crypto.parse_public_key(data)


@lru_cache(maxsize=2048)
def _public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsa_verify(hash_object, signature: bytes, public_key: dict) -> bool:
    """RFC 8017 RSASSA-PKCS1-v1_5 verification of a finished hash object's digest (dkimpy's
    contract)."""
    if hash_object.name not in _HASHES:
        raise TypeError(f"unsupported hash {hash_object.name}")
    return verify_digest(hash_object.digest(), signature, public_key, hash_object.name)


def verify_digest(digest: bytes, signature: bytes, public_key: dict, hash_name: str = "sha256") -> bool:
    """Whether `signature` is the RSASSA-PKCS1-v1_5 signature of `digest` by the key
    {"modulus", "publicExponent"}; TypeError for a key OpenSSL will not use."""
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
    except ValueError as exc:  # a modulus or exponent OpenSSL will not use: a bad key
        raise TypeError(str(exc)) from None
    try:
        key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(_HASHES[hash_name]()))
    except InvalidSignature:
        return False
    return True


def use_openssl() -> None:
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
    dkim.parse_public_key = parse_public_key
