"""MXResolver (geosmtp.relay.mx) against a real FakeDNS on loopback.

Every test gets its own FakeDNS and its own resolver (so its own TTL cache); dnspython runs
in plain threads here (the test process is not monkey-patched), with a 1 s timeout so a
hung name costs at most about a second.
"""
from __future__ import annotations

import random
import time

import pytest

from geosmtp.relay.errors import PermanentError, TransientError
from geosmtp.relay.mx import Host, MXResolver, literal_address, make_resolver
from tests.support.fakedns import FakeDNS

TIMEOUT = 1.0


@pytest.fixture
def dns():
    with FakeDNS() as d:
        yield d


def mx_resolver(dns: FakeDNS, shuffle=None) -> MXResolver:
    resolver = make_resolver([("127.0.0.1", dns.port)], timeout=TIMEOUT)
    return MXResolver(resolver) if shuffle is None else MXResolver(resolver, shuffle=shuffle)


def no_shuffle(items: list) -> None:
    """Keep equal-preference hosts in the order the answer gave them."""


def reverse(items: list) -> None:
    items.reverse()


def names(hosts: list[Host]) -> list[str]:
    return [h.name for h in hosts]


def reply_of(exc_info) -> tuple[int, str]:
    return exc_info.value.reply.code, exc_info.value.reply.enhanced


# -- MX order ---------------------------------------------------------------------------------
def test_mx_sorted_by_preference_with_addresses(dns):
    dns.mx("remote.test", [(30, "mx3.remote.test"), (10, "MX1.Remote.Test."), (20, "mx2.remote.test")])
    dns.a("mx1.remote.test", "127.0.0.10")
    dns.aaaa("mx1.remote.test", "::1")
    dns.a("mx2.remote.test", "127.0.0.11", "127.0.0.12")
    dns.a("mx3.remote.test", "127.0.0.13")
    hosts = mx_resolver(dns).hosts("remote.test")
    assert names(hosts) == ["mx1.remote.test", "mx2.remote.test", "mx3.remote.test"]  # lower-cased, no dot
    assert hosts[0].addresses == ("127.0.0.10", "::1")  # IPv4 first, then IPv6
    assert set(hosts[1].addresses) == {"127.0.0.11", "127.0.0.12"}
    assert hosts[0].label("127.0.0.10") == "mx1.remote.test[127.0.0.10]"


def test_domain_name_case_and_trailing_dot(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test")])
    dns.a("mx1.remote.test", "127.0.0.10")
    r = mx_resolver(dns)
    assert names(r.hosts("Remote.TEST.")) == ["mx1.remote.test"]


def test_equal_preferences_use_the_injected_shuffle(dns):
    dns.mx("remote.test", [(10, "a.remote.test"), (10, "b.remote.test"), (10, "c.remote.test"),
                           (5, "first.remote.test")])
    for name in ("a", "b", "c", "first"):
        dns.a(f"{name}.remote.test", "127.0.0.10")
    seen_groups: list[list[str]] = []

    def recording(items: list) -> None:
        seen_groups.append([x.to_text(omit_final_dot=True) for x in items])
        items.reverse()

    hosts = mx_resolver(dns, shuffle=recording).hosts("remote.test")
    # the shuffle is given each preference group (lowest first) and its order is kept
    assert len(seen_groups) == 2
    assert seen_groups[0] == ["first.remote.test"]
    group = seen_groups[1]
    assert sorted(group) == ["a.remote.test", "b.remote.test", "c.remote.test"]
    assert names(hosts) == ["first.remote.test", *reversed(group)]


def test_equal_preferences_shuffled_deterministically(dns):
    dns.mx("remote.test", [(10, "a.remote.test"), (10, "b.remote.test"), (20, "c.remote.test")])
    for name in ("a", "b", "c"):
        dns.a(f"{name}.remote.test", "127.0.0.10")
    plain = names(mx_resolver(dns, shuffle=no_shuffle).hosts("remote.test"))
    flipped = names(mx_resolver(dns, shuffle=reverse).hosts("remote.test"))
    assert sorted(plain[:2]) == ["a.remote.test", "b.remote.test"]
    assert flipped[:2] == plain[:2][::-1]
    assert plain[2] == flipped[2] == "c.remote.test"  # never mixed across preferences


def test_equal_preferences_random_shuffle_gives_both_orders(dns):
    dns.mx("remote.test", [(10, "a.remote.test"), (10, "b.remote.test"), (20, "c.remote.test")])
    for name in ("a", "b", "c"):
        dns.a(f"{name}.remote.test", "127.0.0.10")
    r = MXResolver(make_resolver([("127.0.0.1", dns.port)], timeout=TIMEOUT), shuffle=random.shuffle)
    orders = set()
    for _ in range(60):  # P(only one order in 60 tries) = 2 * 2**-60
        hosts = names(r.hosts("remote.test"))
        assert hosts[2] == "c.remote.test"
        orders.add(tuple(hosts[:2]))
        if len(orders) == 2:
            break
    assert orders == {("a.remote.test", "b.remote.test"), ("b.remote.test", "a.remote.test")}


def test_default_shuffle_is_random_shuffle(dns):
    r = MXResolver(make_resolver([("127.0.0.1", dns.port)], timeout=TIMEOUT))
    assert r.shuffle is random.shuffle


# -- implicit MX, NXDOMAIN, null MX -----------------------------------------------------------
def test_no_mx_uses_the_domains_own_a_and_aaaa(dns):
    dns.a("plain.test", "127.0.0.20")
    dns.aaaa("plain.test", "::1")
    [host] = mx_resolver(dns).hosts("Plain.Test")
    assert host == Host("plain.test", ("127.0.0.20", "::1"))
    assert ("plain.test", "MX") in dns.queries
    assert ("plain.test", "A") in dns.queries and ("plain.test", "AAAA") in dns.queries


def test_no_mx_aaaa_only(dns):
    dns.aaaa("six.test", "::1")
    assert mx_resolver(dns).hosts("six.test") == [Host("six.test", ("::1",))]


def test_no_mx_and_no_address_is_permanent(dns):
    dns.txt("txtonly.test", "v=spf1 -all")  # the name exists, but has neither MX nor A/AAAA
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).hosts("txtonly.test")
    assert reply_of(exc) == (550, "5.4.4")


def test_nxdomain_is_permanent_544(dns):
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).hosts("nowhere.test")
    assert reply_of(exc) == (550, "5.4.4")
    assert dns.queries == [("nowhere.test", "MX")]  # no A fallback for a name that does not exist


def test_null_mx_is_permanent_556(dns):
    dns.null_mx("nomail.test")
    dns.a("nomail.test", "127.0.0.20")  # an address must not be used as implicit MX (RFC 7505 3)
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).hosts("nomail.test")
    assert reply_of(exc) == (556, "5.1.10")
    assert ("nomail.test", "A") not in dns.queries


def test_dot_among_real_mx_is_ignored(dns):
    dns.mx("mixed.test", [(0, "."), (10, "mx1.remote.test")])
    dns.a("mx1.remote.test", "127.0.0.10")
    assert mx_resolver(dns).hosts("mixed.test") == [Host("mx1.remote.test", ("127.0.0.10",))]
    assert (".", "A") not in dns.queries and ("", "A") not in dns.queries


def test_mx_via_cname_target(dns):
    dns.mx("remote.test", [(10, "alias.remote.test")])
    dns.cname("alias.remote.test", "real.remote.test")
    dns.a("real.remote.test", "127.0.0.10")
    [host] = mx_resolver(dns).hosts("remote.test")
    assert host.addresses == ("127.0.0.10",)


# -- hosts without addresses ------------------------------------------------------------------
def test_mx_host_without_addresses_is_skipped(dns):
    dns.mx("remote.test", [(10, "ghost.remote.test"), (20, "noaddr.remote.test"),
                           (30, "mx3.remote.test"), (40, "six.remote.test")])
    # ghost: NXDOMAIN; noaddr: exists, no A/AAAA; six: AAAA only
    dns.txt("noaddr.remote.test", "hello")
    dns.a("mx3.remote.test", "127.0.0.13")
    dns.aaaa("six.remote.test", "::1")
    hosts = mx_resolver(dns).hosts("remote.test")
    assert hosts == [Host("mx3.remote.test", ("127.0.0.13",)), Host("six.remote.test", ("::1",))]


def test_all_mx_without_addresses_is_transient(dns):
    dns.mx("remote.test", [(10, "ghost1.remote.test"), (20, "ghost2.remote.test")])
    dns.txt("ghost2.remote.test", "exists, no address")
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).hosts("remote.test")
    assert reply_of(exc) == (451, "4.4.4")


# -- DNS trouble ------------------------------------------------------------------------------
def test_servfail_is_transient_443(dns):
    dns.servfail("broken.test")
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).hosts("broken.test")
    assert reply_of(exc) == (451, "4.4.3")


def test_servfail_on_the_only_mx_host_is_transient_443(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test")])
    dns.servfail("mx1.remote.test")
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).hosts("remote.test")
    assert reply_of(exc) == (451, "4.4.3")


def test_servfail_on_one_mx_host_falls_through_to_the_next(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test"), (20, "mx2.remote.test")])
    dns.servfail("mx1.remote.test")
    dns.a("mx2.remote.test", "127.0.0.11")
    assert mx_resolver(dns).hosts("remote.test") == [Host("mx2.remote.test", ("127.0.0.11",))]


def test_hang_is_transient_within_the_timeout(dns):
    dns.hang("slow.test")
    r = mx_resolver(dns)
    start = time.monotonic()
    with pytest.raises(TransientError) as exc:
        r.hosts("slow.test")
    elapsed = time.monotonic() - start
    assert reply_of(exc) == (451, "4.4.3")
    assert "Timeout" in str(exc.value.reply)
    assert elapsed < TIMEOUT + 1.0, elapsed


def test_hang_on_mx_host_is_transient_within_bounds(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test")])
    dns.hang("mx1.remote.test")
    start = time.monotonic()
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).hosts("remote.test")
    assert reply_of(exc) == (451, "4.4.3")
    assert time.monotonic() - start < TIMEOUT + 1.0


# -- the TTL cache ----------------------------------------------------------------------------
def test_repeated_lookup_is_answered_from_the_cache(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test")])
    dns.a("mx1.remote.test", "127.0.0.10")
    dns.aaaa("mx1.remote.test", "::1")
    r = mx_resolver(dns)
    first = r.hosts("remote.test")
    asked = list(dns.queries)
    assert sorted(asked) == [("mx1.remote.test", "A"), ("mx1.remote.test", "AAAA"), ("remote.test", "MX")]
    for _ in range(5):
        assert r.hosts("remote.test") == first
    assert dns.queries == asked


def test_negative_answers_are_cached(dns):
    dns.a("plain.test", "127.0.0.20")  # no MX: NOERROR/NODATA for MX, and no AAAA
    r = mx_resolver(dns)
    with pytest.raises(PermanentError):
        r.hosts("nowhere.test")  # NXDOMAIN
    assert r.hosts("plain.test") == [Host("plain.test", ("127.0.0.20",))]
    asked = list(dns.queries)
    assert ("nowhere.test", "MX") in asked and ("plain.test", "AAAA") in asked
    with pytest.raises(PermanentError):
        r.hosts("nowhere.test")
    assert r.hosts("plain.test") == [Host("plain.test", ("127.0.0.20",))]
    assert dns.queries == asked


def test_short_ttl_expires_and_is_asked_again(dns):
    dns.mx("remote.test", [(10, "mx1.remote.test")], ttl=1)
    dns.a("mx1.remote.test", "127.0.0.10", ttl=1)
    r = mx_resolver(dns)
    assert r.hosts("remote.test")[0].addresses == ("127.0.0.10",)
    n = dns.queries.count(("remote.test", "MX"))
    r.hosts("remote.test")
    assert dns.queries.count(("remote.test", "MX")) == n  # still cached
    dns.a("mx1.remote.test", "127.0.0.11", ttl=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # TTL 1 s: expired after at most about 2 s
        time.sleep(0.3)
        if r.hosts("remote.test")[0].addresses == ("127.0.0.11",):
            break
    else:
        pytest.fail("the 1 s TTL answer was never asked for again")
    assert dns.queries.count(("remote.test", "MX")) == n + 1


def test_short_negative_ttl_expires(dns):
    dns.negative_ttl = 1
    r = mx_resolver(dns)
    with pytest.raises(PermanentError):
        r.hosts("later.test")
    with pytest.raises(PermanentError):
        r.hosts("later.test")
    assert dns.queries.count(("later.test", "MX")) == 1
    dns.a("later.test", "127.0.0.20")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            assert r.hosts("later.test") == [Host("later.test", ("127.0.0.20",))]
            break
        except PermanentError:
            continue
    else:
        pytest.fail("the cached NXDOMAIN never expired")


def test_servfail_is_not_cached(dns):
    dns.servfail("flaky.test")
    r = mx_resolver(dns)
    with pytest.raises(TransientError):
        r.hosts("flaky.test")
    dns.remove("flaky.test")
    dns.mx("flaky.test", [(10, "mx1.remote.test")])
    dns.a("mx1.remote.test", "127.0.0.10")
    assert names(r.hosts("flaky.test")) == ["mx1.remote.test"]


# -- address literals and bad names -----------------------------------------------------------
@pytest.mark.parametrize("domain, address", [
    ("[127.0.0.1]", "127.0.0.1"),
    ("[IPv6:::1]", "::1"),
    ("[ipv6:2001:DB8::1]", "2001:db8::1"),
])
def test_address_literals_need_no_dns(dns, domain, address):
    assert mx_resolver(dns).hosts(domain) == [Host(domain, (address,))]
    assert dns.queries == []


@pytest.mark.parametrize("text, expected", [
    ("[127.0.0.1]", "127.0.0.1"),
    ("[IPv6:::1]", "::1"),
    ("[::1]", "::1"),  # tolerated without the tag
    ("127.0.0.1", None),
    ("[999.0.0.1]", None),
    ("[IPv6:nonsense]", None),
    ("[]", None),
])
def test_literal_address(text, expected):
    assert literal_address(text) == expected


@pytest.mark.parametrize("domain", [
    "a..b",
    "x" * 300 + ".test",  # a 300-character label
    "a" * 64 + ".test",  # 64 > the 63-octet label limit
    ".".join(["abcdefghi"] * 30),  # 299 characters: over the 255-octet name limit
])
def test_bad_names_are_permanent_512(dns, domain):
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).hosts(domain)
    assert reply_of(exc) == (550, "5.1.2")
    assert dns.queries == []


@pytest.mark.parametrize("domain", ["[999.0.0.1]", "[IPv6:nonsense]", "[]", "[127.0.0.1"])
def test_malformed_address_literal_is_a_bad_domain_without_dns(dns, domain):
    # (at a1cbdd4 "[999.0.0.1]" was looked up in DNS as a name and got 5.4.4)
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).hosts(domain)
    assert dns.queries == []
    assert reply_of(exc) == (550, "5.1.2")


# -- host(): a smarthost ----------------------------------------------------------------------
def test_host_by_name(dns):
    dns.a("smart.relay.test", "127.0.0.30")
    dns.aaaa("smart.relay.test", "::1")
    dns.mx("smart.relay.test", [(10, "elsewhere.test")])  # never asked: a smarthost has no MX
    host = mx_resolver(dns).host("Smart.Relay.Test")
    assert host == Host("smart.relay.test", ("127.0.0.30", "::1"))
    assert ("smart.relay.test", "MX") not in dns.queries


@pytest.mark.parametrize("name, address", [
    ("127.0.0.30", "127.0.0.30"),
    ("::1", "::1"),
    ("[127.0.0.31]", "127.0.0.31"),
    ("[IPv6:::1]", "::1"),
])
def test_host_by_ip_needs_no_dns(dns, name, address):
    assert mx_resolver(dns).host(name) == Host(name, (address,))
    assert dns.queries == []


def test_host_without_address_is_transient(dns):
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).host("gone.relay.test")
    assert reply_of(exc) == (451, "4.4.4")


def test_host_bad_name_is_permanent(dns):
    with pytest.raises(PermanentError) as exc:
        mx_resolver(dns).host("a..b")
    assert reply_of(exc) == (550, "5.1.2")


def test_host_servfail_is_transient(dns):
    dns.servfail("smart.relay.test")
    with pytest.raises(TransientError) as exc:
        mx_resolver(dns).host("smart.relay.test")
    assert reply_of(exc) == (451, "4.4.3")
