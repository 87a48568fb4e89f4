"""A real redis-server (Debian's package) for tests, started by the test as its own process:
a loopback port from tests/support/ports.py, its configuration, dump and log under `root`, no
persistence (a restart starts empty, as a Redis without a disk would), never the system
service.

    redis = RedisServer(tmp_path).start()   # RedisFailed says why it could not start
    redis.url                               # "redis://127.0.0.1:PORT/0"
    redis.kill(); redis.start()             # SIGKILL, then the same port again

`sentinel()` starts a Redis Sentinel (redis-server --sentinel) watching this server as
master "geosmtp".
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.server import free_port

START_TIMEOUT = 10.0


class RedisFailed(Exception):
    """redis-server could not be started; the message says why (with the end of its log)."""


def binary() -> str:
    found = shutil.which("redis-server", path="/usr/bin:/usr/local/bin:/usr/sbin")
    if found is None:
        raise RedisFailed("redis-server is not installed (Debian package \"redis-server\"; .ci/run installs it)")
    return found


def ping(port: int, timeout: float = 1.0) -> bytes:
    """The raw answer to PING on 127.0.0.1:port (b"" when nothing answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64)
    except OSError:
        return b""


class RedisServer:
    def __init__(self, root: Path, password: str | None = None, extra: str = ""):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self._sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def config(self) -> str:
        lines = [
            "# written by tests/support/redis.py for one test",
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes",
            f"dir {self.root}", f"logfile {self.log_path}", 'save ""', "appendonly no",
            "daemonize no", f"pidfile {self.root / 'redis.pid'}",
            "enable-debug-command local",  # DEBUG SLEEP: a Redis that is slow for a while
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n" + self.extra

    def start(self) -> "RedisServer":
        conf = self.root / "redis.conf"
        conf.write_text(self.config())
        self.proc = subprocess.Popen([binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_up(self.proc, self.port, self.log_path)
        return self

    @staticmethod
    def _wait_up(proc: subprocess.Popen, port: int, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RedisFailed(f"redis-server exited with {proc.returncode}: {err}{tail}")
            answer = ping(port)
            if answer.startswith((b"+PONG", b"-NOAUTH")):
                return
            time.sleep(0.05)
        proc.kill()
        proc.wait(5)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RedisFailed(f"redis-server did not answer on port {port} within {START_TIMEOUT:g}s: {tail}")

    def stall(self, seconds: float) -> socket.socket:
        """Make the server busy for `seconds` (DEBUG SLEEP), from now; close what it returns after."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=seconds + 5)
        sock.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        return sock

    def kill(self) -> None:
        """SIGKILL, as a crash would; everything it held is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        for proc in [*self._sentinels, self.proc]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def sentinel(self, master: str = "geosmtp") -> int:
        """Start a Sentinel watching this server as `master`; its port, once it knows the master."""
        port = free_port()
        conf = self.root / f"sentinel-{port}.conf"
        auth = f"sentinel auth-pass {master} {self.password}\n" if self.password else ""
        conf.write_text(f"bind 127.0.0.1\nport {port}\ndir {self.root}\nlogfile {self.root}/sentinel-{port}.log\n"
                        f"sentinel monitor {master} 127.0.0.1 {self.port} 1\n{auth}")
        proc = subprocess.Popen([binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        self._sentinels.append(proc)
        self._wait_up(proc, port, self.root / f"sentinel-{port}.log")
        return port

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
