"""End to end: /metrics, /healthz and /readyz on [metrics] address, in one process and with
workers; the counters move with real SMTP traffic."""
from __future__ import annotations

import re
import smtplib
import urllib.error
import urllib.request

import pytest

from tests.support.server import PASSWORDS, ServerProcess, free_port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def value(text: str, name: str, **labels) -> float:
    """One sample's value from the exposition text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))).strip(",") == want:
            return float(m.group(3))
    return 0.0


@pytest.fixture(params=[1, 2], ids=["single", "workers2"])
def srv(request, tmp_path):
    mport = free_port()
    s = ServerProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"},
                                 "server": {"workers": request.param}})
    s.metrics_port = mport
    s.start()
    if request.param > 1:  # both workers listening before we count
        s.wait_for(lambda: s.log().count("listening on 127.0.0.1") >= 4, timeout=15)
    yield s
    s.stop()


def test_health_and_readiness(srv):
    assert get(srv.metrics_port, "/healthz") == (200, "ok\n")
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    assert get(srv.metrics_port, "/nothing")[0] == 404


def test_counters_follow_the_traffic(srv):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice@example.test"], b"Subject: m\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("x@remote.test", ["nobody@example.test"], b"Subject: m\r\n\r\nhello\r\n")
    srv.wait_for(lambda: srv.messages("alice@example.test"))

    def scraped():
        _, text = get(srv.metrics_port, "/metrics")
        if value(text, "geosmtp_delivery_attempts_total", result="sent", destination="local") >= 1:
            return text
        return None

    text = srv.wait_for(scraped)
    assert value(text, "geosmtp_connections_total", listener="smtp") >= 1
    assert value(text, "geosmtp_messages_accepted_total", listener="smtp") == 1
    assert value(text, "geosmtp_messages_rejected_total", stage="RCPT", status="5.1.1") == 1
    assert value(text, "geosmtp_commands_total", verb="MAIL", reply="2xx") == 2
    assert value(text, "geosmtp_received_bytes_total") > 0
    assert value(text, "geosmtp_delivery_seconds_count") == 1
    assert value(text, "geosmtp_spool_entries", state="incoming") == 0
    assert "geosmtp_spool_oldest_age_seconds" in text
    assert value(text, "geosmtp_sessions_active", listener="smtp") == 0
    assert all(pw not in text for pw in PASSWORDS.values())


def test_spool_gauges_count_held_mail(tmp_path):
    mport = free_port()
    srv = ServerProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"},
                                   "listeners": {"smtp": {"hold": True}}}).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
            for _ in range(3):
                c.sendmail("x@remote.test", ["alice@example.test"], b"Subject: m\r\n\r\nhello\r\n")
        _, text = get(mport, "/metrics")
        assert value(text, "geosmtp_spool_entries", state="hold") == 3
        assert value(text, "geosmtp_spool_oldest_age_seconds") >= 0
    finally:
        srv.stop()
