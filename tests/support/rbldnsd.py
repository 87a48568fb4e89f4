"""A real DNSBL server for tests: Debian's rbldnsd (apt-get install rbldnsd) on a loopback
UDP port, serving zone files the test writes (ip4trie / ip6trie datasets: one CIDR a line,
optionally ":A-value:TXT" after it; see rbldnsd(8)).

    with Rbldnsd("bl.test", v4=["192.0.2.60", "192.0.2.61 :127.255.255.254:refused"],
                 v6=["2001:db8:60::/48 :127.0.0.4:listed"]) as rbl:
        ... [relay] dns_servers = [rbl.address] ...
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.support.ports import free_port

BINARY = "rbldnsd"


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Rbldnsd:
    def __init__(self, zone: str, v4: list[str] = (), v6: list[str] = ()):
        self.zone = zone
        self.v4, self.v6 = list(v4), list(v6)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Rbldnsd":
        binary = shutil.which(BINARY) or shutil.which(f"/usr/sbin/{BINARY}")
        if binary is None:
            raise RuntimeError("rbldnsd is not installed (Debian package rbldnsd: apt-get install rbldnsd)")
        # its own directory, readable by the unprivileged user rbldnsd drops to (pytest's
        # tmp_path sits under a 0700 directory)
        self.dir = Path(tempfile.mkdtemp(prefix="geosmtp-rbldnsd-"))
        self.dir.chmod(0o755)
        (self.dir / "v4").write_text("".join(f"{line}\n" for line in self.v4))
        (self.dir / "v6").write_text("".join(f"{line}\n" for line in self.v6))
        for name in ("v4", "v6"):
            (self.dir / name).chmod(0o644)
        self.port = next(p for p in (free_port() for _ in range(50)) if _udp_free(p))
        user = ["-u", "rbldns"] if os.geteuid() == 0 else []  # it refuses to run as root
        with open(self.dir / "log", "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "-n", *user, "-b", f"127.0.0.1/{self.port}", "-w", str(self.dir),
                 f"{self.zone}:ip4trie:v4", f"{self.zone}:ip6trie:v6"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = (self.dir / "log").read_text(errors="replace")
                raise RuntimeError(f"rbldnsd exited with {self.proc.returncode}: {out}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("rbldnsd did not answer")

    def _answers(self) -> bool:
        q = dns.message.make_query(f"2.0.0.127.{self.zone}", "A")
        try:
            dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Rbldnsd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
