"""End to end: hourly limits keyed on the client address and the authenticated user (SPEC
"Limits and abuse"): messages per hour per IP and per user (451 4.7.1) and AUTH failures per
hour per IP (421 4.7.0). Each test uses its own client addresses (127.0.x.y) so that the
counts of one test never reach another."""
import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from geosmtp import replies
from tests.support.e2e import code, connect, expect, known_ids, queue_id, send_marker, send_message, wait_closed
from tests.support.server import PASSWORDS, ServerProcess

ALICE, BOB = "alice@example.test", "bob@example.test"
LIMIT = 2


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("limited"), {
        "listeners": {"submission": {"allow_plaintext_auth": True}},
        "limits": {"messages_per_hour_per_ip": LIMIT, "messages_per_hour_per_user": LIMIT,
                   "auth_failures_per_hour_per_ip": LIMIT},
    }).start()
    yield srv
    srv.stop()


def authed(srv, user, source):
    c = connect(srv.submission_port, source=source)
    expect(c.cmd(f"AUTH PLAIN {plain(user, PASSWORDS[user])}"), replies.AUTH_OK)
    return c


def test_messages_per_hour_per_ip(limited):
    ip = "127.0.10.1"
    before = known_ids(limited)
    with connect(limited.port, source=ip) as c:
        qids = [queue_id(send_message(c, "a@remote.test", [ALICE], b"Subject: %d\r\n\r\nx" % i))
                for i in range(LIMIT)]
        assert c.cmd("MAIL FROM:<a@remote.test>") == (451, ["4.7.1 Too many messages, slow down and try again later"])
        expect(c.cmd(f"RCPT TO:<{ALICE}>"), replies.NEED_MAIL)
        assert c.code("NOOP") == "250 2.0.0"  # a 451 is not a reason to close
        expect(c.cmd("MAIL FROM:<>"), replies.RATE_LIMITED)
    # a new session from the same address is still limited, on every listener
    with connect(limited.port, source=ip) as c:
        expect(c.cmd("MAIL FROM:<a@remote.test>"), replies.RATE_LIMITED)
    with authed(limited, BOB, ip) as c:
        expect(c.cmd(f"MAIL FROM:<{BOB}>"), replies.RATE_LIMITED)
    # another address is not
    with connect(limited.port, source="127.0.10.2") as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    marker = send_marker(limited, c=connect(limited.port, source="127.0.10.3"))
    assert known_ids(limited) - before == {*qids, marker}


def test_temporary_limit_replies_are_not_counted_as_errors(make_server):
    srv = make_server({"limits": {"messages_per_hour_per_ip": 1, "max_errors": 3}})
    with connect(srv.port, source="127.0.10.4") as c:
        queue_id(send_message(c, "a@remote.test", [ALICE], b"Subject: one\r\n\r\nx"))
        for _ in range(5):
            expect(c.cmd("MAIL FROM:<a@remote.test>"), replies.RATE_LIMITED)
        assert c.code("NOOP") == "250 2.0.0"


def test_only_accepted_messages_count(limited):
    ip = "127.0.11.1"
    with connect(limited.port, source=ip) as c:
        for _ in range(LIMIT + 1):  # transactions that are reset
            assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
            assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
            assert c.code("RSET") == "250 2.0.0"
        for _ in range(LIMIT + 1):  # messages refused at the end of DATA (bare LF)
            assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
            assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: bare\r\n\r\nbare\nLF\r\n.\r\n")
            expect(c.reply(), replies.BARE_NEWLINE)
        for i in range(LIMIT):
            queue_id(send_message(c, "a@remote.test", [ALICE], b"Subject: ok\r\n\r\nx"))
        expect(c.cmd("MAIL FROM:<a@remote.test>"), replies.RATE_LIMITED)


def test_messages_per_hour_per_user(limited):
    """alice sends from several addresses: her own count stops her, not the addresses'."""
    for i in range(LIMIT):
        with authed(limited, ALICE, f"127.0.12.{i + 1}") as c:
            queue_id(send_message(c, ALICE, [BOB], b"Subject: from alice\r\n\r\nx"))
    fresh_ip = f"127.0.12.{LIMIT + 1}"
    with authed(limited, ALICE, fresh_ip) as c:
        assert c.cmd(f"MAIL FROM:<{ALICE}>") == (451, ["4.7.1 Too many messages, slow down and try again later"])
    with authed(limited, BOB, fresh_ip) as c:  # the same address, another user: fine
        assert c.code(f"MAIL FROM:<{BOB}>") == "250 2.1.0"
    # unauthenticated mail from that address is not alice's
    with connect(limited.port, source=fresh_ip) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"


def test_auth_failures_per_hour_per_ip(limited):
    ip = "127.0.13.1"
    wrong = plain(BOB, "wrong-password")

    def fail_once():  # one failure per session, in two sessions side by side (each waits 1 s)
        with connect(limited.submission_port, source=ip) as c:
            return code(c.cmd(f"AUTH PLAIN {wrong}"))

    with ThreadPoolExecutor(LIMIT) as pool:
        assert [f.result(timeout=30) for f in [pool.submit(fail_once) for _ in range(LIMIT)]] == ["535 5.7.8"] * LIMIT

    # a new session from that address: AUTH is refused, even with the right password, and closed
    c = connect(limited.submission_port, source=ip)
    start = time.monotonic()
    assert c.cmd(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}") == (
        421, ["4.7.0 Too many authentication failures, closing connection"])
    assert time.monotonic() - start < 0.9  # refused before any password check or delay
    assert wait_closed(c)
    c.close()
    # LOGIN too, before any prompt
    with connect(limited.submission_port, source=ip) as c:
        expect(c.cmd("AUTH LOGIN"), replies.AUTH_TOO_MANY_FAILURES)
    # the address may still send to local users on the MX listener (no AUTH involved)
    with connect(limited.port, source=ip) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
    # another address is not affected
    with authed(limited, BOB, "127.0.13.2") as c:
        assert c.code(f"MAIL FROM:<{BOB}>") == "250 2.1.0"


def test_auth_failure_limit_applies_inside_a_session(make_server):
    """With max_failures above the hourly per-IP limit, the hourly limit ends the session."""
    srv = make_server({"listeners": {"submission": {"allow_plaintext_auth": True}},
                       "auth": {"max_failures": 5}, "limits": {"auth_failures_per_hour_per_ip": 1}})
    with connect(srv.submission_port, source="127.0.13.3") as c:
        expect(c.cmd(f"AUTH PLAIN {plain(BOB, 'nope')}"), replies.AUTH_FAILED)
        expect(c.cmd(f"AUTH PLAIN {plain(BOB, PASSWORDS[BOB])}"), replies.AUTH_TOO_MANY_FAILURES)
        assert wait_closed(c)


def test_max_failures_per_session_is_configurable(make_server):
    srv = make_server({"listeners": {"submission": {"allow_plaintext_auth": True}}, "auth": {"max_failures": 1}})
    with connect(srv.submission_port, source="127.0.13.4") as c:
        start = time.monotonic()
        expect(c.cmd(f"AUTH PLAIN {plain(BOB, 'nope')}"), replies.AUTH_TOO_MANY_FAILURES)
        assert time.monotonic() - start < 0.9  # no point in a delay before closing
        assert wait_closed(c)
