"""The MTA side of the milter protocol (version 6), enough to hand one message to a milter
such as OpenDKIM and collect the header fields it adds. Every read has a timeout; every loop
ends at the milter's final answer or at a bound.

    headers = milter_headers("127.0.0.1", port, sender, rcpt, message)
"""
from __future__ import annotations

import socket
import struct

# protocol flags a milter sends back: steps it does not want, and steps it will not answer
_NO_STEP = {"C": 0x1, "H": 0x2, "M": 0x4, "R": 0x8, "B": 0x10, "L": 0x20, "N": 0x40}
_NO_REPLY = {"L": 0x80, "C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000, "N": 0x40000, "B": 0x80000}
_FINAL = set(b"acrtd")  # accept, continue, reject, tempfail, discard
_MAX_PACKETS = 1000


class MilterError(Exception):
    pass


def _packet(cmd: str, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd.encode() + data


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise MilterError("milter closed the connection")
        out += chunk
    return out


def _read(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", _read_exactly(sock, 4))
    if not 1 <= length <= 1 << 20:
        raise MilterError(f"bad packet length {length}")
    data = _read_exactly(sock, length)
    return data[0], data[1:]


def milter_headers(host: str, port: int, sender: str, rcpt: str, message: bytes,
                   timeout: float = 10.0) -> list[tuple[str, str]]:
    """Run one message through the milter; the (name, value) fields it adds or inserts."""
    head, _, body = message.replace(b"\r\n", b"\n").partition(b"\n\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\n" + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name, value.lstrip(b" ")))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(_packet("O", struct.pack(">III", 6, 0x1FF, 0)))
        cmd, data = _read(sock)
        if cmd != ord("O") or len(data) < 12:
            raise MilterError(f"no option negotiation: {chr(cmd)!r}")
        _version, _actions, protocol = struct.unpack(">III", data[:12])

        def step(cmd: str, data: bytes = b"") -> None:
            if protocol & _NO_STEP.get(cmd, 0):
                return
            sock.sendall(_packet(cmd, data))
            if protocol & _NO_REPLY.get(cmd, 0):
                return
            answer, _ = _read(sock)
            if answer != ord("c"):
                raise MilterError(f"milter answered {chr(answer)!r} to {cmd!r}")

        sock.sendall(_packet("D", b"C" + b"j\x00mx.example.test\x00"))
        step("C", b"localhost\x00" + b"4" + struct.pack(">H", 40000) + b"127.0.0.1\x00")
        step("H", b"client.test\x00")
        sock.sendall(_packet("D", b"M" + b"i\x00TESTQID\x00"))
        step("M", f"<{sender}>".encode() + b"\x00")
        step("R", f"<{rcpt}>".encode() + b"\x00")
        for name, value in fields:
            step("L", name + b"\x00" + value + b"\x00")
        step("N")
        for i in range(0, len(body), 65535):
            step("B", body[i:i + 65535].replace(b"\n", b"\r\n"))
        sock.sendall(_packet("E"))
        added: list[tuple[str, str]] = []
        for _ in range(_MAX_PACKETS):
            cmd, data = _read(sock)
            if cmd in (ord("h"), ord("i")):  # add header / insert header (index first)
                parts = (data[4:] if cmd == ord("i") else data).split(b"\x00")
                added.append((parts[0].decode(), parts[1].decode()))
            elif cmd in _FINAL:
                if cmd != ord("a") and cmd != ord("c"):
                    raise MilterError(f"milter refused the message: {chr(cmd)!r}")
                sock.sendall(_packet("Q"))
                return added
        raise MilterError("no final answer from the milter")
