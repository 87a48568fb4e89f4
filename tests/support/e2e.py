"""Helpers for end-to-end session tests: connect and greet, run a transaction, find queue ids.

"Nothing was queued" is checked by ids, not by waiting: every message the server ever
accepted leaves its queue id somewhere we can see (msg/, queue/<state>/, or in the name of
the Maildir file it was delivered to, `<time>.Q<id>R<n>.<host>`), so a test takes a snapshot
of the known ids, does its thing, sends one marker message that must arrive, and then checks
that the only new ids are the ones it expected.
"""
from __future__ import annotations

import os
import re
import select
import socket
import struct
import time
from pathlib import Path

from tests.support.server import ServerProcess
from tests.support.smtp import RawClient

HOSTNAME = "mx.example.test"  # server.hostname in tests/support/server.py
MAILBOXES = ("alice@example.test", "bob@example.test", "postmaster@example.test", "carol@other.test")
_QUEUED = re.compile(r"queued as (\S+)")
_MAILDIR_ID = re.compile(r"\.Q([0-9A-Za-z]+)R\d+\.")


def connect(port: int, *, source: str | None = None, ehlo: str | None = "client.test",
            timeout: float = 10.0) -> RawClient:
    """A RawClient that has read the 220 greeting and (unless ehlo=None) done EHLO."""
    c = RawClient(port, timeout=timeout, source=source)
    code, lines = c.reply()
    assert code == 220, (code, lines)
    if ehlo is not None:
        code, lines = c.cmd(f"EHLO {ehlo}")
        assert code == 250, (code, lines)
    return c


def code(reply: tuple[int, list[str]]) -> str:
    """(250, ["2.1.0 Sender ok"]) → "250 2.1.0", like RawClient.code."""
    c, lines = reply
    return f"{c} {lines[-1].split(' ')[0]}"


def expect(reply: tuple[int, list[str]], want) -> None:
    """Assert a reply matches a replies.Reply constant (code and enhanced code)."""
    got = code(reply)
    assert got == f"{want.code} {want.enhanced}", f"expected {want}, got {reply}"


def queue_id(reply: tuple[int, list[str]]) -> str:
    code_, lines = reply
    assert code_ == 250, reply
    m = _QUEUED.search(lines[-1])
    assert m, reply
    return m.group(1)


def send_message(c: RawClient, sender: str, rcpts: list[str], body: bytes,
                 mail_params: str = "") -> tuple[int, list[str]]:
    """One transaction on an open, greeted client; `body` is sent as is, then CRLF.CRLF.

    Returns the final reply to DATA (asserting MAIL, every RCPT and the 354 on the way)."""
    assert c.code(f"MAIL FROM:<{sender}>{(' ' + mail_params) if mail_params else ''}") == "250 2.1.0"
    for r in rcpts:
        assert c.code(f"RCPT TO:<{r}>") == "250 2.1.5", r
    code_, lines = c.cmd("DATA")
    assert code_ == 354, (code_, lines)
    c.send(body + b"\r\n.\r\n")
    return c.reply()


def nothing_more(c: RawClient, wait: float = 0.2) -> bool:
    """True if the server sent nothing beyond what was read (waits at most `wait` seconds)."""
    if c.buf:
        return False
    r, _, _ = select.select([c.sock], [], [], wait)
    if not r:
        return True
    try:
        data = c.sock.recv(65536, socket.MSG_PEEK)
    except OSError:
        return True
    return not data  # a close is "nothing more"


def abort(c: RawClient) -> None:
    """Close with a TCP RST (SO_LINGER 0): the rudest way a client can go away."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()


# -- what the server stored -----------------------------------------------------------------
def maildir_files(server: ServerProcess, address: str) -> dict[str, bytes]:
    """Maildir file name → contents, for new/ and cur/."""
    out = {}
    box = server.maildir(address)
    for sub in ("new", "cur"):
        d = box / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                out[p.name] = p.read_bytes()
    return out


def delivered_ids(server: ServerProcess, address: str) -> dict[str, bytes]:
    """Queue id → message, for every message in the mailbox."""
    out = {}
    for name, data in maildir_files(server, address).items():
        m = _MAILDIR_ID.search(name)
        assert m, name
        out[m.group(1)] = data
    return out


def known_ids(server: ServerProcess) -> set[str]:
    """Every queue id the server has ever committed that is still visible anywhere."""
    ids: set[str] = set()
    spool = server.spool
    for sub in ["msg", "tmp", *(f"queue/{s}" for s in ("incoming", "active", "deferred", "hold", "corrupt"))]:
        d = spool / sub
        if d.is_dir():
            ids.update(name.split(".")[0] for name in os.listdir(d))
    root = server.maildir_root
    if root.is_dir():
        for domain in root.iterdir():
            for box in domain.iterdir():
                for sub in ("tmp", "new", "cur"):
                    d = box / sub
                    if d.is_dir():
                        for name in os.listdir(d):
                            if m := _MAILDIR_ID.search(name):
                                ids.add(m.group(1))
    return ids


def wait_delivered(server: ServerProcess, address: str, qid: str, timeout: float = 10.0) -> bytes:
    """The message with this queue id, once it is in the mailbox (bounded wait)."""
    return server.wait_for(lambda: delivered_ids(server, address).get(qid), timeout=timeout)


def wait_settled(server: ServerProcess, timeout: float = 10.0) -> None:
    """Local delivery has caught up: nothing left in incoming/ or active/."""
    server.wait_for(lambda: not server.queue_files("incoming") and not server.queue_files("active"),
                    timeout=timeout)


def send_marker(server: ServerProcess, rcpt: str = "postmaster@example.test",
                c: RawClient | None = None) -> str:
    """Send one message and wait until it is delivered; its queue id.

    Anything the server accepted before the marker's 250 was committed before it, so once the
    marker is in the mailbox and the queue is settled, the set of known ids is complete."""
    own = c is None
    if own:
        c = connect(server.port)
    try:
        qid = queue_id(send_message(c, "marker@remote.test", [rcpt], b"Subject: marker\r\n\r\nmarker"))
    finally:
        if own:
            c.close()
    wait_delivered(server, rcpt, qid)
    wait_settled(server)
    return qid


def spool_tmp(server: ServerProcess) -> list[str]:
    d = server.spool / "tmp"
    return sorted(os.listdir(d)) if d.is_dir() else []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_closed(c: RawClient, timeout: float = 5.0) -> bool:
    """Like RawClient.closed but also counts a reset while reading as closed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if c.closed(max(0.05, deadline - time.monotonic())):
                return True
        except OSError:
            return True
    return False
