"""The greylist check and its memory store, on an injected clock (no sleeping)."""
from __future__ import annotations

import ipaddress

import pytest

from geosmtp.checks import registry
from geosmtp.checks.greylist import GreyEntry, GreylistCheck, MemoryGreylistStore, triplet
from geosmtp.checks.interface import ACCEPT, DEFER, CheckContext, Facts, phases_of

IP = "192.0.2.30"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make(clock, **options) -> GreylistCheck:
    return GreylistCheck(registry.validate_options(GreylistCheck, options), CheckContext("mx.ours.test", None),
                         clock=clock)


def facts(phase="rcpt", ip=IP, sender="Alice@Sender.test", recipient="bob@ours.test", results=None, **kw):
    return Facts(phase=phase, listener="mx", mode="smtp", ip=ipaddress.ip_address(ip), trusted=False,
                 hostname="mx.ours.test", sender=sender, recipient=recipient, results=results or {}, **kw)


def deferred_for(v) -> int:
    assert v is not None and v.action == DEFER and (v.reply.code, v.reply.enhanced) == (451, "4.7.1"), v
    words = v.reply.text.split()
    assert words[:4] == ["Greylisted,", "try", "again", "in"] and words[-1] == ("second" if words[4] == "1" else "seconds"), v.reply.text
    return int(words[4])


def test_a_retry_before_the_delay_is_refused_after_it_passes_and_then_keeps_passing(clock):
    check = make(clock, delay="5m")
    assert deferred_for(check.rcpt(facts())) == 300
    clock.now += 100
    assert deferred_for(check.rcpt(facts())) == 200  # still refused; the first try is not reset
    clock.now += 200
    assert check.rcpt(facts()) is None
    for _ in range(3):  # known now: no delay on the next messages
        clock.now += 86400
        assert check.rcpt(facts()) is None


def test_the_triplet_is_network_sender_recipient(clock):
    check = make(clock, delay="1m")
    check.rcpt(facts())
    clock.now += 61
    assert check.rcpt(facts(ip="192.0.2.200", sender="alice@SENDER.TEST", recipient="BOB@ours.test")) is None
    assert deferred_for(check.rcpt(facts(ip="192.0.3.30"))) == 60  # another /24
    assert deferred_for(check.rcpt(facts(sender="carol@sender.test"))) == 60
    assert deferred_for(check.rcpt(facts(recipient="dave@ours.test"))) == 60


def test_ipv6_triplets_are_per_64_and_the_null_sender_is_empty(clock):
    check = make(clock, delay="1m")
    deferred_for(check.rcpt(facts(ip="2001:db8:1:2::1", sender="")))
    clock.now += 61
    assert check.rcpt(facts(ip="2001:db8:1:2:ffff::9", sender="")) is None
    assert deferred_for(check.rcpt(facts(ip="2001:db8:1:3::1", sender=""))) == 60
    assert triplet(ipaddress.ip_address("2001:db8:1:2::1"), "", "B@x") == "2001:db8:1:2::/64 0: b@x"
    assert triplet(ipaddress.ip_address(IP), "A b@x", "c") == "192.0.2.0/24 5:a b@x c"


def test_a_retry_after_the_window_starts_over(clock):
    check = make(clock, delay="5m", retry_window="1h")
    check.rcpt(facts())
    clock.now += 3601
    assert deferred_for(check.rcpt(facts())) == 300
    clock.now += 301
    assert check.rcpt(facts()) is None


def test_a_passed_triplet_is_forgotten_lifetime_after_its_last_pass(clock):
    check = make(clock, delay="5m", lifetime="10d")
    check.rcpt(facts())
    clock.now += 300
    assert check.rcpt(facts()) is None
    clock.now += 9 * 86400
    assert check.rcpt(facts()) is None  # refreshed here
    clock.now += 9 * 86400
    assert check.rcpt(facts()) is None
    clock.now += 10 * 86400 + 1
    assert deferred_for(check.rcpt(facts())) == 300


def test_whitelisted_networks_and_spf_passing_domains(clock):
    check = make(clock, networks=["192.0.2.0/25", "2001:db8::/32"], sender_domains=["Sender.test"])
    assert check.rcpt(facts(ip="192.0.2.1")) is None
    assert check.rcpt(facts(ip="2001:db8:ff::1")) is None
    spf = {"result": "pass", "domain": "mail.sender.test", "scope": "mailfrom"}
    assert check.rcpt(facts(ip="198.51.100.1", results={"spf": spf})) is None
    for bad in ({**spf, "result": "softfail"}, {**spf, "domain": "notsender.test"}):
        deferred_for(check.rcpt(facts(ip="198.51.100.1", results={"spf": bad})))


def test_an_allow_listed_client_is_not_greylisted_unless_told(clock):
    results = {"dnsbl": {"score": 0.0, "listed": ["list.dnswl.test"], "allowed": "list.dnswl.test"}}
    assert make(clock).rcpt(facts(results=results)) is None
    deferred_for(make(clock, dnswl=False).rcpt(facts(results=results)))


def test_without_dkim_domains_there_is_no_data_phase(clock):
    assert phases_of(make(clock)) == ("rcpt",)
    assert phases_of(make(clock, dkim_domains=["sender.test"])) == ("rcpt", "data")


def test_dkim_domains_decide_at_data(clock):
    check = make(clock, delay="5m", dkim_domains=["sender.test"])
    v = check.rcpt(facts())
    assert v.action == ACCEPT and v.results["greylist"] == {"pending": ["bob@ours.test"], "wait": 300}
    v2 = check.rcpt(facts(recipient="carol@ours.test", results=v.results))
    state = v2.results
    assert state["greylist"]["pending"] == ["bob@ours.test", "carol@ours.test"]
    passing = {**state, "dkim": [{"result": "fail", "domain": "sender.test", "selector": "s"},
                                 {"result": "pass", "domain": "news.sender.test", "selector": "s"}]}
    assert check.data(facts("data", results=passing)) is None
    for dkim in ([], [{"result": "pass", "domain": "other.test", "selector": "s"}],
                 [{"result": "fail", "domain": "sender.test", "selector": "s"}]):
        assert deferred_for(check.data(facts("data", results={**state, "dkim": dkim}))) == 300
    assert check.data(facts("data", results={"dkim": []})) is None  # nobody was greylisted
    clock.now += 300  # the retry: both triplets were recorded at RCPT
    assert check.rcpt(facts()) is None and check.rcpt(facts(recipient="carol@ours.test")) is None


def test_memory_store_expires_and_is_bounded_keeping_passed_triplets(clock):
    store = MemoryGreylistStore(max_entries=3, clock=clock)
    store.put("passed", GreyEntry(1.0, 2.0), 1000)
    for i in range(10):
        store.put(f"new{i}", GreyEntry(clock.now), 100)
    assert len(store) == 3
    assert store.get("passed") == GreyEntry(1.0, 2.0)  # a flood of new triplets did not push it out
    assert store.get("new9") == GreyEntry(clock.now) and store.get("new0") is None
    clock.now += 101
    assert store.get("new9") is None and store.get("passed") is not None
    clock.now += 1000
    assert store.get("passed") is None
    store.put("x", GreyEntry(clock.now), 10)
    assert len(store) == 1  # expired entries swept on put


def test_bad_settings_are_refused():
    for options in ({"networks": ["192.0.2.0/33"]}, {"sender_domains": ["not a domain"]},
                    {"delay": "soon"}, {"max_entries": 0}, {"whitelist": []}):
        with pytest.raises(registry.CheckError):
            registry.validate_options(GreylistCheck, options)


def test_a_file_store_is_shared_by_processes_and_outlives_them(tmp_path, clock):
    """Two checks on one store_file are two worker processes: a retry that reaches the other
    one passes after the delay, and a new check (a restart) still knows the triplet."""
    path = str(tmp_path / "greylist.sqlite")
    one, two = make(clock, delay="5m", store_file=path), make(clock, delay="5m", store_file=path)
    assert deferred_for(one.rcpt(facts())) == 300
    clock.now += 100
    assert deferred_for(two.rcpt(facts())) == 200  # the other process knows the first try
    clock.now += 200
    assert two.rcpt(facts()) is None
    assert make(clock, store_file=path).rcpt(facts()) is None  # after a restart: known


def test_the_file_store_expires_rows_and_sweeps_them(tmp_path, clock):
    import sqlite3

    from geosmtp.checks.greylist import FileGreylistStore

    store = FileGreylistStore(tmp_path / "g.sqlite", clock=clock)
    store.put("a", GreyEntry(clock.now), 10)
    store.put("b", GreyEntry(clock.now, clock.now), 1000)
    assert store.get("a") == GreyEntry(clock.now) and store.get("b").passed == clock.now
    clock.now += 11
    assert store.get("a") is None
    store.put("c", GreyEntry(clock.now), 10)  # a put removes what has expired
    rows = sqlite3.connect(tmp_path / "g.sqlite").execute("SELECT key FROM triplet ORDER BY key").fetchall()
    assert rows == [("b",), ("c",)]


def test_a_file_store_that_cannot_be_opened_raises_for_on_error(tmp_path, clock):
    check = make(clock, store_file=str(tmp_path / "no" / "such" / "dir" / "g.sqlite"))
    with pytest.raises(Exception):
        check.rcpt(facts())
