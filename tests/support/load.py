"""Mail load for the crash tests: client threads that keep sending numbered messages, and
the tokens found in the mailboxes afterwards."""
from __future__ import annotations

import random
import re
import smtplib
import threading
import time

_TOKEN = re.compile(rb"^X-Token: (\S+)$", re.M)


class Load:
    """`clients` threads, each sending one message per connection until stop(): odd
    messages to alice, even ones to alice and team (alice and bob), bodies of random size
    up to `max_size` (above the spool's 128 KiB, a message is streamed to disk during DATA).
    `acked` holds the tokens that got their 250, `attempted` every token tried."""

    def __init__(self, port_of, clients: int = 6, max_size: int = 30_000, max_per_client: int = 2000):
        self.port_of = port_of
        self.max_size = max_size
        self.max_per_client = max_per_client
        self.acked: set[str] = set()
        self.attempted: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def _send(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set() and n < self.max_per_client:
            n += 1
            token = f"w{worker}-m{n}"
            rcpts = ["alice@example.test"] if n % 2 else ["alice@example.test", "team@example.test"]
            filler = ("x" * 76 + "\r\n") * (random.randint(10, self.max_size) // 78)
            body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n{filler}\r\n".encode()
            self.attempted.add(token)
            try:
                with smtplib.SMTP("127.0.0.1", self.port_of(), timeout=10) as c:
                    c.sendmail("load@remote.test", rcpts, body)
                self.acked.add(token)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)  # the server is down or restarting

    def check_delivered_once(self, srv) -> None:
        """Every acknowledged message is in alice's Maildir exactly once (and in bob's when
        it went to team), and nothing is there that was never sent."""
        alice = tokens(srv, "alice@example.test")
        bob = tokens(srv, "bob@example.test")
        assert len(alice) == len(set(alice)), "a message was delivered twice to alice"
        assert len(bob) == len(set(bob)), "a message was delivered twice to bob"
        lost = self.acked - set(alice)
        assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
        bob_expected = {t for t in self.acked if int(t.rsplit("m", 1)[1]) % 2 == 0}
        assert bob_expected <= set(bob)
        assert set(alice) <= self.attempted


def tokens(srv, address: str) -> list[str]:
    found = []
    for msg in srv.messages(address):
        m = _TOKEN.search(msg)
        assert m, msg[:200]
        found.append(m.group(1).decode())
    return found
