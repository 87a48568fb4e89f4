"""End to end: /metrics, /healthz and /readyz on [metrics] address, in one process and with
workers; the counters move with real SMTP traffic over real sockets (TLS versions, AUTH
failures, rate limits, refused connections), and /readyz says 503 when the spool cannot take
a message."""
from __future__ import annotations

import base64
import smtplib
import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from geosmtp import replies
from tests.support.certs import ServerCert, client_context
from tests.support.e2e import connect, expect, queue_id, send_message
from tests.support.server import PASSWORDS, ServerProcess, free_port
from tests.support.smtp import RawClient

ALICE = "alice@example.test"
MODES = pytest.mark.parametrize("workers", [1, 2], ids=["single", "workers2"])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """One sample's value from the exposition text (parsed by prometheus_client's own
    parser), or None if there is no sample with exactly that name and those labels."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def value(text: str, name: str, **labels) -> float:
    """Like sample(), but the sample must be there: a missing metric fails the test instead
    of passing for 0."""
    got = sample(text, name, **labels)
    if got is None:
        same = [line for line in text.splitlines() if line.startswith(name)]
        raise AssertionError(f"no sample {name}{labels or ''} in /metrics; samples of that name: {same}")
    return got


def scrape(srv: ServerProcess, name: str | None = None, want: float | None = None, **labels) -> str:
    """/metrics; with `name`, once that sample has reached `want` (bounded wait: with workers
    the master reads the workers' files, which are written as the counters move)."""
    def text():
        status, body = get(srv.metrics_port, "/metrics")
        assert status == 200, (status, body)
        return body if name is None or sample(body, name, **labels) == want else None
    return srv.wait_for(text)


def start(tmp_path, overrides: dict | None = None, workers: int = 1) -> ServerProcess:
    mport = free_port()
    s = ServerProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"},
                                 "server": {"workers": workers}, **(overrides or {})})
    s.metrics_port = mport
    s.start()
    if workers > 1:  # both workers listening before we count
        s.wait_for(lambda: s.log().count("listening on 127.0.0.1") >= 2 * workers, timeout=15)
    return s


@pytest.fixture
def make_server(tmp_path):
    started = []

    def make(overrides: dict | None = None, workers: int = 1) -> ServerProcess:
        started.append(start(tmp_path / f"srv{len(started)}", overrides, workers))
        return started[-1]

    yield make
    for s in started:
        s.stop()


@pytest.fixture(params=[1, 2], ids=["single", "workers2"])
def srv(request, make_server):
    return make_server(workers=request.param)


@pytest.fixture(scope="module")
def cert():
    return ServerCert()


def tls_overrides(tmp_path, cert: ServerCert, **limits) -> dict:
    cert.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    return {"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")},
            "listeners": {"smtp": {"tls": "starttls"}, "submission": {"tls": "starttls"}},
            "limits": limits}


def test_health_and_readiness(srv):
    assert get(srv.metrics_port, "/healthz") == (200, "ok\n")
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    assert get(srv.metrics_port, "/nothing")[0] == 404


def test_readyz_is_503_while_the_spool_cannot_take_a_message(srv):
    # spool_room() asks os.access(spool/tmp, W_OK) and statvfs(spool/tmp): as root a mode
    # of 0o500 changes neither, so tmp/ is taken away instead (and put back)
    tmp = srv.spool / "tmp"
    away = srv.spool / "tmp.away"
    assert tmp.is_dir()
    tmp.rename(away)
    try:
        assert get(srv.metrics_port, "/readyz") == (
            503, f"not ready: spool cannot accept mail: {tmp}: No such file or directory\n")
        assert get(srv.metrics_port, "/healthz") == (200, "ok\n")  # alive, just not ready
    finally:
        away.rename(tmp)
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    # msg/ (where a small message is written before it is linked into queue/incoming/)
    # replaced by a file: not ready, and a message gets 451 4.3.0, never a 250
    msg, msg_away = srv.spool / "msg", srv.spool / "msg.away"
    msg.rename(msg_away)
    msg.write_bytes(b"")
    try:
        assert get(srv.metrics_port, "/readyz")[0] == 503
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
            c.ehlo("client.test")
            c.mail("x@remote.test")
            c.rcpt(ALICE)
            assert c.data(b"Subject: m\r\n\r\nhello\r\n")[:2] == (451, b"4.3.0 Local error in processing, try again later")
    finally:
        msg.unlink()
        msg_away.rename(msg)
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    assert "session failed" not in srv.log()


def test_counters_follow_the_traffic(srv):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        c.sendmail("x@remote.test", [ALICE], b"Subject: m\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("x@remote.test", ["nobody@example.test"], b"Subject: m\r\n\r\nhello\r\n")
    srv.wait_for(lambda: srv.messages(ALICE))

    scrape(srv, "geosmtp_delivery_attempts_total", 1, result="sent", destination="local")
    srv.wait_for(lambda: not srv.queue_files("active"))  # counted before the entry is removed
    text = scrape(srv)
    assert value(text, "geosmtp_connections_total", listener="smtp") >= 1
    assert value(text, "geosmtp_messages_accepted_total", listener="smtp") == 1
    assert value(text, "geosmtp_messages_rejected_total", stage="RCPT", status="5.1.1") == 1
    assert value(text, "geosmtp_commands_total", verb="MAIL", reply="2xx") == 2
    assert value(text, "geosmtp_received_bytes_total") > 0
    assert value(text, "geosmtp_delivery_seconds_count") == 1
    # exported at zero, not left out
    assert value(text, "geosmtp_spool_entries", state="incoming") == 0
    assert value(text, "geosmtp_spool_entries", state="active") == 0
    assert value(text, "geosmtp_spool_oldest_age_seconds") == 0  # nothing queued any more
    assert value(text, "geosmtp_sessions_active", listener="smtp") == 0
    assert value(text, "geosmtp_auth_failures_total") == 0
    assert value(text, "geosmtp_tls_handshake_failures_total") == 0
    # and what did not happen has no sample at all
    assert sample(text, "geosmtp_rate_limited_total", limit="messages_per_hour") is None
    assert sample(text, "geosmtp_delivery_attempts_total", result="bounced", destination="local") is None
    assert all(pw not in text for pw in PASSWORDS.values())


def test_spool_gauges_count_held_mail(make_server):
    srv = make_server({"listeners": {"smtp": {"hold": True}}})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        for _ in range(3):
            c.sendmail("x@remote.test", [ALICE], b"Subject: m\r\n\r\nhello\r\n")
    text = scrape(srv)
    assert value(text, "geosmtp_spool_entries", state="hold") == 3
    assert value(text, "geosmtp_spool_entries", state="incoming") == 0
    assert value(text, "geosmtp_spool_oldest_age_seconds") > 0  # the first one's age


def starttls(port: int, ctx: ssl.SSLContext, source: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0))
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    return s


@MODES
def test_tls_versions_and_failed_handshakes_are_counted(make_server, tmp_path, cert, workers):
    srv = make_server(tls_overrides(tmp_path, cert), workers)
    before = scrape(srv)
    assert sample(before, "geosmtp_tls_sessions_total", version="TLSv1.2") is None
    assert sample(before, "geosmtp_tls_sessions_total", version="TLSv1.3") is None
    for maximum, version in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (None, "TLSv1.3")):
        with starttls(srv.port, client_context(cert.ca, maximum=maximum), "127.0.0.21") as s:
            assert s.sock.version() == version
            assert s.noop()[0] == 250
    # a client that says STARTTLS and then sends no handshake
    with connect(srv.port, source="127.0.0.21") as c:
        assert c.code("STARTTLS") == "220 2.0.0"
        c.send(b"EHLO not-tls\r\n")
        assert c.closed()
    text = scrape(srv, "geosmtp_tls_handshake_failures_total", 1)
    assert value(text, "geosmtp_tls_sessions_total", version="TLSv1.2") == 1
    assert value(text, "geosmtp_tls_sessions_total", version="TLSv1.3") == 1


@MODES
def test_auth_failures_over_tls_are_counted(make_server, tmp_path, cert, workers):
    srv = make_server(tls_overrides(tmp_path, cert, auth_failures_per_hour_per_ip=1), workers)
    assert value(scrape(srv), "geosmtp_auth_failures_total") == 0
    wrong = base64.b64encode(f"\0{ALICE}\0not-the-password".encode()).decode()
    right = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    with starttls(srv.submission_port, client_context(cert.ca), "127.0.0.22") as s:
        code_, msg = s.docmd("AUTH", f"PLAIN {wrong}")
        assert (code_, msg.split()[0]) == (replies.AUTH_FAILED.code, replies.AUTH_FAILED.enhanced.encode())
        assert value(scrape(srv), "geosmtp_auth_failures_total") == 1
        # one failure per hour from this address: the next attempt is the rate limit's
        code_, msg = s.docmd("AUTH", f"PLAIN {right}")
        assert (code_, msg.split()[0]) == (replies.AUTH_TOO_MANY_FAILURES.code,
                                           replies.AUTH_TOO_MANY_FAILURES.enhanced.encode())
    text = scrape(srv, "geosmtp_rate_limited_total", 1, limit="auth_failures_per_hour")
    assert value(text, "geosmtp_auth_failures_total") == 1  # the refused attempt was never checked
    assert value(text, "geosmtp_tls_sessions_total", version="TLSv1.3") == 1


@MODES
def test_rate_limit_hits_are_counted(make_server, workers):
    srv = make_server({"limits": {"messages_per_hour_per_ip": 1}}, workers)
    with connect(srv.port, source="127.0.0.23") as c:  # one session: one process's limiter
        queue_id(send_message(c, "x@remote.test", [ALICE], b"Subject: one\r\n\r\nx"))
        expect(c.cmd("MAIL FROM:<x@remote.test>"), replies.RATE_LIMITED)
        expect(c.cmd("MAIL FROM:<>"), replies.RATE_LIMITED)
        assert c.code("QUIT") == "221 2.0.0"
    text = scrape(srv, "geosmtp_rate_limited_total", 2, limit="messages_per_hour")
    assert value(text, "geosmtp_messages_rejected_total", stage="MAIL", status="4.7.1") == 2
    assert value(text, "geosmtp_messages_accepted_total", listener="smtp") == 1


def test_refused_connections_are_counted(make_server):
    # one process: with workers each would count its own connections per address
    srv = make_server({"limits": {"max_connections_per_ip": 1}})
    with connect(srv.port, source="127.0.0.24") as first:
        for _ in range(2):
            with RawClient(srv.port, timeout=10, source="127.0.0.24") as c:
                expect(c.reply(), replies.TOO_MANY_FROM_YOU)
                assert c.closed()
        with connect(srv.port, source="127.0.0.25") as other:  # another address is let in
            assert other.code("QUIT") == "221 2.0.0"
        assert first.code("QUIT") == "221 2.0.0"
    text = scrape(srv)
    assert value(text, "geosmtp_connections_refused_total", listener="smtp", reason="max_connections_per_ip") == 2
    assert sample(text, "geosmtp_connections_refused_total", listener="smtp", reason="max_connections") is None
