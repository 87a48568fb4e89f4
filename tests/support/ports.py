"""Port numbers for the servers a test starts.

Binding port 0 and closing the socket leaves a window before the server binds the number:
with tests running in parallel, a client socket elsewhere may take it as its ephemeral
source port, or another pytest-xdist worker may pick it too. So ports come from below the
kernel's ephemeral range (32768 and up by default), and each worker has its own slice."""
from __future__ import annotations

import os
import random
import socket

BASE, SLICE, SLICES = 20000, 2000, 6  # 20000-31999
# Two test runs side by side (two checkouts) each need their own range:
# GEOSMTP_TEST_PORTS="BASE:SLICE" moves this run's six slices (say "2000:500": 2000-4999).
if os.environ.get("GEOSMTP_TEST_PORTS"):
    BASE, SLICE = (int(x) for x in os.environ["GEOSMTP_TEST_PORTS"].split(":"))
_handed_out: set[int] = set()


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) % SLICES if worker.isdigit() else 0
    return range(BASE + index * SLICE, BASE + (index + 1) * SLICE)


def free_port(hosts: tuple[str, ...] | list[str] = ("127.0.0.1",)) -> int:
    """A TCP port of this worker's slice, free on every one of `hosts` now and never handed
    out before by this process (until the slice runs out)."""
    for _ in range(2):
        ports = [p for p in _slice() if p not in _handed_out]
        random.shuffle(ports)
        for port in ports:
            if all(_bindable(host, port) for host in hosts):
                _handed_out.add(port)
                return port
        _handed_out.clear()
    raise RuntimeError(f"no free port on {list(hosts)}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
