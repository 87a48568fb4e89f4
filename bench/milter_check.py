#!/usr/bin/env python3
"""What the milter check costs a message, measured on the check itself (no SMTP around it).

Against a pass-through milter written with Debian's python3-milter (libmilter underneath,
tests/support/scripted_milter.py, run by /usr/bin/python3 in its own process), over one kept
milter connection as in a session:

1. the wall time of MilterCheck's mail + rcpt + data for one message (1 KB and 100 KB):
   the whole milter conversation of a message, the milter's own time included;
2. our own overhead around it: that time minus the bare exchange of the very same packets
   (recorded from the check, written and answered by a plain loop on the same socket),
   interleaved so that drift hits both. What is left is what geosmtp adds: building the
   packets and macros, reading the header section, parsing replies, making the verdict.

    .venv/bin/python bench/milter_check.py            # 300 messages per case
    .venv/bin/python bench/milter_check.py -n 1000
"""
from __future__ import annotations

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

from geosmtp.checks import milter as mm  # noqa: E402
from geosmtp.checks.interface import CheckContext, Facts  # noqa: E402
from tests.e2e.test_check_milter import Scripted  # noqa: E402

BASE = dict(listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.7"), trusted=False,
            hostname="mx.example.test", helo="client.test", sender="a@sender.test", session="bench")


def message(size: int) -> bytes:
    head = (b"Received: from client.test ([192.0.2.7])\r\n\tby mx.example.test (geosmtp) with ESMTP id Q\r\n"
            b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: bench\r\nMessage-ID: <1@sender.test>\r\n\r\n")
    return head + (b"x" * 76 + b"\r\n") * max(1, (size - len(head)) // 78)


def one(check: mm.MilterCheck, msg: bytes, i: int) -> None:
    check.mail(Facts(phase="mail", **BASE))
    check.rcpt(Facts(phase="rcpt", recipient="b@example.test", **BASE))
    verdict = check.data(Facts(phase="data", queue_id=f"Q{i}", open_message=lambda: io.BytesIO(msg), **BASE))
    assert verdict is None, verdict


def recorded(check: mm.MilterCheck, msg: bytes) -> list[bytes]:
    """What the check writes for one message, as the writes that each wait for a reply."""
    sent: list[tuple[bytes, bool]] = []
    real = mm.Conversation.send

    def spy(self, data, reply, timeout):
        sent.append((data, reply))
        return real(self, data, reply, timeout)

    mm.Conversation.send = spy
    try:
        one(check, msg, 0)
    finally:
        mm.Conversation.send = real
    groups, current = [], []
    for data, reply in sent:
        current.append(data)
        if reply:
            groups.append(b"".join(current))
            current = []
    return groups


def bare(sock, groups: list[bytes]) -> None:
    for group in groups:
        sock.sendall(group)
        got = sock.recv(65536)
        while len(got) < 4 or len(got) < 4 + struct.unpack(">I", got[:4])[0]:
            got += sock.recv(65536)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=300, help="messages per case")
    args = parser.parse_args()
    milter = Scripted(Path(tempfile.mkdtemp()) / "milter")
    try:
        for size in (1000, 100_000):
            msg = message(size)
            check = mm.MilterCheck(mm.MilterOptions(address=milter.address).model_dump(),
                                   CheckContext(hostname="mx.example.test", dns=None))
            check.connect(Facts(phase="connect", **BASE))
            check.helo(Facts(phase="helo", **BASE))
            groups = recorded(check, msg)
            sock = check.conversations["bench"].sock
            ours, raw = [], []
            for i in range(args.n):
                started = time.perf_counter()
                one(check, msg, i)
                ours.append(time.perf_counter() - started)
                started = time.perf_counter()
                bare(sock, groups)
                raw.append(time.perf_counter() - started)
            check.end_session(Facts(phase="end", **BASE))
            med = statistics.median
            print(f"{size // 1000:>3} KB, {len(groups)} round trips: check {med(ours) * 1000:.3f} ms a message "
                  f"(p90 {sorted(ours)[int(len(ours) * 0.9)] * 1000:.3f}), bare exchange {med(raw) * 1000:.3f} ms, "
                  f"our overhead {(med(ours) - med(raw)) * 1000:.3f} ms")
    finally:
        milter.stop()


if __name__ == "__main__":
    main()
