"""/readyz over HTTP against a real server: "no space for a message of max size" (200, the
node still takes the messages that fit, 452 4.3.1 to the others) is told apart from "cannot
accept mail" (503: a disk full in practice, or spool directories it cannot write).

The spool lives on a small tmpfs filled by the test (real statvfs numbers, a real ENOSPC),
and a read-only bind mount takes msg/ away (the tests run as root, whom modes never stop).
"""
import os
import smtplib
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import ServerProcess, free_port

MAX_SIZE = 2 * 1024 * 1024
MiB = 1024 * 1024


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def gauges(port):
    status, text = get(port, "/metrics")
    assert status == 200
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in ("geosmtp_spool_writable", "geosmtp_spool_free_bytes")}


def free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def srv(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    mport = free_port()
    s = ServerProcess(tmp_path / "srv", {"server": {"spool_dir": str(disk / "spool")},
                                         "limits": {"max_message_size": MAX_SIZE},
                                         "metrics": {"address": f"127.0.0.1:{mport}"}})
    s.metrics_port, s.disk = mport, disk
    s.start()
    yield s
    s.stop()
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_to(path, left):
    """Grow the file at `path` until `left` octets (or less, to a page) stay free."""
    with open(path, "ab", buffering=0) as fh:
        for _ in range(1000):
            room = free(path) - left
            if room <= 0:
                return
            try:
                fh.write(b"\0" * min(room, MiB))
            except OSError as exc:
                assert exc.errno == 28
                return


def data_reply(port, body):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@remote.test")
        c.rcpt("alice@example.test")
        reply = c.data(body)
        assert c.noop()[0] == 250  # the session goes on
        return reply


def test_low_space_keeps_serving_and_a_full_disk_takes_the_node_out(srv):
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    filler = srv.disk / "filler"
    fill_to(filler, MiB)
    left = free(srv.disk)
    assert MiB // 2 < left <= MiB
    status, body = get(srv.metrics_port, "/readyz")
    assert (status, body) == (200, f"ready, but no space for a message of max size ({left} octets free, "
                                   f"max_message_size {MAX_SIZE}): larger messages get 452 4.3.1\n")
    assert gauges(srv.metrics_port) == {"geosmtp_spool_writable": 1.0, "geosmtp_spool_free_bytes": float(left)}
    small = b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500  # 1.5 MB: more than is left
    assert data_reply(srv.port, small)[0] == 250
    assert data_reply(srv.port, big)[:2] == (452, b"4.3.1 Insufficient system storage, try again later")
    srv.wait_for(lambda: srv.messages("alice@example.test") and "removed" in srv.log())  # the spool is idle
    fill_to(filler, 0)
    status, body = get(srv.metrics_port, "/readyz")
    assert (status, body) == (503, f"not ready: spool cannot accept mail: disk full ({free(srv.disk)} octets free)\n")
    assert get(srv.metrics_port, "/healthz") == (200, "ok\n")  # alive, just not ready
    filler.unlink()
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")


def test_a_spool_directory_it_cannot_write_takes_the_node_out(srv):
    msg = srv.spool / "msg"
    subprocess.run(["mount", "--bind", str(msg), str(msg)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(msg)], check=True)
        assert get(srv.metrics_port, "/readyz") == (
            503, f"not ready: spool cannot accept mail: {msg} is not a writable directory\n")
        assert gauges(srv.metrics_port) == {"geosmtp_spool_writable": 0.0,
                                            "geosmtp_spool_free_bytes": float(free(srv.disk))}
    finally:
        subprocess.run(["umount", "-l", str(msg)], check=False)
    assert get(srv.metrics_port, "/readyz") == (200, "ready\n")
    assert gauges(srv.metrics_port)["geosmtp_spool_writable"] == 1.0
