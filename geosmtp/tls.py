"""TLS contexts for the listeners: certificates chosen by SNI, cipher settings, session
tickets with a key that changes, and reload without dropping sessions.

A ServerTLS holds one SSLContext per certificate; the first is the default, and picks the
others by the name the client asks for (SNI). Each handshake takes the contexts current at
that moment, so a reload (SIGHUP) affects new handshakes only; sessions already in TLS keep
theirs. A bad new certificate is refused and the old contexts stay.

Session tickets are off unless asked for. SMTP clients seldom resume sessions, and a ticket
is only as forward-secret as the key that encrypts it, which OpenSSL makes at random for
each context and keeps for the context's life: with tickets on, the contexts are made anew
every TICKET_KEY_LIFETIME, so no ticket key lives longer than that.
"""
from __future__ import annotations

import _ssl
import ctypes
import sys
import time
from dataclasses import dataclass, field

from gevent import ssl  # gevent's SSLContext: its sockets cooperate with the hub
from loguru import logger

from geosmtp.config import DEFAULT_CIPHERS, DEFAULT_CIPHERSUITES

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
TICKET_KEY_LIFETIME = 12 * 3600.0
RETRY_AFTER_FAILURE = 300.0  # a rotation that could not load the files tries again after this


@dataclass(frozen=True)
class Certificate:
    cert_file: str
    key_file: str
    names: tuple[str, ...] = ()  # SNI names served ("mx.example.com", "*.example.org")


@dataclass(frozen=True)
class TLSSettings:
    certificates: tuple[Certificate, ...]  # the first one is the default
    min_version: str = "TLSv1.2"
    ciphers: str = DEFAULT_CIPHERS
    ciphersuites: str = DEFAULT_CIPHERSUITES
    session_tickets: bool = False

    @property
    def cert_files(self) -> str:
        return ", ".join(c.cert_file for c in self.certificates)


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted; give geosmtp a key without a passphrase")


def set_ciphersuites(ctx: ssl.SSLContext, suites: str) -> None:
    """The TLS 1.3 suites, which Python's ssl module cannot set (SSLContext.set_ciphers is
    for TLS 1.2): SSL_CTX_set_ciphersuites on the context's SSL_CTX, found right after the
    object header (CPython's PySSLContext), in the libssl that _ssl is linked with. The
    result is checked against what the context reports."""
    if sys.implementation.name != "cpython":
        raise ValueError("[tls] ciphersuites needs CPython")
    lib = ctypes.CDLL(_ssl.__file__)
    setter = lib.SSL_CTX_set_ciphersuites
    setter.argtypes, setter.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int
    handle = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if setter(handle, suites.encode("ascii")) != 1:
        raise ValueError(f"[tls] ciphersuites {suites!r}: OpenSSL knows none of these")
    have = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    wanted = [s for s in suites.split(":") if s]
    if sorted(have) != sorted(wanted):
        raise ValueError(f"[tls] ciphersuites {suites!r}: OpenSSL took {':'.join(have) or 'none'}")


def server_context(cert: Certificate, settings: TLSSettings) -> ssl.SSLContext:
    """An SSLContext for the server side; raises OSError, ValueError or ssl.SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[settings.min_version]
    # RFC 8314 / BCP 195: no compression, our cipher order, fresh keys per handshake
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
    ctx.set_ciphers(settings.ciphers)
    if settings.ciphersuites != DEFAULT_CIPHERSUITES:
        set_ciphersuites(ctx, settings.ciphersuites)
    if not settings.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 tickets
        ctx.num_tickets = 0  # TLS 1.3 tickets
    # a passphrase-protected key is refused, never prompted for: OpenSSL would otherwise ask
    # on the terminal and freeze the server (a reload runs on the event loop)
    ctx.load_cert_chain(cert.cert_file, cert.key_file, password=_no_passphrase)
    return ctx


def name_matches(pattern: str, name: str) -> bool:
    """An SNI name against a certificate's name: exact, or "*." standing for one label."""
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return name == pattern


@dataclass
class _Contexts:
    default: ssl.SSLContext
    by_name: list[tuple[str, ssl.SSLContext]] = field(default_factory=list)  # exact names first
    made: float = field(default_factory=time.monotonic)

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            for pattern, ctx in self.by_name:
                if name_matches(pattern, name):
                    return ctx
        return self.default


class ServerTLS:
    def __init__(self, settings: TLSSettings):
        self.settings = settings
        self._current = self._build(settings)

    def _build(self, settings: TLSSettings) -> _Contexts:
        made = [server_context(cert, settings) for cert in settings.certificates]
        names = [(name.lower(), ctx) for cert, ctx in zip(settings.certificates, made) for name in cert.names]
        names.sort(key=lambda item: item[0].startswith("*."))  # an exact name beats a wildcard
        contexts = _Contexts(made[0], names)
        made[0].sni_callback = lambda sock, server_name, _ctx: self._switch(contexts, sock, server_name)
        return contexts

    @staticmethod
    def _switch(contexts: _Contexts, sock, server_name: str | None) -> None:
        """During the handshake (OpenSSL's servername callback): the certificate for the name."""
        ctx = contexts.pick(server_name)
        if ctx is not contexts.default:
            sock.context = ctx

    @property
    def context(self) -> ssl.SSLContext:
        """The default context for the next handshake (it switches by SNI itself). With
        session tickets on, contexts older than TICKET_KEY_LIFETIME are made anew first."""
        current = self._current
        if self.settings.session_tickets and time.monotonic() - current.made > TICKET_KEY_LIFETIME:
            self._rotate(current)
        return self._current.default

    def _rotate(self, old: _Contexts) -> None:
        try:
            self._current = self._build(self.settings)
            logger.info("tls: new session ticket keys (certificates read again from {})", self.settings.cert_files)
        except (OSError, ValueError) as exc:  # keep the old keys a little longer, and say why
            old.made += RETRY_AFTER_FAILURE
            logger.error("tls: session ticket keys not renewed, cannot load {}: {}", self.settings.cert_files, exc)
