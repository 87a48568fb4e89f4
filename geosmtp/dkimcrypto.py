"""dkimpy's RSA done by OpenSSL (the `cryptography` package) instead of Python integers,
and each key parsed once: verification and signing.

dkimpy (pinned) verifies and signs with its own big-integer code and parses the key's ASN.1
for every message: verifying cost about 0.6 ms a message, more than the rest of a 1 KB
message's DKIM check, and an RSA-2048 signature 11 ms. use_openssl() puts four functions of
the same contract in the dkim module, which calls them by their global names (in
verify_sig_process, evaluate_pk and sign): RSASSA_PKCS1_v1_5_verify(hash object, signature,
{"modulus", "publicExponent"}) -> bool, parse_public_key(DER) -> that dict,
RSASSA_PKCS1_v1_5_sign(hash object, private key dict) -> signature, and
parse_pem_private_key(PEM) -> that dict. PKCS#1 v1.5 signatures are deterministic: OpenSSL
writes the very octets dkimpy's code would (a test compares them). Outcomes do not change (the tests verify the
same good and bad signatures both ways), but one: a signature that is not exactly as long
as the key's modulus (leading zero octets added, or dropped by a careless signer) is invalid
(RFC 8017 8.2.2 step 1), where dkimpy's integer arithmetic let it pass.
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
    """RFC 8017 RSASSA-PKCS1-v1_5 verification of a finished hash object's digest."""
    algorithm = _HASHES.get(hash_object.name)
    if algorithm is None:
        raise TypeError(f"unsupported hash {hash_object.name}")
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
    except ValueError as exc:  # a modulus or exponent OpenSSL will not use: a bad key
        raise TypeError(str(exc)) from None
    try:
        key.verify(signature, hash_object.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except InvalidSignature:
        return False
    return True


@lru_cache(maxsize=64)
def parse_pem_private_key(data: bytes) -> dict:
    """dkimpy's parser, once per key (a Signer holds a few, for every message)."""
    return dkim.crypto.parse_pem_private_key(data)


@lru_cache(maxsize=64)
def _private_key(n: int, e: int, d: int, p: int, q: int, dp: int, dq: int, qinv: int) -> rsa.RSAPrivateKey:
    return rsa.RSAPrivateNumbers(p, q, d, dp, dq, qinv, rsa.RSAPublicNumbers(e, n)).private_key()


def rsa_sign(hash_object, private_key: dict) -> bytes:
    """RFC 8017 RSASSA-PKCS1-v1_5 signature of a finished hash object's digest."""
    algorithm = _HASHES.get(hash_object.name)
    if algorithm is None:
        raise TypeError(f"unsupported hash {hash_object.name}")
    k = private_key
    key = _private_key(k["modulus"], k["publicExponent"], k["privateExponent"], k["prime1"], k["prime2"],
                       k["exponent1"], k["exponent2"], k["coefficient"])
    return key.sign(hash_object.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))


def use_openssl() -> None:
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
    dkim.parse_public_key = parse_public_key
    dkim.RSASSA_PKCS1_v1_5_sign = rsa_sign
    dkim.parse_pem_private_key = parse_pem_private_key
