"""A milter that misbehaves on purpose, for the fault tests: it negotiates like a real one
(or not), then at its first step (or the one named) hangs, resets the connection, answers garbage, answers too
late or announces a 100 MB reply. Plain threads and sockets; every wait is bounded.

    bad = FakeMilter("hang").start()      # bad.port; bad.stop()
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from tests.support.server import free_port

BEHAVIOURS = ("hang", "reset", "garbage", "late", "huge", "pass")


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def _read_packet(conn: socket.socket) -> tuple[bytes, bytes] | None:
    def exactly(n):
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    head = exactly(4)
    if head is None:
        return None
    data = exactly(struct.unpack(">I", head)[0])
    return None if data is None else (data[:1], data[1:])


class FakeMilter:
    def __init__(self, behaviour: str, late_by: float = 3.0, garbage_at_optneg: bool = False,
                 at: bytes | None = None):
        assert behaviour in BEHAVIOURS
        self.behaviour = behaviour
        self.at = at  # the step (command octet) it misbehaves at; None: the first
        self.late_by = late_by
        self.garbage_at_optneg = garbage_at_optneg
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.running = True
        self.connections = 0
        self.seen: list[bytes] = []  # command octets received, in order

    def start(self) -> "FakeMilter":
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self.running = False
        self.sock.close()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                got = _read_packet(conn)
                if got is None or got[0] != b"O":
                    return
                if self.garbage_at_optneg:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    time.sleep(1)
                    return
                conn.sendall(_packet(b"O", struct.pack(">III", 6, 0, 0)))
                while self.running:
                    got = _read_packet(conn)
                    if got is None:
                        return
                    cmd, _ = got
                    self.seen.append(cmd)
                    if cmd in (b"D", b"A"):  # macros and abort get no reply
                        continue
                    if cmd == b"Q":
                        return
                    if self.behaviour == "pass" or (self.at is not None and cmd != self.at):
                        conn.sendall(_packet(b"c"))
                    elif self.behaviour == "hang":
                        deadline = time.monotonic() + 30
                        while self.running and time.monotonic() < deadline:
                            time.sleep(0.1)
                        return
                    elif self.behaviour == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    elif self.behaviour == "garbage":
                        conn.sendall(_packet(b"Z", b"what?"))
                    elif self.behaviour == "late":
                        time.sleep(self.late_by)
                        conn.sendall(_packet(b"c"))
                    elif self.behaviour == "huge":  # a 100 MB reply: its length first, then its octets
                        size = 100 * 1024 * 1024
                        conn.sendall(struct.pack(">I", size + 1) + b"h")
                        block = b"X" * 65536
                        for _ in range(size // len(block)):
                            conn.sendall(block)
        except OSError:
            pass
