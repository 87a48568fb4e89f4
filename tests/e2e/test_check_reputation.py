"""End to end: the dnsbl, fcrdns and greylist checks in a real server, asked through its
resolver settings of a real DNS server on loopback (FakeDNS), clients of any address coming
through the PROXY listener (tests/support/checks.py)."""
from __future__ import annotations

import ipaddress
import re
import time

import pytest

from geosmtp.checks.dns import reversed_ip
from tests.support.checks import checks_server, client_from
from tests.support.e2e import queue_id, send_message, wait_delivered
from tests.support.fakedns import FakeDNS
from tests.support.rbldnsd import Rbldnsd

ALICE = "alice@example.test"
SENDER = "someone@sender.test"
BODY = b"From: <someone@sender.test>\r\nSubject: reputation\r\n\r\nhello\r\n"
DNSBL = {"type": "dnsbl", "zones": [
    {"zone": "bl.test", "answers": ["127.0.0.2-127.0.0.11"]},
    {"zone": "zen.spamhaus.test", "answers": ["127.0.0.2-127.255.255.255"]},
    {"zone": "list.dnswl.test", "answers": ["127.0.*.2-3"], "action": "accept"},
    {"zone": "info.test", "action": "header"},
]}


def listing(dns: FakeDNS, zone: str, ip: str, answer: str) -> None:
    dns.a(f"{reversed_ip(ipaddress.ip_address(ip))}.{zone}", answer)


def head_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


@pytest.fixture(scope="module")
def dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture(scope="module")
def srv(dns, tmp_path_factory):
    s = checks_server(tmp_path_factory.mktemp("reputation"), dns, [DNSBL, {"type": "fcrdns"}]).start()
    yield s
    s.stop()


def test_listed_ipv4_and_ipv6_clients_are_refused_at_rcpt_naming_the_zone(srv, dns):
    for ip in ("192.0.2.50", "2001:db8:50::1"):
        listing(dns, "bl.test", ip, "127.0.0.2")
        c = client_from(srv, ip)
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.cmd(f"RCPT TO:<{ALICE}>") == (550, [f"5.7.1 Service unavailable; client [{ip}] blocked using bl.test"])
        assert c.code("RCPT TO:<postmaster@example.test>") == "250 2.1.5"  # RFC 5321 4.5.1
        c.cmd("QUIT")
    assert "dnsbl: client [2001:db8:50::1] listed on bl.test=127.0.0.2" in srv.log()


def test_the_list_refusing_our_query_is_not_a_listing_and_logged_once(srv, dns):
    ip = "192.0.2.51"
    listing(dns, "zen.spamhaus.test", ip, "127.255.255.254")
    for _ in range(2):
        c = client_from(srv, ip)
        qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
        c.cmd("QUIT")
        wait_delivered(srv, ALICE, qid)
    assert srv.log().count("dnsbl zen.spamhaus.test: the list refused our query (answer 127.255.255.254)") == 1


def test_an_allow_list_hit_passes_a_listed_client(srv, dns):
    ip = "192.0.2.52"
    listing(dns, "bl.test", ip, "127.0.0.2")
    listing(dns, "list.dnswl.test", ip, "127.0.10.2")
    c = client_from(srv, ip)
    qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
    wait_delivered(srv, ALICE, qid)
    assert "on allow list list.dnswl.test" in srv.log()


def test_header_zone_and_the_forward_confirmed_name_in_the_delivered_message(srv, dns):
    ip = "192.0.2.53"
    listing(dns, "info.test", ip, "127.0.0.4")
    dns.ptr(ip, "Mail.Sender.TEST")
    dns.a("mail.sender.test", ip)
    c = client_from(srv, ip, ehlo="helo.sender.test")
    qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
    head = head_of(wait_delivered(srv, ALICE, qid))
    assert re.search(rb"Received: from helo\.sender\.test \(mail\.sender\.test \[192\.0\.2\.53\]\)", head), head
    assert b"X-DNSBL: info.test listed [192.0.2.53] (127.0.0.4)" in head
    assert f"iprev=pass policy.iprev={ip}".encode() in head


def test_hostile_ptr_data_never_reaches_a_header_or_the_log(srv, dns):
    ip = "192.0.2.54"
    evil_labels = [b"mail\r\nX-Injected: yes\r\n", b"sender", b"test"]
    dns.ptr(ip, evil_labels, "junk)(\\name.test")
    dns.a("mail.sender.test", ip)
    c = client_from(srv, ip, ehlo="helo.sender.test")
    qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
    head = head_of(wait_delivered(srv, ALICE, qid))
    assert b"X-Injected" not in head and b"junk" not in head
    assert b"Received: from helo.sender.test ([192.0.2.54])" in head
    assert f"iprev=fail policy.iprev={ip}".encode() in head
    log = srv.log()
    assert "X-Injected: yes" not in log and "\r" not in log
    assert "not a host name" in log


def test_all_zones_are_asked_at_once(dns, tmp_path):
    zones = [{"zone": f"slow{i}.test"} for i in range(4)]
    ip = "192.0.2.55"
    for z in zones:
        dns.hang(f"{reversed_ip(ipaddress.ip_address(ip))}.{z['zone']}")
    s = checks_server(tmp_path, dns, [{"type": "dnsbl", "zones": zones}]).start()
    try:
        started = time.monotonic()
        c = client_from(s, ip)  # greeted: four hung zones cost one resolver timeout (2 s)
        waited = time.monotonic() - started
        assert 1.5 < waited < 3.5, waited
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"  # a list we cannot ask refuses nothing
        c.cmd("QUIT")
    finally:
        s.stop()
    assert s.log().count("counted as not listed") == 4


def test_phase_connect_refuses_the_greeting(dns, tmp_path):
    ip = "2001:db8:56::1"
    listing(dns, "drop.test", ip, "127.0.0.3")
    s = checks_server(tmp_path, dns, [{"type": "dnsbl", "phase": "connect", "zones": [{"zone": "drop.test"}]}]).start()
    try:
        c = client_from(s, ip, expect_greeting=False)
        assert c.reply() == (554, [f"5.7.1 Service unavailable; client [{ip}] blocked using drop.test"])
        assert c.closed()
    finally:
        s.stop()


def test_fcrdns_reject_refuses_a_client_without_a_name(dns, tmp_path):
    s = checks_server(tmp_path, dns, [{"type": "fcrdns", "reject": True, "listeners": ["mx"]}]).start()
    try:
        c = client_from(s, "192.0.2.57", expect_greeting=False)
        assert c.reply() == (554, ["5.7.25 Reverse DNS validation failed for [192.0.2.57]"])
    finally:
        s.stop()


def test_greylisting_refuses_then_passes_after_the_delay(dns, tmp_path):
    s = checks_server(tmp_path, dns, [{"type": "greylist", "delay": "1s"}]).start()
    try:
        c = client_from(s, "192.0.2.58")
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.cmd(f"RCPT TO:<{ALICE}>") == (451, ["4.7.1 Greylisted, try again in 1 second"])
        assert c.code("RSET") == "250 2.0.0"
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{ALICE}>") == "451 4.7.1"  # too soon
        time.sleep(1.1)
        c.cmd("RSET")
        qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
        wait_delivered(s, ALICE, qid)
        c2 = client_from(s, "192.0.2.200")  # same /24, same sender and recipient: known now
        qid = queue_id(send_message(c2, SENDER, [ALICE], BODY))
        wait_delivered(s, ALICE, qid)
    finally:
        s.stop()


def test_greylisting_with_dkim_domains_decides_the_message_at_data(dns, tmp_path):
    s = checks_server(tmp_path, dns, [{"type": "greylist", "delay": "1s", "dkim_domains": ["sender.test"]}]).start()
    try:
        c = client_from(s, "192.0.2.59")
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"  # DKIM is not known yet
        assert c.cmd("DATA")[0] == 354
        c.send(BODY + b"\r\n.\r\n")
        assert c.reply() == (451, ["4.7.1 Greylisted, try again in 1 second"])  # no DKIM pass
        time.sleep(1.1)
        qid = queue_id(send_message(c, SENDER, [ALICE], BODY))
        wait_delivered(s, ALICE, qid)
    finally:
        s.stop()


def test_a_real_dnsbl_server(tmp_path):
    """Our dnsbl check against rbldnsd (Debian's DNSBL server), pointed at it by [relay]
    dns_servers: IPv4 and IPv6 listings, the "refused" answer, an address not listed."""
    v4 = ["192.0.2.60", "192.0.2.61 :127.255.255.254:refused"]
    with Rbldnsd("rbl.test", v4=v4, v6=["2001:db8:60::/48 :127.0.0.4:v6 listed"]) as rbl:
        check = {"type": "dnsbl", "zones": [{"zone": "rbl.test", "answers": ["127.0.0.0/8"]}], "listeners": ["mx"]}
        s = checks_server(tmp_path, rbl, [check]).start()
        try:
            for ip, refused in (("192.0.2.60", True), ("2001:db8:60::7", True), ("192.0.2.61", False),
                                ("192.0.2.62", False)):
                c = client_from(s, ip)
                assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
                want = ((550, [f"5.7.1 Service unavailable; client [{ip}] blocked using rbl.test"]) if refused
                        else (250, ["2.1.5 Ok"]))
                got = c.cmd(f"RCPT TO:<{ALICE}>")
                assert got[0] == want[0] and (not refused or got == want), (ip, got)
                c.cmd("QUIT")
        finally:
            s.stop()
    assert "the list refused our query (answer 127.255.255.254)" in s.log()


def test_greylisting_with_workers_shares_a_store_file(dns, tmp_path):
    """Two worker processes accept in turn: with store_file, a retry after the delay passes
    whichever worker takes it (with a store per process, most of six retries would reach
    the worker that never saw the first try and be greylisted again: checked)."""
    check = {"type": "greylist", "delay": "1s", "store_file": str(tmp_path / "greylist.sqlite")}
    s = checks_server(tmp_path, dns, [check], {"server": {"workers": 2}}).start()
    try:
        s.wait_for(lambda: s.log().count(f"listening on 127.0.0.1:{s.mx_port}") >= 2, timeout=15)
        c = client_from(s, "192.0.2.70")
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{ALICE}>") == "451 4.7.1"
        c.cmd("QUIT")
        time.sleep(1.1)
        for _ in range(6):  # new connections: the kernel hands them to either worker
            c = client_from(s, "192.0.2.70")
            assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
            assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
            c.cmd("QUIT")
    finally:
        s.stop()
