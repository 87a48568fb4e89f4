"""LMTP delivery (geosmtp.delivery.lmtp) against a real Dovecot, read back over IMAP; and
against FakeMX in LMTP mode for the failures a real server will not stage (a connection lost
mid-DATA or between the final replies, a server that stops answering). Also Dovecot reading
a Maildir that geosmtp's MaildirDelivery wrote.

The client runs on gevent sockets in this (unpatched) process: each call goes through run(),
a greenlet awaited with a bound. One Dovecot serves the module; every test sends messages of
its own (a Subject of its own) and looks for those only.
"""
from __future__ import annotations

import io
import os
import time
import uuid
from email import message_from_bytes

import gevent
import pytest

from geosmtp.delivery.lmtp import LMTPDelivery, parse_address
from geosmtp.delivery.local import MaildirDelivery
from geosmtp.delivery.target import Message
from geosmtp.relay.client import Timeouts
from geosmtp.replies import Reply
from tests.support.dovecot import DOMAIN, MAIL_USER, Dovecot
from tests.support.fakemx import FakeMX

FAST = Timeouts(connect=2.0, command=2.0, data=2.0)
SENDER = "sender@remote.test"
PREFIX = b"DKIM-Signature: v=1; a=rsa-sha256; d=remote.test;\r\n\tb=c2lnbmF0dXJl\r\n"


def run(fn, *args, timeout: float = 15.0):
    g = gevent.spawn(fn, *args)
    try:
        return g.get(timeout=timeout)
    finally:
        g.kill(block=False)


def message(subject: str, filler: int = 40) -> bytes:
    """A message over 1 KiB (carol's and dave's quota), with what a careless client
    breaks: a folded header, a line that starts with a dot, 8-bit UTF-8 text."""
    return (f"From: Sender <{SENDER}>\r\nTo: alice@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@remote.test>\r\nX-Folded: one\r\n\ttwo\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            ".a line that starts with a dot\r\n" + "Grüße aus Köln, 8 bits\r\n" * filler).encode("utf-8")


def outgoing(body: bytes, rcpts: list[str], **kw) -> Message:
    return Message(sender=SENDER, recipients=tuple(rcpts), size=len(PREFIX) + len(body), prefix=PREFIX,
                   eightbit=True, **kw)


def deliver(target: LMTPDelivery, body: bytes, rcpts: list[str], **kw):
    return run(target.deliver, target.destination(DOMAIN), outgoing(body, rcpts, **kw), lambda: io.BytesIO(body))


def codes(outcomes) -> list[str]:
    return [f"{o.reply.code} {o.reply.enhanced}" for o in outcomes]


def with_subject(dovecot: Dovecot, user: str, subject: str, mailbox: str = "INBOX") -> list[bytes]:
    return [m for m in dovecot.messages(user, mailbox) if message_from_bytes(m)["Subject"] == subject]


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot() as d:
        yield d


@pytest.fixture
def target(dovecot):
    made = []

    def make(address: str, **kw) -> LMTPDelivery:
        t = LMTPDelivery(address, kw.pop("timeouts", FAST), hostname="mx.example.test", **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        run(t.close)


def test_parse_address():
    assert parse_address("unix:/run/dovecot/lmtp") == ("/run/dovecot/lmtp", None)
    assert parse_address("127.0.0.1:24") == ("127.0.0.1", 24)
    assert parse_address("[::1]:24") == ("::1", 24)
    for bad in ("unix:run/lmtp", "localhost", "host:0", "host:lmtp", ":24", "/run/dovecot/lmtp"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_one_transaction_several_recipients_each_its_own_answer(dovecot, target):
    """Over the unix socket: one accepted, one unknown (refused at RCPT), one over quota with
    quota_full_tempfail (452: deferred), one over quota by default (552: bounced), one
    sub-address filed by Dovecot into its detail mailbox. One connection, one DATA."""
    subject = "several " + uuid.uuid4().hex
    body = message(subject)
    lmtp = target(dovecot.lmtp_unix)
    rcpts = [f"alice@{DOMAIN}", f"nobody@{DOMAIN}", f"carol@{DOMAIN}", f"dave@{DOMAIN}", f"bob+lists@{DOMAIN}"]
    outcomes = deliver(lmtp, body, rcpts)
    assert codes(outcomes) == ["250 2.0.0", "550 5.1.1", "452 4.2.2", "552 5.2.2", "250 2.0.0"]
    assert f"<carol@{DOMAIN}> Quota exceeded" in outcomes[2].reply.text
    assert all(o.remote.endswith(f"[{dovecot.lmtp_unix}]") for o in outcomes)
    assert lmtp.connections == 1
    [got] = with_subject(dovecot, "alice", subject)
    # what we sent arrives whole: the prefix first, then every header and line as it was
    assert got.startswith(b"Return-Path: <" + SENDER.encode() + b">\r\nReceived: ")
    assert PREFIX + body in got
    assert with_subject(dovecot, "carol", subject) == with_subject(dovecot, "dave", subject) == []
    # bob+lists: into bob's "lists" (lmtp_save_to_detail_mailbox), not his INBOX
    assert len(with_subject(dovecot, "bob", subject, "lists")) == 1
    assert with_subject(dovecot, "bob", subject) == []


def test_connection_reused_for_the_next_message(dovecot, target):
    """Over TCP: two messages, one connection (our count and Dovecot's log agree)."""
    lmtp = target(dovecot.lmtp_tcp)
    before = dovecot.log().count("Info: Connect from 127.0.0.1")
    subjects = ["reuse one " + uuid.uuid4().hex, "reuse two " + uuid.uuid4().hex]
    for subject in subjects:
        assert codes(deliver(lmtp, message(subject, 2), [f"alice@{DOMAIN}", f"bob@{DOMAIN}"])) == ["250 2.0.0"] * 2
    assert lmtp.connections == 1
    assert dovecot.log().count("Info: Connect from 127.0.0.1") == before + 1
    for user in ("alice", "bob"):
        assert [len(with_subject(dovecot, user, s)) for s in subjects] == [1, 1]


def test_smtputf8_message_bounces_as_dovecot_2_3_does_not_offer_it(dovecot, target):
    """Dovecot 2.3's LMTP offers no SMTPUTF8 (RFC 6531 3.4: no downgrade): a permanent 553
    5.6.7 for everyone, sent nowhere; the connection stays usable."""
    lmtp = target(dovecot.lmtp_unix)
    subject = "utf8 " + uuid.uuid4().hex
    outcomes = deliver(lmtp, message(subject, 2), [f"alice@{DOMAIN}", f"bob@{DOMAIN}"], smtputf8=True)
    assert codes(outcomes) == ["553 5.6.7"] * 2
    assert with_subject(dovecot, "alice", subject) == []
    assert codes(deliver(lmtp, message(subject, 2), [f"alice@{DOMAIN}"])) == ["250 2.0.0"]
    assert lmtp.connections == 1


def test_dovecot_reads_the_maildir_geosmtp_wrote(dovecot, target):
    """MaildirDelivery writes into the Maildir Dovecot keeps for erin (already made and
    indexed by an LMTP delivery): IMAP shows both messages, headers intact."""
    first = "by lmtp " + uuid.uuid4().hex
    assert codes(deliver(target(dovecot.lmtp_unix), message(first, 2), [f"erin@{DOMAIN}"])) == ["250 2.0.0"]
    second = "by maildir " + uuid.uuid4().hex
    body = message(second, 2)
    msg = Message(sender=SENDER, recipients=(f"erin@{DOMAIN}",), size=len(body), eightbit=True,
                  id="LMTPTEST1", created=time.time(), slots=(0,))
    maildir = MaildirDelivery(dovecot.mail_root, "mx.example.test", frozenset({f"erin@{DOMAIN}"}).__contains__)
    [outcome] = maildir.deliver("maildir", msg, lambda: io.BytesIO(body))
    assert outcome.reply.code == 250
    # this test runs as root; an operator runs geosmtp as the mail user (here nobody)
    for path in (dovecot.mailbox("erin") / "new").iterdir():
        os.chown(path, MAIL_USER.pw_uid, MAIL_USER.pw_gid)
    assert len(with_subject(dovecot, "erin", first)) == 1
    [got] = with_subject(dovecot, "erin", second)
    assert got == (f"Return-Path: <{SENDER}>\r\nDelivered-To: erin@{DOMAIN}\r\n").encode() + body


# -- failures a real server does not stage: FakeMX in LMTP mode --------------------------------
@pytest.fixture
def fake():
    m = FakeMX("127.0.0.1", name="lmtp.example.test")
    m.lmtp = True
    m.hang_timeout = 5.0
    with m:
        yield m


RCPTS = ["a@example.test", "b@example.test", "c@example.test"]
BODY = b"Subject: t\r\n\r\nhello\r\n"


def data_commands(fake: FakeMX) -> int:
    return sum(line == "DATA" for _, line in fake.commands)


def test_lost_connection_mid_data_defers_everyone(fake, target):
    fake.drop_at = "body"
    outcomes = deliver(target(f"127.0.0.1:{fake.port}"), BODY, RCPTS)
    assert [o.reply.code // 100 for o in outcomes] == [4, 4, 4]
    assert all(o.reply.enhanced == "4.4.2" for o in outcomes)
    assert data_commands(fake) == 1 and fake.transactions == []  # not sent again


def test_lost_connection_between_final_replies_defers_only_the_unanswered(fake, target):
    """The first recipient was answered 250 before the loss: delivered. The other two were
    not: deferred. A 4xx at RCPT defers that one recipient only."""
    fake.lmtp_drop_after = 1
    fake.rcpt_replies = {"d@example.test": "450 4.2.1 Mailbox busy"}
    outcomes = deliver(target(f"127.0.0.1:{fake.port}"), BODY, RCPTS + ["d@example.test"])
    assert codes(outcomes)[0] == "250 2.0.0"
    assert codes(outcomes)[1:] == ["451 4.4.2", "451 4.4.2", "450 4.2.1"]
    assert "lost connection" in outcomes[1].reply.text
    assert data_commands(fake) == 1 and len(fake.transactions) == 1


def test_a_server_that_stops_answering_after_the_dot_times_out(fake, target):
    fake.hang_at = "dot"
    started = time.monotonic()
    outcomes = deliver(target(f"127.0.0.1:{fake.port}", timeouts=Timeouts(connect=1.0, command=1.0, data=0.5)),
                       BODY, RCPTS)
    assert time.monotonic() - started < 3.0
    assert codes(outcomes) == ["451 4.4.2"] * 3 and "timeout" in outcomes[0].reply.text


def test_per_recipient_final_replies_and_lhlo_only(fake, target):
    """One reply per accepted recipient, in order, matched to the right one; the session
    opens with LHLO (the fake refuses EHLO as an LMTP server must)."""
    fake.lmtp_replies = {"b@example.test": "452 4.2.2 Mailbox full", "c@example.test": "552 5.2.2 Over quota"}
    fake.rcpt_replies = {"a@example.test": "550 5.1.1 No such user"}
    outcomes = deliver(target(f"127.0.0.1:{fake.port}"), BODY, RCPTS + ["e@example.test"])
    assert codes(outcomes) == ["550 5.1.1", "452 4.2.2", "552 5.2.2", "250 2.0.0"]
    assert outcomes[1].reply == Reply(452, "4.2.2", "Mailbox full")
    assert fake.commands[0][1] == "LHLO mx.example.test"
    assert fake.transactions[0].data == PREFIX + BODY


def test_a_kept_connection_the_server_closed_is_not_used(fake, target):
    """The server times the idle connection out (421, close): the next message opens a new
    one and goes once."""
    fake.timeout = 0.3
    lmtp = target(f"127.0.0.1:{fake.port}")
    assert codes(deliver(lmtp, BODY, RCPTS[:1])) == ["250 2.0.0"]
    fake.wait_idle(5.0)
    assert codes(deliver(lmtp, BODY, RCPTS[:1])) == ["250 2.0.0"]
    assert lmtp.connections == 2 and data_commands(fake) == 2 and len(fake.messages) == 2


def test_no_recipients_no_connection(fake, target):
    lmtp = target(f"127.0.0.1:{fake.port}")
    assert deliver(lmtp, BODY, []) == []
    assert lmtp.connections == 0 and fake.connections == 0


def test_no_server_on_the_socket_defers_everyone(tmp_path, target):
    outcomes = deliver(target(f"unix:{tmp_path}/no-such-socket"), BODY, RCPTS[:2])
    assert codes(outcomes) == ["451 4.4.1"] * 2
    assert "No such file or directory" in outcomes[0].reply.text


def test_the_server_delivers_a_local_domain_by_lmtp(dovecot, tmp_path):
    """geosmtp end to end: [local] delivery = "lmtp" to the real Dovecot. One SMTP message for
    alice, bob+lists (the +detail reaches Dovecot, which files it in "lists") and carol (over
    quota, 452: deferred, and only she); then read back over IMAP."""
    from tests.support.e2e import connect, queue_id, send_message
    from tests.support.server import ServerProcess

    users = [f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol", "postmaster")]
    srv = ServerProcess(tmp_path / "srv", {
        "local": {"delivery": "lmtp", "lmtp": dovecot.lmtp_unix, "users": users, "aliases": {}},
        "queue": {"retry_schedule": ["1h"]},
        "log": {"level": "INFO"},
    }).start()
    try:
        subject = "through geosmtp " + uuid.uuid4().hex
        with connect(srv.port) as c:
            qid = queue_id(send_message(c, SENDER, [f"alice@{DOMAIN}", f"bob+lists@{DOMAIN}", f"carol@{DOMAIN}"],
                                        message(subject)))
        srv.wait_for(lambda: "status=deferred" in srv.log(), timeout=20)
        assert len(with_subject(dovecot, "alice", subject)) == 1
        assert len(with_subject(dovecot, "bob", subject, "lists")) == 1
        log = srv.log()
        assert f"to=<alice@{DOMAIN}> relay=" in log and f"[{dovecot.lmtp_unix}]" in log
        carol = next(line for line in log.splitlines() if f"to=<carol@{DOMAIN}>" in line)
        assert "status=deferred" in carol and "452 4.2.2" in carol
        # carol only: the others are delivered (the log line comes just before the rename)
        assert srv.wait_for(lambda: srv.queue_files("deferred") == [qid], timeout=10)
    finally:
        srv.stop()
