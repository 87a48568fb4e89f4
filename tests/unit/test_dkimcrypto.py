"""geosmtp.dkimcrypto: dkimpy's RSA verification through OpenSSL gives the outcomes dkimpy's
own code gives, for good and bad signatures alike. (Our signer: test_dkimsign.py.)"""
from __future__ import annotations

import re

import dkim
import dkim.crypto
import pytest

from geosmtp import dkimcrypto
from tests.support.dkimkeys import RSAKey, sign

MESSAGE = b"From: <a@example.org>\r\nTo: <b@example.test>\r\nSubject: s\r\nDate: x\r\nMessage-ID: <m>\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def keys():
    return {bits: RSAKey(bits) for bits in (1024, 2048)}


def verify(message: bytes, record: str, openssl: bool) -> bool:
    saved = dkim.RSASSA_PKCS1_v1_5_verify, dkim.parse_public_key
    try:
        if openssl:
            dkimcrypto.use_openssl()
        else:
            dkim.RSASSA_PKCS1_v1_5_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify
            dkim.parse_public_key = dkim.crypto.parse_public_key
        return dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode())
    finally:
        dkim.RSASSA_PKCS1_v1_5_verify, dkim.parse_public_key = saved


@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("change, valid", [
    (lambda m: m, True),
    (lambda m: m.replace(b"Subject: s", b"Subject: t"), False),  # the RSA check fails
    (lambda m: m.replace(b"body", b"bodY"), False),  # the body hash fails first
    (lambda m: re.sub(rb"([;\s])b=....", rb"\1b=", m, count=1), False),  # three octets short
])
def test_the_same_outcome_both_ways(keys, bits, change, valid):
    key = keys[bits]
    message = change(sign(MESSAGE, key, "s", "example.org"))
    assert verify(message, key.record, openssl=False) is valid
    assert verify(message, key.record, openssl=True) is valid


def test_a_signature_longer_than_the_modulus_is_invalid(keys):
    """RFC 8017 8.2.2 step 1: a signature that is not k octets long is invalid. dkimpy's own
    code reads it as an integer and lets leading zero octets through; OpenSSL does not."""
    key = keys[1024]
    message = re.sub(rb"([;\s])b=", rb"\1b=AAAA", sign(MESSAGE, key, "s", "example.org"), count=1)
    assert verify(message, key.record, openssl=False) is True
    assert verify(message, key.record, openssl=True) is False


def test_another_key_does_not_verify(keys):
    message = sign(MESSAGE, keys[1024], "s", "example.org")
    assert verify(message, keys[2048].record, openssl=True) is False
    assert verify(message, keys[2048].record, openssl=False) is False


def test_a_key_openssl_refuses_is_a_key_error_not_a_crash():
    with pytest.raises(TypeError):
        dkimcrypto.rsa_verify(type("H", (), {"name": "sha256", "digest": lambda self: b"x" * 32})(), b"s" * 128,
                              {"modulus": 2 ** 1023 + 1, "publicExponent": 2})  # an even exponent
    with pytest.raises(TypeError):
        dkimcrypto.rsa_verify(type("H", (), {"name": "md5"})(), b"", {"modulus": 3, "publicExponent": 3})
