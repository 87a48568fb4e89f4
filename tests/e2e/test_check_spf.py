"""End to end: the spf check in a real server, the fake DNS as its resolver, clients of any
address through a trusted balancer's PROXY header (tests/support/checks.py).

What a message carries is our Authentication-Results, the first field in front of it (after
the Maildir delivery's Return-Path and Delivered-To, before our Received:); what
a refused MAIL leaves is nothing queued (checked by queue ids, tests/support/e2e.py)."""
from __future__ import annotations

import time

import pytest

from tests.support.checks import checks_server, client_from
from tests.support.e2e import known_ids, queue_id, send_marker, wait_delivered
from tests.support.fakedns import FakeDNS

ALICE = "alice@example.test"
GOOD_V4, GOOD_V6, BAD = "192.0.2.10", "2001:db8::10", "198.51.100.7"
BODY = b"From: <someone@sender.test>\r\nSubject: spf\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def dns():
    with FakeDNS() as fake:
        fake.txt("pass.sender.test", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all")
        fake.txt("soft.sender.test", "v=spf1 include:pass.sender.test ~all")
        fake.txt("helo.sender.test", "v=spf1 a -all")
        fake.a("helo.sender.test", GOOD_V4)
        fake.servfail("broken.sender.test")
        fake.hang("silent.sender.test")
        yield fake


def server(tmp_path, dns, **options):
    return checks_server(tmp_path, dns, [{"type": "spf", **options}]).start()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, dns):
    """reject_fail and defer_temperror left false: every result is only recorded."""
    srv = server(tmp_path_factory.mktemp("spf-plain"), dns)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory, dns):
    srv = server(tmp_path_factory.mktemp("spf-strict"), dns, reject_fail=True, defer_temperror=True)
    yield srv
    srv.stop()


def deliver(srv, ip: str, sender: str, helo: str = "client.test") -> bytes:
    """One message from `ip` (EHLO `helo`), delivered: its header section, LF line ends."""
    c = client_from(srv, ip, ehlo=helo)
    try:
        assert c.code(f"MAIL FROM:<{sender}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
        assert c.cmd("DATA")[0] == 354
        c.send(BODY + b".\r\n")
        qid = queue_id(c.reply())
    finally:
        c.close()
    got = wait_delivered(srv, ALICE, qid).replace(b"\r\n", b"\n")
    return got.split(b"\n\n", 1)[0]


def first_field(head: bytes) -> bytes:
    """The first header field the server put in front of the message (after the two the
    Maildir delivery writes, Return-Path and Delivered-To), with its continuation lines;
    asserting our Received: comes after it."""
    lines = head.split(b"\n")
    assert lines[0].startswith(b"Return-Path: ") and lines[1].startswith(b"Delivered-To: "), head
    lines = lines[2:]
    end = next((i for i, line in enumerate(lines[1:], 1) if line[:1] not in (b" ", b"\t")), len(lines))
    assert lines[end].startswith(b"Received: "), head
    return b"\n".join(lines[:end])


@pytest.mark.parametrize("ip, sender, helo, expected", [
    (GOOD_V4, "user@pass.sender.test", "client.test", b"spf=pass smtp.mailfrom=user@pass.sender.test"),
    (GOOD_V6, "user@pass.sender.test", "client.test", b"spf=pass smtp.mailfrom=user@pass.sender.test"),
    (BAD, "user@pass.sender.test", "client.test", b"spf=fail smtp.mailfrom=user@pass.sender.test"),
    (BAD, "user@soft.sender.test", "client.test", b"spf=softfail smtp.mailfrom=user@soft.sender.test"),
    (GOOD_V4, "user@nothing.sender.test", "client.test", b"spf=none smtp.mailfrom=user@nothing.sender.test"),
    (GOOD_V4, "user@broken.sender.test", "client.test", b"spf=temperror smtp.mailfrom=user@broken.sender.test"),
    (GOOD_V4, "user@[192.0.2.1]", "client.test", b'spf=none smtp.mailfrom="user@[192.0.2.1]"'),
    (GOOD_V4, "", "[192.0.2.10]", b'spf=none smtp.helo="[192.0.2.10]"'),
    (GOOD_V4, "", "helo.sender.test", b"spf=pass smtp.helo=helo.sender.test"),
    (BAD, "", "helo.sender.test", b"spf=fail smtp.helo=helo.sender.test"),
], ids=["pass", "pass-ipv6", "fail", "softfail", "none", "temperror", "literal", "helo-literal",
        "helo-pass", "helo-fail"])
def test_result_is_recorded_in_authentication_results(plain, ip, sender, helo, expected):
    head = deliver(plain, ip, sender, helo)
    assert first_field(head) == b"Authentication-Results: mx.example.test;\n\t" + expected, head


def test_a_dns_server_that_never_answers_is_a_temperror(plain, dns):
    started = time.monotonic()
    head = deliver(plain, GOOD_V4, "user@silent.sender.test")
    assert first_field(head) == b"Authentication-Results: mx.example.test;\n\tspf=temperror smtp.mailfrom=user@silent.sender.test"
    assert "spf: temperror mailfrom for silent.sender.test 192.0.2.10 (DNS: silent.sender.test. TXT: LifetimeTimeout)" \
        in plain.log()
    assert ("silent.sender.test", "TXT") in dns.queries
    assert time.monotonic() - started < 10  # the resolver's 2 s, not the check's 20 s timeout


def test_forged_spf_result_in_our_name_is_removed(plain):
    c = client_from(plain, BAD, ehlo="client.test")
    forged = b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=user@pass.sender.test\r\n" + BODY
    assert c.code("MAIL FROM:<user@pass.sender.test>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    assert c.cmd("DATA")[0] == 354
    c.send(forged + b".\r\n")
    qid = queue_id(c.reply())
    c.close()
    got = wait_delivered(plain, ALICE, qid)
    assert b"spf=pass" not in got and b"spf=fail smtp.mailfrom=user@pass.sender.test" in got


def test_reject_fail_refuses_at_mail_and_queues_nothing(strict):
    before = known_ids(strict)
    c = client_from(strict, BAD, ehlo="client.test")
    assert c.cmd("MAIL FROM:<user@pass.sender.test>") == (550, ["5.7.23 SPF validation failed for pass.sender.test"])
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 503  # no transaction
    # the null sender: the HELO name is the identity refused
    assert c.cmd("MAIL FROM:<>")[0] == 250  # client.test has no SPF record: none
    c.cmd("RSET")
    c.close()
    h = client_from(strict, BAD, ehlo="helo.sender.test")
    assert h.cmd("MAIL FROM:<>") == (550, ["5.7.23 SPF validation failed for helo.sender.test"])
    h.close()
    marker = send_marker(strict)
    assert known_ids(strict) - before == {marker}
    assert "check spf: mail reject: spf fail for pass.sender.test" in strict.log()


def test_defer_temperror_defers_at_mail(strict):
    c = client_from(strict, GOOD_V4, ehlo="client.test")
    assert c.cmd("MAIL FROM:<user@broken.sender.test>") == (
        451, ["4.7.24 SPF temporary error for broken.sender.test, try again later"])
    # softfail and pass are not refused, even here
    assert c.code("MAIL FROM:<user@pass.sender.test>") == "250 2.1.0"
    c.close()
    head = deliver(strict, BAD, "user@soft.sender.test")
    assert first_field(head) == b"Authentication-Results: mx.example.test;\n\tspf=softfail smtp.mailfrom=user@soft.sender.test"
