"""The fcrdns check against a real DNS server on loopback (FakeDNS), called with Facts."""
from __future__ import annotations

import ipaddress

import pytest
from loguru import logger

from geosmtp.checks import registry
from geosmtp.checks.authresults import format_entry
from geosmtp.checks.dns import DNS
from geosmtp.checks.fcrdns import FCrDNSCheck, valid_name
from geosmtp.checks.interface import ACCEPT, DEFER, REJECT, AuthResult, CheckContext, Facts
from geosmtp.relay.mx import make_resolver
from tests.support.fakedns import FakeDNS

V4 = "192.0.2.20"
V6 = "2001:db8::20"


@pytest.fixture
def fake():
    with FakeDNS() as f:
        yield f


@pytest.fixture
def logs():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


def make(fake, timeout: float = 2, **options) -> FCrDNSCheck:
    ctx = CheckContext("mx.ours.test", DNS(make_resolver([("127.0.0.1", fake.port)], timeout)))
    return FCrDNSCheck(registry.validate_options(FCrDNSCheck, options), ctx)


def connect(check: FCrDNSCheck, ip: str):
    return check.connect(Facts(phase="connect", listener="mx", mode="smtp", ip=ipaddress.ip_address(ip),
                               trusted=False, hostname="mx.ours.test"))


def iprev(v) -> str:
    (auth,) = v.auth
    return format_entry(auth)


def test_a_forward_confirmed_ipv4_name_passes_lowercased(fake):
    fake.ptr(V4, "Mail.Sender.TEST")
    fake.a("mail.sender.test", "198.51.100.1", V4)
    v = connect(make(fake), V4)
    assert v.action == ACCEPT
    assert v.results == {"fcrdns": "pass", "ptr": "mail.sender.test"}
    assert v.auth == (AuthResult("iprev", "pass", (("policy.iprev", V4),)),)
    assert iprev(v) == f"iprev=pass policy.iprev={V4}"
    assert FCrDNSCheck.records_auth is True


def test_ipv6_asks_aaaa_only(fake):
    fake.ptr(V6, "v6.sender.test")
    fake.a("v6.sender.test", V4)
    fake.aaaa("v6.sender.test", "2001:db8:0:0::20")
    v = connect(make(fake), V6)
    assert v.results == {"fcrdns": "pass", "ptr": "v6.sender.test"}
    assert ("v6.sender.test", "A") not in fake.queries and ("v6.sender.test", "AAAA") in fake.queries


def test_a_name_that_does_not_lead_back_fails(fake):
    fake.ptr(V4, "liar.sender.test")
    fake.a("liar.sender.test", "198.51.100.1")
    v = connect(make(fake), V4)
    assert v.action == ACCEPT and v.results == {"fcrdns": "fail"}
    assert iprev(v) == f"iprev=fail policy.iprev={V4}"


def test_the_second_of_several_names_can_confirm(fake):
    fake.ptr(V4, "a.sender.test", "b.sender.test")
    fake.a("b.sender.test", V4)
    assert connect(make(fake), V4).results == {"fcrdns": "pass", "ptr": "b.sender.test"}


def test_no_ptr_is_permerror_and_none(fake):
    v = connect(make(fake), V4)
    assert v.results == {"fcrdns": "none"}
    assert iprev(v) == f"iprev=permerror policy.iprev={V4}"


def test_dns_failures_are_temperror(fake):
    fake.servfail(ipaddress.ip_address(V4).reverse_pointer)
    assert connect(make(fake), V4).results == {"fcrdns": "temperror"}
    fake.remove(ipaddress.ip_address(V4).reverse_pointer)
    fake.ptr(V4, "slow.sender.test", "other.sender.test")
    fake.hang("slow.sender.test")
    fake.a("other.sender.test", "198.51.100.9")
    v = connect(make(fake, timeout=0.5), V4)
    assert v.results == {"fcrdns": "temperror"} and iprev(v).startswith("iprev=temperror")


def test_hostile_ptr_data_never_becomes_a_name(fake, logs):
    evil = [b"mail\r\nX-Injected: yes", b"sender", b"test"]
    fake.ptr(V4, evil, "white space.test", "192.0.2.20", "under_score.test")
    fake.a("mail.sender.test", V4)  # what a careless unescaping would ask
    v = connect(make(fake), V4)
    assert v.results == {"fcrdns": "fail"}
    text = "\n".join(logs)
    assert "\r" not in text and "X-Injected: yes" not in text and "not a host name" in text
    assert not any(q[0].startswith(("mail", "white", "under", "192")) for q in fake.queries)


def test_at_most_ten_names_are_looked_up(fake):
    names = [f"n{i}.sender.test" for i in range(15)]
    fake.ptr(V4, *names)
    fake.a("n12.sender.test", V4)
    v = connect(make(fake), V4)
    assert v.results == {"fcrdns": "fail"}
    assert len([q for q in fake.queries if q[1] == "A"]) == 10


@pytest.mark.parametrize("setup, action, code, enhanced", [
    (lambda f: None, REJECT, 550, "5.7.25"),  # no PTR
    (lambda f: f.ptr(V4, "x.sender.test"), REJECT, 550, "5.7.25"),  # does not lead back
    (lambda f: f.servfail(ipaddress.ip_address(V4).reverse_pointer), DEFER, 450, "4.7.25"),
])
def test_reject_refuses_clients_without_fcrdns(fake, setup, action, code, enhanced):
    setup(fake)
    v = connect(make(fake, reject=True), V4)
    assert v.action == action and (v.reply.code, v.reply.enhanced) == (code, enhanced)
    assert V4 in v.reply.text


def test_reject_lets_a_confirmed_client_in(fake):
    fake.ptr(V4, "mail.sender.test")
    fake.a("mail.sender.test", V4)
    assert connect(make(fake, reject=True), V4).action == ACCEPT


@pytest.mark.parametrize("text, name", [
    ("Mail.Example.TEST.", "mail.example.test"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a\\013\\010b.test", None),
    ("-bad.test", None),
    ("10.0.0.1", None),
    ("m\u00e4il.test", None),
    ("a" * 64 + ".test", None),
    ("", None),
])
def test_valid_name(text, name):
    assert valid_name(text) == name
