"""The dnsbl check against a real DNS server on loopback (FakeDNS), called with Facts."""
from __future__ import annotations

import ipaddress

import pytest
from loguru import logger

from geosmtp.checks import registry
from geosmtp.checks.dns import DNS, reversed_ip
from geosmtp.checks.dnsbl import AnswerRange, DNSBLCheck
from geosmtp.checks.interface import ACCEPT, REJECT, CheckContext, Facts
from geosmtp.relay.mx import make_resolver
from tests.support.fakedns import FakeDNS

V4 = "192.0.2.10"
V6 = "2001:db8::25"


@pytest.fixture
def fake():
    with FakeDNS() as f:
        yield f


def make(fake, timeout: float = 2, **options) -> DNSBLCheck:
    ctx = CheckContext("mx.ours.test", DNS(make_resolver([("127.0.0.1", fake.port)], timeout)))
    return DNSBLCheck(registry.validate_options(DNSBLCheck, options), ctx)


def facts(ip: str, phase: str = "connect", **kw) -> Facts:
    return Facts(phase=phase, listener="mx", mode="smtp", ip=ipaddress.ip_address(ip), trusted=False,
                 hostname="mx.ours.test", **kw)


def listing(fake, zone: str, ip: str, *answers: str) -> None:
    fake.a(f"{reversed_ip(ipaddress.ip_address(ip))}.{zone}", *answers)


@pytest.fixture
def logs():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    yield lines
    logger.remove(sink)


def test_a_listed_ipv4_client_is_refused_naming_the_zone(fake):
    listing(fake, "zen.spamhaus.test", V4, "127.0.0.4")
    check = make(fake, phase="connect", zones=[{"zone": "zen.spamhaus.test", "answers": ["127.0.0.2-127.0.0.11"]}])
    v = check.connect(facts(V4))
    assert v.action == REJECT
    assert (v.reply.code, v.reply.enhanced) == (550, "5.7.1")  # the engine makes it 554 at connect
    assert v.reply.text == f"Service unavailable; client [{V4}] blocked using zen.spamhaus.test"
    assert v.results["dnsbl"] == {"score": 0.0, "listed": ["zen.spamhaus.test"],
                                  "refusal": v.reply.text}
    assert ("10.2.0.192.zen.spamhaus.test", "A") in fake.queries


def test_an_unlisted_client_passes_and_ipv6_is_asked_in_nibbles(fake):
    check = make(fake, zones=[{"zone": "bl.test"}])
    v = check.connect(facts(V6))
    assert v.action == ACCEPT and v.results["dnsbl"] == {"score": 0.0, "listed": []}
    nibbles = "5.2.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2"  # 32 nibbles
    assert fake.queries == [(f"{nibbles}.bl.test", "A")]


def test_a_listed_ipv6_client_is_refused_at_rcpt_but_postmaster_is_reachable(fake):
    listing(fake, "bl.test", V6, "127.0.0.2")
    check = make(fake, zones=[{"zone": "bl.test"}])  # phase "rcpt" is the default
    v = check.connect(facts(V6))
    assert v.action == ACCEPT  # nothing refused before the client can hear why
    results = v.results
    r = check.rcpt(facts(V6, "rcpt", sender="a@b.test", recipient="bob@ours.test", results=results))
    assert r.action == REJECT and (r.reply.code, r.reply.enhanced) == (550, "5.7.1")
    assert r.reply.text == f"Service unavailable; client [{V6}] blocked using bl.test"
    for pm in ("postmaster@ours.test", "Postmaster"):
        assert check.rcpt(facts(V6, "rcpt", recipient=pm, results=results)) is None


def test_phase_connect_has_no_rcpt_method():
    from geosmtp.checks.interface import phases_of
    ctx = CheckContext("h", None)
    zones = [{"zone": "bl.test"}]
    assert phases_of(DNSBLCheck(registry.validate_options(DNSBLCheck, {"zones": zones}), ctx)) == ("connect", "rcpt")
    assert phases_of(DNSBLCheck(registry.validate_options(DNSBLCheck, {"zones": zones, "phase": "connect"}),
                                ctx)) == ("connect",)


def test_only_configured_answers_count(fake):
    listing(fake, "bl.test", V4, "127.0.0.99", "10.0.0.2")
    check = make(fake, zones=[{"zone": "bl.test", "answers": ["127.0.0.2-127.0.0.11", "127.0.1.0/24"]}])
    assert check.connect(facts(V4)).results["dnsbl"]["listed"] == []
    listing(fake, "bl.test", V4, "127.0.1.7")
    check = make(fake, zones=[{"zone": "bl.test", "answers": ["127.0.0.2-127.0.0.11", "127.0.1.0/24"]}])
    assert check.connect(facts(V4)).results["dnsbl"]["listed"] == ["bl.test"]


def test_the_list_refusing_our_query_is_never_a_listing_and_logged_once_per_interval(fake, logs):
    listing(fake, "zen.spamhaus.test", V4, "127.255.255.254")
    listing(fake, "zen.spamhaus.test", "192.0.2.11", "127.255.255.252")
    check = make(fake, phase="connect", zones=[{"zone": "zen.spamhaus.test", "answers": ["127.0.0.0/8"]}])
    now = [1000.0]
    check.clock = lambda: now[0]
    for ip in (V4, "192.0.2.11", V4):
        v = check.connect(facts(ip))
        assert v.action == ACCEPT and v.results["dnsbl"]["listed"] == []
    refused = [line for line in logs if "refused our query" in line]
    assert len(refused) == 1 and "zen.spamhaus.test" in refused[0]
    now[0] += 601
    check.connect(facts(V4))
    assert len([line for line in logs if "refused our query" in line]) == 2


def test_scores_add_up_to_the_threshold(fake):
    zones = [{"zone": "a.test", "action": "score", "score": 0.6}, {"zone": "b.test", "action": "score", "score": 0.6}]
    listing(fake, "a.test", V4, "127.0.0.2")
    one = make(fake, phase="connect", zones=zones).connect(facts(V4))
    assert one.action == ACCEPT and one.results["dnsbl"] == {"score": 0.6, "listed": ["a.test"]}
    listing(fake, "b.test", V4, "127.0.0.3")
    both = make(fake, phase="connect", zones=zones).connect(facts(V4))
    assert both.action == REJECT
    assert both.reply.text == f"Service unavailable; client [{V4}] blocked using a.test, b.test (score 1.2)"
    assert both.results["dnsbl"]["score"] == pytest.approx(1.2)


def test_header_action_adds_a_field_and_refuses_nothing(fake):
    listing(fake, "info.test", V4, "127.0.0.5")
    v = make(fake, zones=[{"zone": "info.test", "action": "header"}]).connect(facts(V4))
    assert v.action == ACCEPT
    assert v.headers == (("X-DNSBL", f"info.test listed [{V4}] (127.0.0.5)"),)


def test_an_allow_list_hit_makes_other_listings_not_count(fake):
    zones = [{"zone": "bl.test"},
             {"zone": "list.dnswl.test", "answers": ["127.0.*.2-3"], "action": "accept"},
             {"zone": "list.dnswl.test.", "answers": ["127.0.*.1"], "action": "score", "score": -0.5}]
    listing(fake, "bl.test", V4, "127.0.0.2")
    listing(fake, "list.dnswl.test", V4, "127.0.15.2")  # trust level 2 ("medium")
    v = make(fake, phase="connect", zones=zones).connect(facts(V4))
    assert v.action == ACCEPT and v.results["dnsbl"]["allowed"] == "list.dnswl.test"
    assert v.results["dnsbl"]["listed"] == ["bl.test", "list.dnswl.test"]
    assert fake.queries.count(("10.2.0.192.list.dnswl.test", "A")) == 1  # two entries, one question
    listing(fake, "list.dnswl.test", V4, "127.0.15.1")  # low trust: it only weighs
    v = make(fake, phase="connect", zones=zones).connect(facts(V4))
    assert v.action == REJECT and v.results["dnsbl"]["score"] == -0.5


def test_a_negative_score_zone_weighs_against_listings(fake):
    zones = [{"zone": "bl.test", "action": "score", "score": 1.0},
             {"zone": "wl.test", "answers": ["127.0.*.0-1"], "action": "score", "score": -0.5}]
    listing(fake, "bl.test", V4, "127.0.0.2")
    listing(fake, "wl.test", V4, "127.0.9.1")
    v = make(fake, phase="connect", zones=zones).connect(facts(V4))
    assert v.action == ACCEPT and v.results["dnsbl"]["score"] == 0.5


def test_dns_failures_are_not_listings(fake, logs):
    zones = [{"zone": "broken.test"}, {"zone": "slow.test"}, {"zone": "bl.test"}]
    fake.servfail(f"{reversed_ip(ipaddress.ip_address(V4))}.broken.test")
    fake.hang(f"{reversed_ip(ipaddress.ip_address(V4))}.slow.test")
    check = make(fake, timeout=0.5, phase="connect", zones=zones)
    v = check.connect(facts(V4))
    assert v.action == ACCEPT and v.results["dnsbl"]["listed"] == []
    assert any("broken.test: lookup failed" in line for line in logs)
    assert any("slow.test: lookup failed" in line for line in logs)
    listing(fake, "bl.test", V4, "127.0.0.2")  # a working zone still counts next to broken ones
    v = make(fake, timeout=0.5, phase="connect", zones=zones).connect(facts(V4))
    assert v.action == REJECT and "bl.test" in v.reply.text


def test_an_ipv4_only_zone_is_not_asked_about_ipv6(fake):
    check = make(fake, zones=[{"zone": "v4only.test", "ipv6": False}, {"zone": "both.test"}])
    check.connect(facts(V6))
    assert [q[0].rsplit(".", 2)[-2] for q in fake.queries] == ["both"]


def test_a_custom_message_template(fake):
    listing(fake, "bl.test", V4, "127.0.0.3")
    check = make(fake, phase="connect",
                 zones=[{"zone": "bl.test", "message": "Listed at {zone} ({answer}), see https://bl.test/?ip={ip}"}])
    assert check.connect(facts(V4)).reply.text == f"Listed at bl.test (127.0.0.3), see https://bl.test/?ip={V4}"


@pytest.mark.parametrize("zone", [
    {"zone": "bl.test", "answers": ["127.0.0.300"]},
    {"zone": "bl.test", "answers": ["127.0.0.9-127.0.0.2"]},
    {"zone": "bl.test", "answers": ["127.0.*"]},
    {"zone": "bl.test", "message": "blocked {user}"},
    {"zone": "bl.test", "message": "blocked {ip.__class__}"},
    {"zone": "bl.test", "message": "blocked {0}"},
    {"zone": "bl.test", "message": "blocked {ip!r}"},
    {"zone": "bl.test", "message": "blocked {ip"},
    {"zone": "bl.test", "message": "blocked\r\nX-Evil: 1"},
    {"zone": "bad zone"},
    {"zone": "bl.test", "action": "quarantine"},
])
def test_bad_zone_settings_are_refused(zone):
    with pytest.raises(registry.CheckError):
        registry.validate_options(DNSBLCheck, {"zones": [zone]})


def test_answer_ranges():
    ip = ipaddress.IPv4Address
    assert ip("127.0.0.5") in AnswerRange("127.0.0.2-127.0.0.11")
    assert ip("127.0.0.12") not in AnswerRange("127.0.0.2-127.0.0.11")
    assert ip("127.0.200.3") in AnswerRange("127.0.*.2-3")
    assert ip("127.0.200.1") not in AnswerRange("127.0.*.2-3")
    assert ip("127.0.0.2") in AnswerRange("127.0.0.2") and ip("127.0.0.3") not in AnswerRange("127.0.0.2")
    assert ip("127.1.2.3") in AnswerRange("127.0.0.0/8")
