"""Our SMTP client against SMTP servers we did not write: aiosmtpd (with STARTTLS required and
AUTH) as the remote MX, and Postfix's smtp-sink when it is installed."""
from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.support.certs import ServerCert
from tests.support.e2e import connect, queue_id, send_message
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import pick_port
from tests.support.server import ServerProcess

MX = "127.0.0.13"
BODY = (b"From: <alice@example.test>\r\nTo: <bob@remote.test>\r\nSubject: interop\r\n\r\n"
        b".a line that starts with a dot\r\nend\r\n")


class Collect:
    def __init__(self):
        self.envelopes = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                               session.ssl is not None, getattr(session, "login_data", None)))
        return "250 2.0.0 Ok: taken"


def relay_server(tmp_path, dns, port, **relay):
    dns.mx("remote.test", [(10, "mx.remote.test")])
    dns.a("mx.remote.test", MX)
    return ServerProcess(tmp_path, {
        "relay": {"dns_servers": [dns.address], "port": port, "connect_timeout": 2,
                  "command_timeout": 5, "data_timeout": 5, **relay},
        "queue": {"scan_interval": 0.2, "retry_schedule": [1]},
    }).start()


def submit(srv):
    """BODY as a client sends it: dot-stuffed, its last CRLF part of the end marker."""
    wire = BODY.replace(b"\r\n.", b"\r\n..")[:-2]
    with connect(srv.port, source="127.0.0.2") as c:
        return queue_id(send_message(c, "alice@example.test", ["bob@remote.test"], wire))


def wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_delivery_to_aiosmtpd_with_starttls_required_and_verified(tmp_path):
    cert = ServerCert(identities=("mx.remote.test",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.leaf.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    cert.ca.cert_pem.write_to_path(str(ca_file))
    handler = Collect()
    port = pick_port([MX])
    controller = Controller(handler, hostname=MX, port=port, tls_context=server_ctx, require_starttls=True)
    controller.start()
    try:
        with FakeDNS() as dns:
            srv = relay_server(tmp_path / "srv", dns, port, tls="verify", ca_file=str(ca_file))
            try:
                submit(srv)
                assert wait(lambda: handler.envelopes), srv.log()
            finally:
                srv.stop()
    finally:
        controller.stop()
    [(sender, rcpts, content, tls, _)] = handler.envelopes
    assert (sender, rcpts, tls) == ("alice@example.test", ["bob@remote.test"], True)
    assert content.endswith(BODY)  # dot-stuffed on the way, unstuffed by aiosmtpd


def test_smarthost_auth_to_aiosmtpd(tmp_path):
    cert = ServerCert(identities=("relay.remote.test", MX))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.leaf.configure_cert(server_ctx)
    logins = []

    def authenticator(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relayuser", b"s3cret-pw")
        logins.append((mechanism, ok))
        return AuthResult(success=ok)

    handler = Collect()
    port = pick_port([MX])
    controller = Controller(handler, hostname=MX, port=port, tls_context=server_ctx, require_starttls=True,
                            authenticator=authenticator, auth_required=True)
    controller.start()
    secret = tmp_path / "pw"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    try:
        with FakeDNS() as dns:
            srv = relay_server(tmp_path / "srv", dns, port, smarthost=f"{MX}:{port}",
                               smarthost_user="relayuser", smarthost_password_file=str(secret))
            try:
                submit(srv)
                assert wait(lambda: handler.envelopes), srv.log()
                log = srv.log()
            finally:
                srv.stop()
    finally:
        controller.stop()
    assert logins == [("PLAIN", True)]
    assert "s3cret-pw" not in log
    assert handler.envelopes[0][3] is True  # over TLS


def test_delivery_to_postfix_smtp_sink(tmp_path):
    assert shutil.which("smtp-sink", path="/usr/sbin:/usr/bin"), \
        "Postfix's smtp-sink is not installed (.ci/run installs Debian's postfix)"
    port = pick_port([MX])
    # smtp-sink writes as "nobody": a directory that user can reach (pytest's tmp is 0700)
    dump = Path(tempfile.mkdtemp(prefix="geosmtp-sink-"))
    dump.chmod(0o777)
    cmd = [shutil.which("smtp-sink", path="/usr/sbin:/usr/bin"), "-u", "nobody", "-d", f"{dump}/%M.",
           f"{MX}:{port}", "16"]
    sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait(lambda: _answers(MX, port), 10)
        with FakeDNS() as dns:
            srv = relay_server(tmp_path / "srv", dns, port)
            try:
                qid = submit(srv)
                assert wait(lambda: list(dump.iterdir())), srv.log()
                assert wait(lambda: not (srv.spool / "msg" / qid).exists())
            finally:
                srv.stop()
        [saved] = list(dump.iterdir())
        data = saved.read_bytes()
        assert b"Subject: interop" in data
        assert b"\n.a line that starts with a dot" in data.replace(b"\r\n", b"\n")
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
        shutil.rmtree(dump, ignore_errors=True)


def _answers(host, port):
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(100).startswith(b"220")
    except OSError:
        return False
