"""A real HAProxy (Debian's package) in front of geosmtp nodes, as conf/deploy/haproxy.cfg
puts it: TCP mode, PROXY protocol v2 to each node. Started by the test with a config under
`root`, a frontend on a loopback port of its own and an admin stats socket; never the system
service.

    balancer = HAProxy(tmp_path, [node1.port, node2.port]).start()   # round robin
    RawClient(balancer.port, source="127.0.0.3")   # node1, then node2, then node1...

`LOCAL_HEADER` is a PROXY v2 LOCAL header (a balancer's own health check): what a test's
start-up probe sends first to a listener with proxy_protocol (ServerProcess.probe_prefix).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from proxyprotocol.result import ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from tests.support.server import free_port

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin")
LOCAL_HEADER = ProxyProtocolV2().pack(ProxyResultLocal())


def stats_command(stats: str, command: str) -> str | None:
    """A command's answer on HAProxy's stats socket, or None if it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(stats)
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
    except OSError:
        return None
    return out.decode()


def server_state(stats: str, backend: str = "geo") -> int | None:
    """srv_op_state of the first server of `backend` (0 down, 2 up)."""
    out = stats_command(stats, f"show servers state {backend}")
    if out is None:
        return None
    lines = [line.split() for line in out.splitlines() if line.strip()]
    names = next((line[1:] for line in lines if line[0] == "#"), None)
    rows = [line for line in lines if line[0] != "#" and len(line) > 5]
    if not names or not rows:
        return None
    return int(rows[0][names.index("srv_op_state")])


class HAProxy:
    """Round robin over `ports` on 127.0.0.1, send-proxy-v2, no health checks (the nodes are
    up for the whole test)."""

    def __init__(self, root: Path, ports: list[int]):
        assert HAPROXY is not None, "HAProxy is not installed (.ci/run installs Debian's haproxy)"
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = ports
        self.port = free_port()
        self.stats = str(self.root / "haproxy.sock")
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        servers = "\n".join(f"    server node{n} 127.0.0.1:{port} send-proxy-v2" for n, port in enumerate(self.ports))
        return f"""# written by tests/support/haproxy.py for one test
global
    stats socket {self.stats} level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{self.port}
    default_backend geo
backend geo
    balance roundrobin
{servers}
"""

    def start(self, timeout: float = 10.0) -> "HAProxy":
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(self.config())
        self.proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.proc.stderr.read().decode()}")
            if stats_command(self.stats, "show info"):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"haproxy did not start within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
