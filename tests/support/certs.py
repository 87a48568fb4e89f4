"""Test certificates (trustme): a CA of our own, server certificates written to files, and
client SSL contexts that trust that CA. Nothing here touches the system trust store."""
from __future__ import annotations

import os
import ssl
from pathlib import Path

import trustme

HOSTNAME = "mx.example.test"  # server.hostname in tests/support/server.py


class ServerCert:
    """A leaf certificate for the test server, issued by `ca` (a new CA unless given)."""

    def __init__(self, ca: trustme.CA | None = None, common_name: str = HOSTNAME,
                 identities: tuple[str, ...] = (HOSTNAME, "127.0.0.1"),
                 key_type: trustme.KeyType = trustme.KeyType.ECDSA):
        self.ca = ca or trustme.CA()
        self.leaf = self.ca.issue_cert(*identities, common_name=common_name, key_type=key_type)
        self.common_name = common_name

    @property
    def cert_pem(self) -> bytes:
        """The chain as the server presents it (leaf first)."""
        return b"".join(blob.bytes() for blob in self.leaf.cert_chain_pems)

    @property
    def key_pem(self) -> bytes:
        return self.leaf.private_key_pem.bytes()

    @property
    def der(self) -> bytes:
        """The leaf in DER, as SSLSocket.getpeercert(binary_form=True) returns it."""
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode("ascii"))

    def write(self, cert_file: Path, key_file: Path) -> None:
        """Write both files, each replaced atomically (no reader ever sees half a file)."""
        replace_file(key_file, self.key_pem)
        replace_file(cert_file, self.cert_pem)


def replace_file(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def client_context(*cas: trustme.CA, maximum: ssl.TLSVersion | None = None,
                   minimum: ssl.TLSVersion | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context that trusts the given CAs (and nothing else) and checks host names."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no system CAs; verifies names by default
    for ca in cas:
        ca.configure_trust(ctx)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if minimum is not None:
        ctx.minimum_version = minimum
    return ctx
