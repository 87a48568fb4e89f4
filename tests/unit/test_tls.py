"""geosmtp.tls: the session ticket key changes (contexts made anew), SNI name matching."""
from __future__ import annotations

import pytest

from geosmtp import tls
from tests.support.certs import ServerCert


@pytest.fixture
def settings(tmp_path):
    cert = ServerCert()
    cert.write(tmp_path / "c.pem", tmp_path / "k.pem")
    return lambda **kw: tls.TLSSettings((tls.Certificate(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")),), **kw)


def test_with_tickets_the_contexts_are_made_anew_after_their_lifetime(settings, monkeypatch):
    server = tls.ServerTLS(settings(session_tickets=True))
    first = server.context
    assert server.context is first  # within its lifetime
    monkeypatch.setattr(tls, "TICKET_KEY_LIFETIME", 0.0)
    second = server.context
    assert second is not first  # a new SSL_CTX: OpenSSL made it a new random ticket key


def test_without_tickets_nothing_is_rotated(settings, monkeypatch):
    monkeypatch.setattr(tls, "TICKET_KEY_LIFETIME", 0.0)
    server = tls.ServerTLS(settings())
    assert server.context is server.context


def test_a_rotation_that_cannot_load_keeps_the_old_keys_for_a_while(settings, monkeypatch, tmp_path):
    server = tls.ServerTLS(settings(session_tickets=True))
    first = server.context
    (tmp_path / "k.pem").unlink()
    monkeypatch.setattr(tls, "TICKET_KEY_LIFETIME", 60.0)
    server._current.made -= 61
    assert server.context is first  # kept, and tried again only after RETRY_AFTER_FAILURE
    assert server._current.made > tls.time.monotonic() - 61 + tls.RETRY_AFTER_FAILURE - 1


@pytest.mark.parametrize("pattern, name, matches", [
    ("mx.example.com", "mx.example.com", True),
    ("mx.example.com", "mx2.example.com", False),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
])
def test_sni_names(pattern, name, matches):
    assert tls.name_matches(pattern, name) is matches
