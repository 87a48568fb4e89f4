"""A full disk answers 452 4.3.1, never 250, leaves nothing behind, and recovers by itself.

The spool lives on a small tmpfs that the test fills up: a real ENOSPC from the kernel.
Each refusal is one log record; nothing raw (a threadpool traceback) reaches the output.
"""
import os
import re
import smtplib
import subprocess

import pytest

from tests.support.server import ServerProcess
from tests.support.smtp import RawClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path):
    """Write until the filesystem refuses with ENOSPC."""
    with open(path, "wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        for _ in range(10_000):
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
                break
        for _ in range(100):
            try:
                fh.write(b"\0" * 512)
            except OSError:
                break


def send(port, body):
    with RawClient(port) as c:
        c.reply()
        assert c.code("EHLO client.test").startswith("250")
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        assert c.code("DATA").startswith("354")
        c.send(body + b".\r\n")
        result = c.reply()
        assert c.code("NOOP") == "250 2.0.0"  # the session goes on
        return result


def test_full_disk_gives_452_and_recovers(small_disk, tmp_path):
    srv = ServerProcess(tmp_path / "srv", {"server": {"spool_dir": str(small_disk / "spool")}}).start()
    try:
        filler = small_disk / "filler"
        fill(filler)
        small = b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400  # spills to disk while arriving
        for body in (small, big):
            code, lines = send(srv.port, body)
            assert (code, lines[0].split()[0]) == (452, "4.3.1")
        spool = small_disk / "spool"
        assert os.listdir(spool / "tmp") == []
        assert os.listdir(spool / "msg") == []
        assert os.listdir(spool / "queue" / "incoming") == []
        filler.unlink()
        code, lines = send(srv.port, small)
        assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as")
        msgs = srv.wait_for(lambda: srv.messages("alice@example.test"))
        assert b"Subject: small" in msgs[0]
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
            c.sendmail("a@remote.test", ["bob@example.test"], big)
    finally:
        srv.stop()
    assert_one_record_per_line(srv.log(), refusals=2)


RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [A-Z]+ +\d+ \[[^\]]+\] ")


def assert_one_record_per_line(log, refusals):
    """Every line of the server's stdout and stderr is a log record of its own."""
    raw = [line for line in log.splitlines() if not RECORD.match(line)]
    assert raw == [], "\n".join(raw[:20])
    assert "Traceback" not in log
    refused = [line for line in log.splitlines() if "cannot queue message" in line]
    assert len(refused) == refusals, refused
    assert all("No space left on device" in line for line in refused), refused
