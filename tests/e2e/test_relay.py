"""End to end: who may send to whom (SPEC "Relay policy" as far as it applies without AUTH), and
the recipient limit. 127.0.0.1 is an ordinary Internet client; 127.0.0.2 is a trusted network."""
import json

import pytest

from geosmtp import replies
from tests.support.e2e import (
    start_data,
    connect, expect, known_ids, queue_id, send_marker, send_message, wait_delivered,
)

TRUSTED = "127.0.0.2"

# Addresses that name a local domain (or look local) but mean a remote mailbox. None may relay.
TRICKS = [
    "user%remote.test@example.test",
    "remote.test!user@example.test",
    "@example.test:user@remote.test",  # source route: ignored, so the target is remote.test
    "@example.test,@other.test:user@remote.test",
    "user@[127.0.0.1]",
    "user@[IPv6:::1]",
    '"user@remote.test"@example.test',
    "user@remote.test@example.test",
    "user@example.test.remote.test",
    "user@remote.test.",
    "user%remote.test",  # no domain at all
]


def test_unknown_local_user_is_550_5_1_1(server):
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        expect(c.cmd("RCPT TO:<nobody@example.test>"), replies.UNKNOWN_USER)
        expect(c.cmd("RCPT TO:<nobody@other.test>"), replies.UNKNOWN_USER)


@pytest.mark.parametrize("rcpt", ["alice@example.test", "ALICE@Example.TEST", "carol@other.test",
                                  "team@example.test", "postmaster@example.test"])
def test_local_recipients_are_accepted_from_anyone(server, rcpt):
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        expect(c.cmd(f"RCPT TO:<{rcpt}>"), replies.RECIPIENT_OK)


@pytest.mark.parametrize("rcpt", ["postmaster", "POSTMASTER", "PostMaster"])
def test_bare_postmaster_is_accepted_and_delivered(server, rcpt):
    # RFC 5321 4.5.1: <postmaster> without a domain must be accepted
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        expect(c.cmd(f"RCPT TO:<{rcpt}>"), replies.RECIPIENT_OK)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: to postmaster\r\n\r\nhello\r\n.\r\n")
        qid = queue_id(c.reply())
    msg = wait_delivered(server, "postmaster@example.test", qid)
    assert b"Subject: to postmaster" in msg


def test_relay_from_untrusted_client_is_denied_and_nothing_is_queued(server):
    before = known_ids(server)
    deferred = server.queue_files("deferred")
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        expect(c.cmd("RCPT TO:<someone@remote.test>"), replies.RELAY_DENIED)
        expect(c.cmd("DATA"), replies.NO_VALID_RECIPIENTS)
        # a good local recipient next to the denied one: only the local one gets it
        assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: mixed\r\n\r\nx\r\n.\r\n")
        qid = queue_id(c.reply())
    wait_delivered(server, "alice@example.test", qid)
    marker = send_marker(server)
    assert known_ids(server) - before == {qid, marker}
    assert server.queue_files("deferred") == deferred


def test_relay_from_trusted_network_is_queued_for_the_remote_recipient(server):
    with connect(server.port, source=TRUSTED) as c:
        qid = queue_id(send_message(c, "a@example.test", ["someone@remote.test"], b"Subject: relay\r\n\r\nx"))
    server.wait_for(lambda: qid in server.queue_files("deferred"))
    env = json.loads((server.spool / "queue" / "deferred" / qid).read_text())
    assert [(r["address"], r["status"]) for r in env["recipients"]] == [("someone@remote.test", "pending")]
    assert env["sender"] == "a@example.test"
    assert env["client"]["address"] == TRUSTED
    assert server.spooled(qid).endswith(b"Subject: relay\r\n\r\nx\r\n")


def test_alias_to_a_remote_address_is_queued_even_from_untrusted(server):
    # the alias was set up by the operator: that is not an open relay
    with connect(server.port) as c:
        qid = queue_id(send_message(c, "a@remote.test", ["fwd@example.test"], b"Subject: fwd\r\n\r\nx"))
    server.wait_for(lambda: qid in server.queue_files("deferred"))
    env = json.loads((server.spool / "queue" / "deferred" / qid).read_text())
    assert [(r["address"], r["original"]) for r in env["recipients"]] == [("someone@remote.test", "fwd@example.test")]


@pytest.mark.parametrize("rcpt", TRICKS)
def test_relay_tricks_never_relay(server, rcpt):
    deferred = server.queue_files("deferred")
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        code_, lines = c.cmd(f"RCPT TO:<{rcpt}>")
        assert 500 <= code_ < 600, (rcpt, code_, lines)
        expect(c.cmd("DATA"), replies.NO_VALID_RECIPIENTS)
    assert server.queue_files("deferred") == deferred


@pytest.mark.parametrize("rcpt", ["@example.test:user@remote.test", "user@[127.0.0.1]"])
def test_remote_targets_in_disguise_are_relay_denied(server, rcpt):
    with connect(server.port) as c:
        assert c.code("MAIL FROM:<a@remote.test>") == "250 2.1.0"
        expect(c.cmd(f"RCPT TO:<{rcpt}>"), replies.RELAY_DENIED)


def test_source_route_to_a_local_user_is_delivered_to_the_user(server):
    # RFC 5321 4.1.1.3 / appendix C: the route is accepted and ignored
    with connect(server.port) as c:
        start_data(c, "@relay.test:a@remote.test", ["@remote.test,@relay.test:bob@example.test"])
        c.send(b"Subject: routed\r\n\r\nx\r\n.\r\n")
        qid = queue_id(c.reply())
    msg = wait_delivered(server, "bob@example.test", qid)
    assert msg.startswith(b"Return-Path: <a@remote.test>\nDelivered-To: bob@example.test\n")


def test_at_least_100_recipients_then_452(server):
    rcpts = [f"r{i}@remote.test" for i in range(100)]
    with connect(server.port, source=TRUSTED) as c:
        assert c.code("MAIL FROM:<bulk@example.test>") == "250 2.1.0"
        for r in rcpts:
            expect(c.cmd(f"RCPT TO:<{r}>"), replies.RECIPIENT_OK)
        expect(c.cmd("RCPT TO:<r100@remote.test>"), replies.TOO_MANY_RECIPIENTS)
        expect(c.cmd("RCPT TO:<alice@example.test>"), replies.TOO_MANY_RECIPIENTS)
        expect(c.cmd("RCPT TO:<r5@remote.test>"), replies.RECIPIENT_OK)  # a repeat is not a new one
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: bulk\r\n\r\nx\r\n.\r\n")
        qid = queue_id(c.reply())
        # the limit is per transaction
        assert c.code("MAIL FROM:<bulk@example.test>") == "250 2.1.0"
        expect(c.cmd("RCPT TO:<r100@remote.test>"), replies.RECIPIENT_OK)
    server.wait_for(lambda: qid in server.queue_files("deferred"))
    env = json.loads((server.spool / "queue" / "deferred" / qid).read_text())
    assert [r["address"] for r in env["recipients"]] == rcpts


def test_too_many_recipients_does_not_count_as_an_error(make_server):
    # 452 is temporary: a client that keeps going after it must not be thrown out for errors
    srv = make_server({"limits": {"max_errors": 3}})
    with connect(srv.port, source=TRUSTED) as c:
        assert c.code("MAIL FROM:<bulk@example.test>") == "250 2.1.0"
        c.send("".join(f"RCPT TO:<r{i}@remote.test>\r\n" for i in range(105)))
        codes = [c.reply()[0] for _ in range(105)]
        assert codes == [250] * 100 + [452] * 5
        assert c.code("NOOP") == "250 2.0.0"
