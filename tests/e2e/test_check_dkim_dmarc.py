"""End to end: the dkim and dmarc checks in a real server, the fake DNS as its resolver, a
client at any address through the PROXY listener: Authentication-Results in the delivered
message, 550 5.7.1 for p=reject with nothing queued, hold/ for p=quarantine, and a client's
forged Authentication-Results in our name gone."""
from __future__ import annotations

import json

import pytest

from tests.support.checks import checks_server, client_from
from tests.support.dkimkeys import Ed25519Key, RSAKey, sign
from tests.support.e2e import queue_id, send_message, start_data, wait_delivered
from tests.support.fakedns import FakeDNS

ALICE = "alice@example.test"
CHECKS = [{"type": "dkim"}, {"type": "dmarc"}]


def message(author: str, subject: str = "hello") -> bytes:
    return (f"From: Someone <{author}>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            "Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <e2e@test>\r\n\r\nthe body\r\n").encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    dns = FakeDNS().start()
    rsa_key, ed_key = RSAKey(2048), Ed25519Key()
    dns.txt("rsa._domainkey.sender.test", rsa_key.record)
    dns.txt("ed._domainkey.sender.test", ed_key.record)
    dns.txt("_dmarc.sender.test", "v=DMARC1; p=reject")
    dns.txt("evil._domainkey.evil.test", rsa_key.record)
    dns.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    dns.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    srv = checks_server(tmp_path_factory.mktemp("dkimdmarc"), dns, CHECKS).start()
    yield srv, dns, rsa_key, ed_key
    srv.stop()
    dns.stop()


def head_of(got: bytes) -> bytes:
    return got.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def test_signed_aligned_message_passes_and_forged_results_go(world):
    srv, _dns, rsa_key, ed_key = world
    signed = sign(sign(message("someone@sender.test"), rsa_key, "rsa", "sender.test"), ed_key, "ed", "sender.test")
    forged = b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")
    qid = queue_id(send_message(c, "bounce@sender.test", [ALICE], forged + signed))
    c.cmd("QUIT")
    head = head_of(wait_delivered(srv, ALICE, qid))
    ours = [line for line in head.split(b"\nAuthentication-Results: ")[1:]]
    assert len(ours) == 1, head  # ours only: the client's claim in our name was removed
    fields = ours[0].split(b"\n")
    fields = [fields[0]] + [f for f in fields[1:] if f.startswith(b"\t")]
    assert fields[0] == b"mx.example.test;"
    assert fields[1].startswith(b"\tdkim=pass header.d=sender.test header.s=ed header.b=")
    assert fields[2].startswith(b"\tdkim=pass header.d=sender.test header.s=rsa header.b=")
    assert fields[3] == b"\tdmarc=pass header.from=sender.test policy.dmarc=reject"
    assert b"bank.test" not in head
    assert "removed 1 Authentication-Results field(s) in our name" in srv.log()


def test_p_reject_unaligned_is_refused_at_end_of_data_with_nothing_queued(world):
    srv, _dns, rsa_key, _ed = world
    before = {s: srv.queue_files(s) for s in ("incoming", "active", "deferred", "hold")}
    spoof = sign(message("ceo@bank.test", "wire the money"), rsa_key, "evil", "evil.test")  # valid, not aligned
    c = client_from(srv, "198.51.100.7", ehlo="evil.test")
    start_data(c, "ceo@evil.test", [ALICE])
    c.send(spoof + b"\r\n.\r\n")
    assert c.reply() == (550, ["5.7.1 Email rejected per DMARC policy for bank.test"])
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.cmd("QUIT")
    assert {s: srv.queue_files(s) for s in before} == before
    assert "check dmarc: data reject" in srv.log()


def test_p_quarantine_goes_to_hold_with_the_reason(world):
    srv, _dns, _rsa, _ed = world
    c = client_from(srv, "203.0.113.5", ehlo="mail.shop.test")
    qid = queue_id(send_message(c, "news@shop.test", [ALICE], message("news@shop.test")))
    c.cmd("QUIT")
    assert qid in srv.queue_files("hold")
    envelope = json.loads((srv.spool / "queue" / "hold" / qid).read_bytes().split(b"\n", 1)[0])
    assert envelope["extra"]["quarantine"] == "dmarc: DMARC policy quarantine for shop.test"
    fields = envelope["extra"]["headers"]
    assert "dkim=none" in fields and "dmarc=fail header.from=shop.test policy.dmarc=quarantine" in fields
