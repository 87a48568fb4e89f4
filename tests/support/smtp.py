"""A raw-socket SMTP client for tests that need exact bytes on the wire."""
from __future__ import annotations

import socket
import time


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0, source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, [text lines])."""
        lines = []
        while True:
            line = self.line()
            if len(line) < 4:
                raise AssertionError(f"short reply line {line!r}")
            lines.append(line[4:])
            if line[3:4] == " ":
                return int(line[:3]), lines

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed; buffer {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send(line + ("\r\n" if isinstance(line, str) else b"\r\n"))
        return self.reply()

    def code(self, line: str | bytes) -> str:
        """'250 2.1.0' style: code and enhanced code of the reply to one command."""
        code, lines = self.cmd(line)
        return f"{code} {lines[-1].split(' ')[0]}"

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (bounded wait)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
