"""Policy delegation servers for tests: a scriptable fake, and a bridge that serves a
stdin/stdout policy program (policyd-spf, as spawn(8) runs it) on a TCP port.

    srv = FakePolicyServer(lambda req: "action=DUNNO").start()
    ... PolicyCheck({"address": srv.address}, ...) ...
    srv.requests    # every request, as a dict (and .raw: the bytes as they came)

`answer(request)` returns the reply's action line(s) without the empty line ("action=OK"),
or raw bytes sent as they are, or SILENT (read on, answer nothing), or CLOSE (close the
connection without a reply).
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.support.server import free_port

SILENT = object()
CLOSE = object()


def parse_request(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode("utf-8", "replace").split("\n"):
        name, eq, value = line.partition("=")
        if eq:
            out.setdefault(name, value)
    return out


class FakePolicyServer:
    def __init__(self, answer=lambda request: "action=DUNNO", unix_path: Path | None = None):
        self.answer = answer
        self.unix_path = unix_path
        self.requests: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self.connections = 0
        self.peak = 0  # most connections open at once
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"127.0.0.1:{self.port}"

    def start(self) -> "FakePolicyServer":
        if self.unix_path:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(self.unix_path))
        else:
            self.port = free_port()
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self.drop_connections()

    def drop_connections(self) -> None:
        """Close every connection from the server's side (a restarted policy server)."""
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
                self._open.append(conn)
                self.peak = max(self.peak, len(self._open))
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\n\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                raw, _, buf = buf.partition(b"\n\n")
                request = parse_request(raw)
                with self._lock:
                    self.raw.append(raw + b"\n\n")
                    self.requests.append(request)
                reply = self.answer(request)
                if reply is CLOSE:
                    return
                if reply is SILENT:
                    continue
                conn.sendall(reply if isinstance(reply, bytes) else (reply + "\n\n").encode())
        except OSError:
            return
        finally:
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)
            conn.close()


class StdioBridge:
    """A TCP listener on loopback that runs `argv` once per connection and joins the
    connection to the program's stdin and stdout, as Postfix's spawn(8) does."""

    def __init__(self, argv: list[str], cwd: Path, env: dict | None = None):
        self.argv, self.env, self.cwd = argv, env, cwd
        self.stderr_path = Path(cwd) / "stderr.log"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self._stop = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "StdioBridge":
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout):
                if pipe:
                    pipe.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with open(self.stderr_path, "ab") as err:  # the program's complaints, for a failing test
                proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err, env=self.env, cwd=self.cwd)
            self.procs.append(proc)
            threading.Thread(target=self._to_program, args=(conn, proc), daemon=True).start()
            threading.Thread(target=self._from_program, args=(conn, proc), daemon=True).start()

    @staticmethod
    def _to_program(conn: socket.socket, proc: subprocess.Popen) -> None:
        conn.settimeout(60)
        try:
            while data := conn.recv(65536):
                proc.stdin.write(data)
                proc.stdin.flush()
        except (OSError, ValueError):
            pass
        try:
            proc.stdin.close()
        except OSError:
            pass

    @staticmethod
    def _from_program(conn: socket.socket, proc: subprocess.Popen) -> None:
        try:
            while data := proc.stdout.read1(65536):
                conn.sendall(data)
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        conn.close()
