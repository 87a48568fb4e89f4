"""End to end: PROXY protocol v1 and v2 on listeners behind a balancer. Headers come from an
independent encoder (the proxy-protocol package). The real client address drives policy,
rate limits, logs and Received:; untrusted sources and bad headers are closed; STARTTLS and
implicit TLS work behind the header; a real HAProxy is used when one is installed."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from geosmtp import replies
from tests.support.certs import ServerCert, client_context
from tests.support.e2e import expect, queue_id, send_message
from tests.support.server import ServerProcess, free_port
from tests.support.smtp import RawClient

BALANCER = "127.0.0.1"


def header(version: int, client: str, port: int = 40000) -> bytes:
    encoder = ProxyProtocolV1() if version == 1 else ProxyProtocolV2()
    kw = {"protocol": socket.SOCK_STREAM}  # TCP: without it v2 says "unspecified transport"
    if ":" in client:
        return encoder.pack(ProxyResultIPv6((IPv6Address(client), port), (IPv6Address("::1"), 25), **kw))
    return encoder.pack(ProxyResultIPv4((IPv4Address(client), port), (IPv4Address("127.0.0.1"), 25), **kw))


def proxied(port: int, head: bytes, source: str = BALANCER) -> RawClient:
    c = RawClient(port, timeout=10, source=source)
    c.send(head)
    return c


@pytest.fixture
def srv(tmp_path):
    s = ServerProcess(tmp_path, {"listeners": {
        "smtp": {"proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"], "proxy_timeout": "1s"},
        "submission": {"proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"]}}})
    # ServerProcess.start() probes with a plain connection: give it a LOCAL header's worth
    s.start = _start_with_local(s)
    s.start()
    yield s
    s.stop()


def _start_with_local(s: ServerProcess):
    def start(timeout: float = 15.0):
        with open(s.log_path, "ab") as log:
            s.proc = subprocess.Popen([sys.executable, "-m", "geosmtp", "start", "-c", str(s.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=s.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", s.port), timeout=1) as sock:
                    sock.sendall(ProxyProtocolV2().pack(ProxyResultLocal()))
                    if sock.recv(100).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return s
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{s.log()}")
    return start


@pytest.mark.parametrize("version", [1, 2])
def test_real_client_address_drives_policy_logs_and_received(srv, version):
    # 127.0.0.2 is a trusted network in the test config: through the balancer it may relay
    with proxied(srv.port, header(version, "127.0.0.2")) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<someone@remote.test>") == "250 2.1.5"
    # 192.0.2.7 is nobody: relaying is refused, local mail is accepted, Received: names it
    with proxied(srv.port, header(version, "192.0.2.7")) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        expect(c.cmd("RCPT TO:<someone@remote.test>"), replies.RELAY_DENIED)
        assert c.code("RSET") == "250 2.0.0"
        qid = queue_id(send_message(c, "x@remote.test", ["alice@example.test"], b"Subject: via lb"))
    msg = srv.wait_for(lambda: srv.messages("alice@example.test"))[0]
    assert b"([192.0.2.7])" in msg.split(b"\n\n")[0] or b"[192.0.2.7]" in msg
    assert f"connect from [192.0.2.7] via [{BALANCER}]" in srv.log()
    assert qid in srv.log()


def test_ipv6_client_behind_the_balancer(srv):
    with proxied(srv.port, header(2, "2001:db8::7")) as c:
        assert c.reply()[0] == 220
    srv.wait_for(lambda: "connect from [2001:db8::7]" in srv.log())


def test_untrusted_source_is_closed_without_a_word(srv):
    with proxied(srv.port, header(2, "127.0.0.2"), source="127.0.0.5") as c:
        assert c.closed()
    assert "not a trusted PROXY source" in srv.log()


@pytest.mark.parametrize("garbage", [b"EHLO client.test\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 25\r\n",
                                     b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c", b"PROXY TCP4 1.2.3.4"])
def test_bad_or_missing_header_is_closed(srv, garbage):
    with proxied(srv.port, garbage) as c:
        assert c.closed(timeout=10)  # at once, or after the header timeout for a cut header


def test_local_command_is_a_health_check(srv):
    with proxied(srv.port, ProxyProtocolV2().pack(ProxyResultLocal())) as c:
        assert c.reply()[0] == 220
        assert c.code("QUIT") == "221 2.0.0"


@pytest.fixture
def tls_srv(tmp_path):
    cert = ServerCert()
    cert.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    s = ServerProcess(tmp_path / "srv", {
        "tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")},
        "listeners": {
            "smtp": {"tls": "starttls", "proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"]},
            "submission": {"tls": "implicit", "proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"]}}})
    s.start = _start_with_local(s)
    s.start()
    s.cert = cert
    yield s
    s.stop()


def test_starttls_behind_the_header(tls_srv):
    with proxied(tls_srv.port, header(2, "192.0.2.9")) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.code("STARTTLS") == "220 2.0.0"
        tls = client_context(tls_srv.cert.ca).wrap_socket(c.sock, server_hostname="mx.example.test")
        tls.sendall(b"EHLO client.test\r\n")
        assert tls.recv(4096).startswith(b"250")
        tls.close()
    assert "connect from [192.0.2.9]" in tls_srv.log()


def test_implicit_tls_behind_the_header(tls_srv):
    with socket.create_connection(("127.0.0.1", tls_srv.submission_port), timeout=10) as sock:
        sock.sendall(header(1, "192.0.2.10"))  # the header in clear, then the handshake
        tls = client_context(tls_srv.cert.ca).wrap_socket(sock, server_hostname="mx.example.test")
        assert tls.recv(4096).startswith(b"220")
        tls.sendall(b"QUIT\r\n")
        assert tls.recv(4096).startswith(b"221")
    assert "connect from [192.0.2.10]" in tls_srv.log()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
def test_through_a_real_haproxy(srv, tmp_path):
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{front}
    default_backend geo
backend geo
    server geo 127.0.0.1:{srv.port} send-proxy-v2
""")
    proc = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c = RawClient(front, timeout=10, source="127.0.0.3")
                break
            except OSError:
                time.sleep(0.1)
        with c:
            assert c.reply()[0] == 220
            assert c.code("QUIT") == "221 2.0.0"
        srv.wait_for(lambda: "connect from [127.0.0.3] via [127.0.0.1]" in srv.log())
    finally:
        proc.terminate()
        proc.wait(10)
