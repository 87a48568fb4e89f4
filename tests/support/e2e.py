"""Helpers for end-to-end session tests: connect and greet, run a transaction, find queue ids.

"Nothing was queued" is checked by ids, not by waiting: every message the server ever
accepted leaves its queue id somewhere we can see (msg/, queue/<state>/, or in the name of
the Maildir file it was delivered to, `<time>.Q<id>R<n>.<host>`), so a test takes a snapshot
of the known ids, does its thing, sends one marker message that must arrive, and then checks
that the only new ids are the ones it expected.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import select
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.fakedns import FakeDNS
from tests.support.fakemx import FakeMX
from tests.support.server import ServerProcess
from tests.support.smtp import RawClient

HOSTNAME = "mx.example.test"  # server.hostname in tests/support/server.py
MAILBOXES = ("alice@example.test", "bob@example.test", "postmaster@example.test", "carol@other.test")
_QUEUED = re.compile(r"queued as (\S+)")
_MAILDIR_ID = re.compile(r"\.Q([0-9A-Za-z]+)R\d+\.")


def connect(port: int, *, source: str | None = None, ehlo: str | None = "client.test",
            timeout: float = 10.0) -> RawClient:
    """A RawClient that has read the 220 greeting and (unless ehlo=None) done EHLO."""
    return greeted(RawClient(port, timeout=timeout, source=source), ehlo)


def greeted(c: RawClient, ehlo: str | None = "client.test") -> RawClient:
    """`c` once it has read the 220 greeting and (unless ehlo=None) done EHLO."""
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
    """Assert a reply is this replies.Reply constant: code, enhanced code and every line of
    text (so one 503 5.5.1 cannot pass for another)."""
    prefix = f"{want.enhanced} " if want.enhanced else ""
    assert reply == (want.code, [prefix + line for line in want.lines]), f"expected {want}, got {reply}"


def queue_id(reply: tuple[int, list[str]]) -> str:
    code_, lines = reply
    assert code_ == 250, reply
    m = _QUEUED.search(lines[-1])
    assert m, reply
    return m.group(1)


def start_data(c: RawClient, sender: str, rcpts: list[str], mail_params: str = "") -> None:
    """MAIL, every RCPT and DATA on an open, greeted client, asserting 250s and the 354:
    the next bytes sent are the message."""
    assert c.code(f"MAIL FROM:<{sender}>{(' ' + mail_params) if mail_params else ''}") == "250 2.1.0"
    for r in rcpts:
        assert c.code(f"RCPT TO:<{r}>") == "250 2.1.5", r
    code_, lines = c.cmd("DATA")
    assert code_ == 354, (code_, lines)


def send_message(c: RawClient, sender: str, rcpts: list[str], body: bytes,
                 mail_params: str = "") -> tuple[int, list[str]]:
    """One transaction on an open, greeted client; `body` is sent as is, then CRLF.CRLF.

    Returns the final reply to DATA (asserting MAIL, every RCPT and the 354 on the way)."""
    start_data(c, sender, rcpts, mail_params)
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


# -- outbound relay -------------------------------------------------------------------------
SENDER = "alice@example.test"
_next_address = itertools.count()


def fresh_address() -> str:
    """A loopback address no other test in this process was given (127.0.100.1, 127.0.100.2, ...;
    other tests use 127.0.0-9.x as client addresses)."""
    n = next(_next_address)
    return f"127.0.{100 + n // 250}.{1 + n % 250}"


class Remotes:
    """Remote domains and fake MX servers for one test: every domain name is new (so the
    server's DNS cache knows nothing about it) and every fake MX listens on a loopback address
    of its own, on the one port the server under test connects to ([relay] port). Connections
    the server keeps for reuse therefore never carry over from one test to the next."""

    def __init__(self, dns, port: int):
        self.dns = dns
        self.port = port
        self.fakes: list[FakeMX] = []

    def domain(self, label: str = "r") -> str:
        return f"{label}{next(_next_address)}.test"

    def fake(self, name: str, *, cert=None, a: bool = True, **behaviour) -> FakeMX:
        """A started FakeMX called `name` (with an A record for it unless a=False); keyword
        arguments set its behaviour attributes (extensions=..., final_reply=...)."""
        for _ in range(20):
            mx = FakeMX(fresh_address(), self.port, name=name, cert=cert)
            for key, value in behaviour.items():
                assert hasattr(mx, key), key
                setattr(mx, key, value)
            try:
                mx.start()
            except OSError:  # that address:port is taken by something else: take the next
                continue
            self.fakes.append(mx)
            if a:
                self.dns.a(name, mx.host)
            return mx
        raise RuntimeError("no loopback address free for a fake MX")

    def close(self) -> None:
        for mx in self.fakes:
            mx.stop()


def relay_config(dns: FakeDNS, port: int, **relay) -> dict:
    """Server overrides for outbound tests: our fake DNS, the fakes' port, short timeouts
    (a hang costs 2 s), a retry every second and a queue scan every 0.2 s."""
    return {
        "relay": {"dns_servers": [dns.address], "port": port, "connect_timeout": 2,
                  "command_timeout": 2, "data_timeout": 2, "dns_timeout": 1, **relay},
        "queue": {"scan_interval": 0.2, "retry_schedule": [1]},
    }


def remote_domain(net: Remotes, **behaviour) -> tuple[str, FakeMX]:
    """A new domain with one MX (preference 10), a fake with the given behaviour."""
    domain = net.domain()
    mx = net.fake(f"mx1.{domain}", **behaviour)
    net.dns.mx(domain, [(10, mx.name)])
    return domain, mx


def verbs(mx: FakeMX, connection: int | None = None) -> list[str]:
    """The command verbs the fake received (on one connection, if given)."""
    return [line.split(" ")[0].upper() for n, line in mx.commands if connection in (None, n)]


def sent_line(srv: ServerProcess, qid: str, rcpt: str) -> str | None:
    """The log line that says `rcpt` was delivered, if any."""
    return next((line for line in log_lines(srv, qid) if f"to=<{rcpt}>" in line and "status=sent" in line), None)


def only(items):
    assert len(items) == 1, items
    return items[0]


def submit(server: ServerProcess, rcpts, body: bytes = b"Subject: hi\r\nFrom: <alice@example.test>\r\n\r\nhello\r\n",
           sender: str = SENDER, source: str = "127.0.0.2", mail_params: str = "") -> str:
    """Queue a message from the trusted network (127.0.0.2 may relay); its queue id."""
    with connect(server.port, source=source) as c:
        return queue_id(send_message(c, sender, list(rcpts), body, mail_params))


def dot_stuff(body: bytes) -> bytes:
    """RFC 5321 4.5.2, for a client that sends `body` itself."""
    out = body.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def queue_entry(server: ServerProcess, qid: str) -> tuple[str, dict] | None:
    """(state, envelope as a dict) of a queue entry, or None once it is gone."""
    for state in ("deferred", "active", "incoming", "hold", "corrupt"):
        try:
            with open(server.spool / "queue" / state / qid, "rb") as fh:
                return state, json.loads(fh.readline())
        except (FileNotFoundError, ValueError):  # moved meanwhile, or caught mid-rewrite
            continue
    return None


def wait_deferred(server: ServerProcess, qid: str, attempts: int = 1, timeout: float = 20.0) -> dict:
    """The envelope once the entry sits in deferred/ after at least `attempts` attempts."""
    def deferred():
        got = queue_entry(server, qid)
        return got[1] if got and got[0] == "deferred" and got[1]["attempts"] >= attempts else None
    return server.wait_for(deferred, timeout=timeout)


def wait_gone(server: ServerProcess, qid: str, timeout: float = 20.0) -> None:
    """Delivery is over for this message: no entry and no message file left."""
    server.wait_for(lambda: queue_entry(server, qid) is None and not (server.spool / "msg" / qid).exists(),
                    timeout=timeout)


def log_lines(server: ServerProcess, qid: str) -> list[str]:
    """The server's log lines about one queue entry."""
    return [line for line in server.log().splitlines() if f"[{qid}]" in line]


def notices(server: ServerProcess, qid: str, address: str = SENDER) -> list[bytes]:
    """The DSNs about message `qid` in the (local) sender's mailbox, as delivered (LF lines)."""
    mark = f"Queue ID: {qid}".encode("ascii")
    return [m for m in server.messages(address) if mark in m]


def wait_notices(server: ServerProcess, qid: str, n: int = 1, address: str = SENDER,
                 timeout: float = 10.0) -> list[bytes]:
    return server.wait_for(lambda: (found := notices(server, qid, address)) and len(found) >= n and found,
                           timeout=timeout)


def dsn_fields(dsn: bytes) -> list[dict[str, str]]:
    """The per-recipient field groups (unfolded) of a DSN's message/delivery-status or
    message/global-delivery-status part. Read as text: the stdlib parses the global kind as
    an encapsulated message."""
    text = dsn.decode("utf-8", "replace").replace("\r\n", "\n")
    m = re.search(r"^Content-Type: message/(?:global-)?delivery-status\n(?:[^\n]+\n)*\n(.*?)\n--", text, re.S | re.M)
    assert m, "no delivery-status part"
    blocks = [re.sub(r"\n[ \t]+", " ", b) for b in m.group(1).split("\n\n") if b.strip()]
    return [dict(line.split(": ", 1) for line in b.splitlines()) for b in blocks[1:]]


# -- fixtures shared by the outbound test modules, each of which defines `world` ----------------
@pytest.fixture
def srv(world):
    """The module's relaying server; it must still be running after each test."""
    yield world.server
    assert world.server.proc.poll() is None, "the server died"


@pytest.fixture
def net(world):
    """Fresh remote domains and fake MX servers for one test (see Remotes)."""
    remotes = Remotes(world.dns, world.port)
    yield remotes
    remotes.close()


def readyz(port: int) -> int:
    """The status /readyz answers on the metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
