"""End to end: PROXY protocol v1 and v2 on listeners behind a balancer. Headers come from an
independent encoder (the proxy-protocol package). The real client address drives policy,
rate limits, logs and Received:; untrusted sources and bad headers are closed; STARTTLS and
implicit TLS work behind the header; a real HAProxy is used when one is installed."""
from __future__ import annotations

import signal
import socket
import subprocess
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from geosmtp import replies
from tests.support.certs import ServerCert, client_context
from tests.support.e2e import expect, queue_id, send_message
from tests.support.haproxy import HAPROXY, LOCAL_HEADER, server_state
from tests.support.server import ServerProcess, free_port
from tests.support.smtp import RawClient
from tests.unit.test_proxy import near_headers

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
    s.probe_prefix = LOCAL_HEADER
    s.start()
    yield s
    s.stop()


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
    s.probe_prefix = LOCAL_HEADER
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


def test_mail_and_drain_through_a_real_haproxy(tmp_path):
    """Our shipped haproxy.cfg's shape: send-proxy-v2 to the listener, health from /readyz.
    Mail from 127.0.0.3 arrives with 127.0.0.3 as its client; on SIGTERM HAProxy takes the
    node out (readyz 503) while its listener is still open (drain_delay), then it exits 0."""
    assert HAPROXY is not None, "HAProxy is not installed (.ci/run installs Debian's haproxy)"
    mport, front = free_port(), free_port()
    s = ServerProcess(tmp_path / "geo", {
        "listeners": {"smtp": {"proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"]}},
        "metrics": {"address": f"127.0.0.1:{mport}"}, "server": {"drain_delay": "4s"}})
    s.probe_prefix = LOCAL_HEADER
    s.start()
    stats = str(tmp_path / "haproxy.sock")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    stats socket {stats} level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{front}
    default_backend geo
backend geo
    option httpchk GET /readyz
    http-check expect status 200
    server geo 127.0.0.1:{s.port} check port {mport} inter 200ms fall 2 rise 1 send-proxy-v2
""")
    proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        s.wait_for(lambda: server_state(stats) == 2, timeout=10)  # /readyz said 200
        with RawClient(front, timeout=10, source="127.0.0.3") as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            qid = queue_id(send_message(c, "x@remote.test", ["alice@example.test"], b"Subject: via haproxy\r\n\r\nhi"))
            assert c.code("QUIT") == "221 2.0.0"
        (msg,) = s.wait_for(lambda: s.messages("alice@example.test"))
        received = msg.partition(b"\nReceived: ")[2].partition(b";")[0]  # ours: the first one
        assert b"[127.0.0.3]" in received and qid.encode() in received, msg[:400]
        s.wait_for(lambda: "connect from [127.0.0.3] via [127.0.0.1]" in s.log())

        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda: server_state(stats) == 0, timeout=3)  # taken out by /readyz...
        assert s.proc.poll() is None  # ...while geosmtp still listens (drain_delay 4 s)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as direct:
            direct.sendall(ProxyProtocolV2().pack(ProxyResultLocal()))
            assert direct.recv(100).startswith(b"220")
        assert s.proc.wait(20) == 0
    finally:
        proc.terminate()
        proc.wait(10)
        s.kill()


@pytest.fixture(scope="module")
def garbage_srv(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("garbage"), {"listeners": {
        "smtp": {"proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"], "proxy_timeout": "1s"}}})
    s.probe_prefix = LOCAL_HEADER
    s.start()
    yield s
    s.stop()


@settings(max_examples=60, deadline=None, database=None)
@given(near_headers())
def test_garbage_on_the_proxy_listener_is_closed_or_greeted_never_a_crash(garbage_srv, data):
    """Random bytes, real prefixes with random tails and mutated real headers, over a real
    socket: the server either closes at once without a word or (a mutation that is still
    a valid header) greets; whatever was said, it is never more than SMTP replies."""
    with proxied(garbage_srv.port, data) as c:
        try:
            c.sock.shutdown(socket.SHUT_WR)  # nothing more comes: never a wait for the timeout
        except OSError:  # the server has already closed it (a bad header is refused at once)
            pass
        assert c.closed(timeout=5)
        out = c.buf
    # a valid header with more bytes behind it is a client talking before the greeting
    assert out == b"" or out.startswith(b"220 ") or out.startswith(replies.PROTOCOL_SYNC.to_bytes()), out[:200]
    assert all(line[:3].isdigit() for line in out.split(b"\r\n")[:-1]), out[:200]


def test_after_the_garbage_the_listener_still_serves(garbage_srv):
    # runs after the property above (same module, file order): no session or process harmed
    with proxied(garbage_srv.port, header(2, "192.0.2.33")) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.code("QUIT") == "221 2.0.0"
    log = garbage_srv.log()
    assert "Traceback" not in log and "session failed" not in log
