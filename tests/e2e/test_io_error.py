"""An I/O error in a group commit's flush: every message of that batch gets 451 4.3.0.

The server runs with a small LD_PRELOAD shim (tests/support/failing_flush.c, built here
with gcc) whose syncfs(), fsync() and fdatasync() do the real flush and then report EIO
while a flag file exists, as Linux does when the writeback of a file failed. Both flush
methods ([server] spool_flush) are tried. Many clients send at
once, so their commits share flushes; none may get 250, nothing may stay in the spool, and
once the "disk" is healthy again mail flows as before.
"""
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.server import ServerProcess
from tests.support.smtp import RawClient

SHIM = Path(__file__).parent.parent / "support" / "failing_flush.c"
CLIENTS = 12


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the flush fault shim (Debian: apt-get install gcc)"
    out = tmp_path_factory.mktemp("shim") / "failing_flush.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM), "-ldl"], check=True)
    return out


def transaction(port: int, n: int) -> tuple[int, str]:
    with RawClient(port) as c:
        c.reply()
        assert c.code("EHLO client.test").startswith("250")
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        assert c.code("DATA").startswith("354")
        c.send(b"Subject: batch %d\r\n\r\n" % n + b"x" * 900 + b"\r\n.\r\n")
        code, lines = c.reply()
        assert c.code("NOOP") == "250 2.0.0"  # the session goes on
        return code, lines[0].split()[0]


def in_parallel(port: int, clients: int) -> list[tuple[int, str]]:
    results: list = [None] * clients
    barrier = threading.Barrier(clients)

    def one(i):
        barrier.wait(timeout=10)
        results[i] = transaction(port, i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("method, workers", [("syncfs", 1), ("syncfs", 2), ("fsync", 1), ("fsync", 2)])
def test_a_failed_flush_fails_its_whole_batch_with_451(tmp_path, shim, method, workers):
    flag = tmp_path / "disk-broken"
    srv = ServerProcess(tmp_path / "srv", {"server": {"workers": workers, "spool_flush": method},
                                           "log": {"level": "INFO"}})
    srv.env = {**os.environ, "LD_PRELOAD": str(shim), "FAIL_SYNCFS_FLAG": str(flag)}
    srv.start()
    try:
        flag.touch()
        results = in_parallel(srv.port, CLIENTS)
        assert results == [(451, "4.3.0")] * CLIENTS  # none got 250
        assert f"group commit by {method}" in srv.log()
        assert srv.log().count("cannot queue message: Input/output error") == CLIENTS
        for folder in ("msg", "tmp", "queue/incoming", "queue/active", "queue/hold"):
            assert os.listdir(srv.spool / folder) == [], folder
        flag.unlink()
        results = in_parallel(srv.port, CLIENTS)
        assert [code for code, _ in results] == [250] * CLIENTS
        delivered = srv.wait_for(lambda: len(srv.messages("alice@example.test")) == CLIENTS
                                 and srv.messages("alice@example.test"), timeout=20)
        assert sorted(m.split(b"Subject: batch ")[1].split(b"\n")[0].strip() for m in delivered) == \
            sorted(b"%d" % i for i in range(CLIENTS))
    finally:
        srv.stop()
