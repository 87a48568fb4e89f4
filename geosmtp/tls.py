"""TLS contexts for the listeners, and their reload without dropping sessions.

A ServerTLS holds the current SSLContext. Each handshake takes the context current at that
moment, so a reload (SIGHUP) affects new handshakes only; sessions already in TLS keep
theirs. A bad new certificate is refused and the old context stays.
"""
from __future__ import annotations

from dataclasses import dataclass

from gevent import ssl  # gevent's SSLContext: its sockets cooperate with the hub

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class TLSFiles:
    cert_file: str
    key_file: str
    min_version: str = "TLSv1.2"


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted; give geosmtp a key without a passphrase")


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """An SSLContext for the server side; raises OSError or ssl.SSLError if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[files.min_version]
    # RFC 8314 / BCP 195: no compression, our cipher order, fresh keys per handshake
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    # a passphrase-protected key is refused, never prompted for: OpenSSL would otherwise ask
    # on the terminal and freeze the server (a reload runs on the event loop)
    ctx.load_cert_chain(files.cert_file, files.key_file, password=_no_passphrase)
    return ctx


class ServerTLS:
    def __init__(self, files: TLSFiles):
        self.files = files
        self.context = server_context(files)

    def reload(self, files: TLSFiles | None = None) -> None:
        """Load the certificate and key again (new files if given). On error the old
        context stays and the error is raised for the caller to log."""
        files = files or self.files
        self.context = server_context(files)
        self.files = files
