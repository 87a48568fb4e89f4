"""Kill -9 under load: every message that got a 250 is delivered exactly once after restart.

Clients keep sending while the server is SIGKILLed several times, in the middle of
accepting and of delivering. 250 means fsynced in the spool, and Maildir delivery after a
crash renames over its own earlier copy, so no acknowledged message is lost or doubled.
"""
import random
import re
import smtplib
import threading
import time

from tests.support.server import ServerProcess

KILLS = 4
CLIENTS = 6


def sender(port_of, stop, acked, attempted, worker):
    n = 0
    while not stop.is_set() and n < 2000:
        n += 1
        token = f"w{worker}-m{n}"
        rcpts = ["alice@example.test"] if n % 2 else ["alice@example.test", "team@example.test"]
        body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n{'x' * random.randint(10, 30000)}\r\n".encode()
        attempted.add(token)
        try:
            with smtplib.SMTP("127.0.0.1", port_of(), timeout=5) as c:
                c.sendmail("load@remote.test", rcpts, body)
            acked.add(token)
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)  # the server is down or restarting


def tokens(srv, address):
    found = []
    for msg in srv.messages(address):
        m = re.search(rb"^X-Token: (\S+)$", msg, re.M)
        assert m, msg[:200]
        found.append(m.group(1).decode())
    return found


def test_sigkill_loses_and_duplicates_nothing(tmp_path):
    srv = ServerProcess(tmp_path / "crash", {"log": {"level": "WARNING"}}).start()
    stop = threading.Event()
    acked: set[str] = set()
    attempted: set[str] = set()
    threads = [
        threading.Thread(target=sender, args=(lambda: srv.port, stop, acked, attempted, i), daemon=True)
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    try:
        for _ in range(KILLS):
            time.sleep(random.uniform(0.6, 1.2))
            srv.kill()  # SIGKILL: no cleanup of any kind
            srv.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    try:
        assert len(acked) > 20, "the load did not get going"
        print(f"acked={len(acked)} attempted={len(attempted)}")
        # let the queue manager finish every local delivery
        srv.wait_for(lambda: not srv.queue_files("incoming") and not srv.queue_files("active"), timeout=30)
        alice = tokens(srv, "alice@example.test")
        bob = tokens(srv, "bob@example.test")
        assert len(alice) == len(set(alice)), "a message was delivered twice to alice"
        assert len(bob) == len(set(bob)), "a message was delivered twice to bob"
        lost = acked - set(alice)
        assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:5]}"
        bob_expected = {t for t in acked if int(t.rsplit("m", 1)[1]) % 2 == 0}
        assert bob_expected <= set(bob)
        assert set(alice) <= attempted
        assert not srv.queue_files("deferred") and not srv.queue_files("corrupt")
    finally:
        srv.stop()
