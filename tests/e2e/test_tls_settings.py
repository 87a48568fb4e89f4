"""[tls] settings end to end: certificates chosen by SNI ([[tls.certificate]]), the TLS 1.2
cipher string (CBC and non-forward-secret suites refused by default), TLS 1.3 ciphersuites,
session tickets (off by default) and the reload of every certificate on SIGHUP."""
from __future__ import annotations

import signal
import ssl

import pytest
import trustme

from tests.support.certs import ServerCert, client_context
from tests.support.e2e import HOSTNAME, connect
from tests.support.server import ServerProcess

OTHER = "mail.other.test"
WILD = "*.wild.test"
RSA = trustme.KeyType.RSA


@pytest.fixture(scope="module")
def certs():
    """Three RSA certificates of one CA (RSA: so that the static-RSA suites a client offers
    could be chosen, if the server allowed them): the default (mx.example.test), one for
    mail.other.test and one for *.wild.test."""
    default = ServerCert(key_type=RSA)
    return {"default": default,
            "other": ServerCert(default.ca, OTHER, (OTHER,), key_type=RSA),
            "wild": ServerCert(default.ca, WILD, (WILD,), key_type=RSA)}


def tls_server(tmp_path, certs, **tls) -> ServerProcess:
    pki = tmp_path / "pki"
    pki.mkdir(parents=True)
    for name, cert in certs.items():
        cert.write(pki / f"{name}.pem", pki / f"{name}.key")
    section = {
        "cert_file": str(pki / "default.pem"), "key_file": str(pki / "default.key"),
        "certificate": [
            {"cert_file": str(pki / "other.pem"), "key_file": str(pki / "other.key"), "names": [OTHER]},
            {"cert_file": str(pki / "wild.pem"), "key_file": str(pki / "wild.key"), "names": [WILD]},
        ],
        **tls,
    }
    srv = ServerProcess(tmp_path / "srv", {"tls": section, "listeners": {"smtp": {"tls": "starttls"}}})
    srv.pki = pki
    return srv.start()


def handshake(port: int, ctx: ssl.SSLContext, server_name: str | None):
    """STARTTLS with this SNI name (None: no SNI); the TLS socket after an EHLO inside."""
    c = connect(port, timeout=5)
    assert c.code("STARTTLS") == "220 2.0.0"
    c.sock = ctx.wrap_socket(c.sock, server_hostname=server_name)
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def peer_der(port: int, server_name: str | None) -> bytes:
    ctx = client_context(verify=False)
    c = handshake(port, ctx, server_name)
    try:
        return c.sock.getpeercert(binary_form=True)
    finally:
        c.close()


def test_the_certificate_follows_the_client_sni(tmp_path, certs):
    srv = tls_server(tmp_path, certs)
    try:
        assert peer_der(srv.port, OTHER) == certs["other"].der
        assert peer_der(srv.port, "MAIL.Other.Test") == certs["other"].der  # names are case-blind
        assert peer_der(srv.port, "a.wild.test") == certs["wild"].der
        assert peer_der(srv.port, "a.b.wild.test") == certs["default"].der  # * is one label
        assert peer_der(srv.port, "unknown.test") == certs["default"].der
        assert peer_der(srv.port, None) == certs["default"].der
        # and a verifying client accepts each of them for its name
        ctx = client_context(certs["default"].ca)
        for name in (HOSTNAME, OTHER, "x.wild.test"):
            handshake(srv.port, ctx, name).close()

        # SIGHUP reloads every certificate, not just the default
        fresh = ServerCert(certs["default"].ca, OTHER, (OTHER,), key_type=RSA)
        fresh.write(srv.pki / "other.pem", srv.pki / "other.key")
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(lambda: peer_der(srv.port, OTHER) == fresh.der, timeout=10)
        assert peer_der(srv.port, None) == certs["default"].der
    finally:
        srv.stop()


def tls12(ciphers: str) -> ssl.SSLContext:
    ctx = client_context(verify=False, maximum=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(ciphers)
    return ctx


def test_ciphers_suites_and_tickets(tmp_path, certs):
    srv = tls_server(tmp_path, certs)
    try:
        # the default refuses CBC and static-RSA suites, takes forward-secret AEAD
        for legacy in ("ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256", "AES256-SHA256"):
            with pytest.raises(ssl.SSLError):
                handshake(srv.port, tls12(legacy), None)
        c = handshake(srv.port, tls12("ECDHE-RSA-AES128-GCM-SHA256"), None)
        assert c.sock.cipher()[0] == "ECDHE-RSA-AES128-GCM-SHA256"
        c.close()
        # no session tickets by default, in TLS 1.2 or 1.3
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            c = handshake(srv.port, client_context(verify=False, maximum=maximum), None)
            assert c.code("NOOP") == "250 2.0.0"  # TLS 1.3 tickets come after the handshake
            assert not c.sock.session.has_ticket, maximum
            c.close()
    finally:
        srv.stop()

    srv = tls_server(tmp_path / "2", certs, ciphers="ECDHE-RSA-AES256-GCM-SHA384",
                     ciphersuites="TLS_CHACHA20_POLY1305_SHA256", session_tickets=True)
    try:
        c = handshake(srv.port, tls12("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"), None)
        assert c.sock.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
        c.close()
        c = handshake(srv.port, client_context(verify=False), None)
        assert c.sock.cipher()[:2] == ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3")
        assert c.code("NOOP") == "250 2.0.0"
        assert c.sock.session.has_ticket
        c.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("tls, problem", [
    ({"ciphers": "NO-SUCH-CIPHER"}, "selects no cipher"),
    ({"ciphersuites": "AES128-SHA"}, "is not a list like"),
    ({"certificate": [{"cert_file": "/x", "key_file": "/y", "names": ["bad name"]}]}, "not a host name"),
])
def test_bad_tls_settings_are_named(tls, problem):
    from geosmtp.config import ConfigError, validate

    with pytest.raises(ConfigError) as exc:
        validate({"tls": {"cert_file": "/c", "key_file": "/k", **tls}}, "test")
    assert any(problem in p for p in exc.value.problems), exc.value.problems
