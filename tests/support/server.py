"""Run a real geosmtp server process on loopback for end-to-end tests."""
from __future__ import annotations

import copy
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ports, toml

DOMAIN = "example.test"


def free_port(host: str = "127.0.0.1") -> int:
    return ports.free_port((host,))


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, tables merged key by key; None removes a key (TOML has no null)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PASSWORDS = {f"alice@{DOMAIN}": "alice-secret-1", f"bob@{DOMAIN}": "bob-secret-2"}


@functools.cache
def users_file_text() -> str:
    from geosmtp.auth import hash_password

    return "".join(f"{user}:{hash_password(pw, ln=10)}\n" for user, pw in PASSWORDS.items())


def base_config(root: Path, port: int, submission_port: int) -> dict:
    return {
        "auth": {"users_file": str(root / "users")},
        "server": {"hostname": "mx.example.test", "spool_dir": str(root / "spool")},
        "listener": [
            {"name": "smtp", "address": f"127.0.0.1:{port}", "mode": "smtp"},
            {"name": "submission", "address": f"127.0.0.1:{submission_port}", "mode": "submission"},
        ],
        "limits": {"command_timeout": 10, "data_timeout": 10},
        "local": {
            "domains": [DOMAIN, "other.test"],
            "maildir_root": str(root / "mail"),
            "users": [f"alice@{DOMAIN}", f"bob@{DOMAIN}", "carol@other.test", f"postmaster@{DOMAIN}"],
            "aliases": {f"team@{DOMAIN}": [f"alice@{DOMAIN}", f"bob@{DOMAIN}"],
                        f"fwd@{DOMAIN}": ["someone@remote.test"]},
        },
        # a DNS server nobody answers on: no test ever asks the machine's resolver
        "relay": {"trusted_networks": ["127.0.0.2/32"], "dns_servers": ["127.0.0.1:9"], "dns_timeout": 2},
        "queue": {"scan_interval": 1},
        "log": {"level": "DEBUG"},
    }


class ServerProcess:
    """`geosmtp start` in a subprocess with a config written for this test."""

    def __init__(self, root: Path, overrides: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.submission_port = free_port()
        overrides = dict(overrides or {})
        per_listener = overrides.pop("listeners", {})  # {"smtp": {"hold": True}}: extra fields
        self.config = merge(base_config(self.root, self.port, self.submission_port), overrides)
        for item in self.config["listener"]:
            item.update(per_listener.get(item["name"], {}))
        (self.root / "users").write_text(users_file_text())
        (self.root / "users").chmod(0o600)
        self.config_path = self.root / "geosmtp.toml"
        self.config_path.write_text(toml.dumps(self.config))
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.python = sys.executable  # the interpreter, and its environment (None: ours)
        self.env: dict | None = None
        # sent first by start()'s probe: a PROXY LOCAL header for a listener behind a balancer
        self.probe_prefix = b""

    @property
    def spool(self) -> Path:
        return Path(self.config["server"]["spool_dir"])

    @property
    def maildir_root(self) -> Path:
        return Path(self.config["local"]["maildir_root"])

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.maildir_root / domain / local

    def messages(self, address: str) -> list[bytes]:
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def launch(self) -> subprocess.Popen:
        """Start the process and return at once (start() also waits for its greeting)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "geosmtp", "start", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=self.env,
        )
        log.close()
        return self.proc

    def start(self, timeout: float = 15.0) -> "ServerProcess":
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(self.probe_prefix)
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def kill_all(self) -> None:
        """SIGKILL the master and its workers at once, as a power cut or the OOM killer of
        a cgroup would: a worker the master starts meanwhile dies with it (PDEATHSIG)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for pid in children(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.kill()

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.05):
        """Poll until predicate() is truthy (bounded); returns its value or raises."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"condition not met within {timeout}s")

    def spooled(self, qid: str) -> bytes:
        """The message as stored in msg/<id>, without the envelope line in front of it."""
        path = self.spool / "msg" / qid
        if not path.exists():
            return b""
        return path.read_bytes().partition(b"\n")[2]

    def queue_files(self, state: str) -> list[str]:
        d = self.spool / "queue" / state
        return sorted(os.listdir(d)) if d.is_dir() else []


def children(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (a master's workers)."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    data = fh.read()
            except OSError:
                continue
            state, ppid = data[data.rindex(")") + 2:].split()[:2]
            if int(ppid) == pid and state not in ("Z", "X"):
                out.add(int(name))
    return out


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: its parent is gone and nobody reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2:].split()[0] not in ("Z", "X")
