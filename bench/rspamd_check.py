#!/usr/bin/env python3
"""What the rspamd check costs a message, measured on the check itself (no SMTP around it).

1. Against a REAL rspamd (Debian's package, started here as the e2e tests start it:
   tests/support/rspamd.py, DNS through a fake server on loopback): the wall time of
   RSpamdCheck.data() for a 1 KB and a 100 KB message, stored as the spool stores them.
2. Against the fake rspamd of the unit tests (tests/support/fakerspamd.py, kept
   connections): our own overhead around the call, that is check.data() minus the bare
   HTTP exchange of the same request (http.client on a kept connection, the same headers
   and body, the reply read and json.loads'ed) against the same server, interleaved so
   drift hits both. What is left is what geosmtp adds: building the request headers,
   the pool, sizing and streaming the file, checking the reply, making the verdict.

    .venv/bin/python bench/rspamd_check.py                 # 200 messages per case
    .venv/bin/python bench/rspamd_check.py -n 1000 --json /tmp/rspamd.json
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO]

from geosmtp.checks import registry  # noqa: E402
from geosmtp.checks.interface import CheckContext, Facts  # noqa: E402
from geosmtp.checks.rspamd import request_headers  # noqa: E402
from tests.support.fakedns import FakeDNS  # noqa: E402
from tests.support.fakerspamd import FakeRspamd  # noqa: E402
from tests.support.rspamd import Rspamd  # noqa: E402

CLIENT, NAME = "192.0.2.10", "mail.sender.test"


def message(size: int) -> bytes:
    head = (f"Received: from {NAME} ({NAME} [{CLIENT}])\r\n\tby mx.example.test with ESMTP id Q1;"
            " Wed, 02 Dec 2026 03:00:00 +0000\r\nFrom: Bob <bob@sender.test>\r\nTo: alice@example.test\r\n"
            "Subject: lunch\r\nDate: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <b@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"Hello Alice, lunch tomorrow at noon? The usual place, if that suits you.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def stored_facts(directory: Path, size: int) -> Facts:
    path = directory / f"msg-{size}"
    body = message(size)
    path.write_bytes(b'{"id": "Q1"}\n' + body)

    def open_message():
        fh = open(path, "rb")
        fh.readline()
        return fh
    return Facts(phase="data", listener="mx", mode="smtp", ip=ipaddress.ip_address(CLIENT), trusted=False,
                 hostname="mx.example.test", ptr=NAME, helo=NAME, sender="bob@sender.test",
                 recipients=("alice@example.test",), queue_id="Q1", message_path=str(path), size=len(body),
                 open_message=open_message)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(len(ms) * 0.9)], 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


def real(n: int, work: Path) -> dict:
    dns = FakeDNS().start()
    dns.ptr(CLIENT, NAME)
    dns.a(NAME, CLIENT)
    dns.a("sender.test", CLIENT)
    rspamd = Rspamd(work / "rspamd", dns.address)
    t = time.monotonic()
    rspamd.start()
    started = time.monotonic() - t
    try:
        check = registry.make("rspamd", None, {"url": rspamd.url, "ping_on_start": False},
                              CheckContext("mx.example.test", None))
        out = {"rspamd_start_s": round(started, 1)}
        for size in (1024, 100 * 1024):
            facts = stored_facts(work, size)
            verdict = check.data(facts)  # warm: rspamd's first task of a kind is slower
            out[f"{size // 1024}KB"] = {**summary(timed(lambda: check.data(facts), n)),
                                        "action": verdict.results["rspamd"]["action"]}
        return out
    finally:
        rspamd.stop()
        dns.stop()


def overhead(n: int, work: Path) -> dict:
    srv = FakeRspamd().start()
    try:
        check = registry.make("rspamd", None, {"url": srv.url, "ping_on_start": False},
                              CheckContext("mx.example.test", None))
        out = {}
        for size in (1024, 100 * 1024):
            facts = stored_facts(work, size)
            headers = request_headers(facts)
            conn = http.client.HTTPConnection("127.0.0.1", srv.port)

            def bare():
                with facts.open_message() as fh:
                    body = fh.read()
                conn.putrequest("POST", "/checkv2", skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                json.loads(conn.getresponse().read())

            ours, theirs = [], []
            for _ in range(10):
                check.data(facts)
                bare()
            for _ in range(n):
                ours += timed(lambda: check.data(facts), 1)
                theirs += timed(bare, 1)
            conn.close()
            out[f"{size // 1024}KB"] = {"check": summary(ours), "bare_http": summary(theirs),
                                        "overhead_median_ms": round((statistics.median(ours)
                                                                     - statistics.median(theirs)) * 1000, 3)}
        out["connections"] = srv.connections
        return out
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="messages per case")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rspamd-bench-") as tmp:
        work = Path(tmp)
        result = {"fake_rspamd_overhead": overhead(args.n, work), "real_rspamd": real(args.n, work)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
