"""The "dmarc" check (RFC 9989) against a real DNS server (FakeDNS): a table of cases, each
cross-checked against the `dmarc` PyPI package where that package models the case.

The `dmarc` package (1.2.1) evaluates one record the caller found; it has no Tree Walk, no
psd= and no np=, and it aligns relaxed identifiers when one name is under the other (or
through a Public Suffix List). Where RFC 9989 says otherwise we follow the RFC; the cases
marked DIFFERS assert what the package answers, so the difference stays documented:

  * np= (policy for non-existent subdomains): the package applies sp=/p=.
  * psd=n makes a subdomain its own Organizational Domain: the package still aligns the
    parent's signature ("one name under the other").
  * a record without a valid p= but with a valid rua= is p=none (4.10.1): the package
    refuses the record (RecordSyntaxError).
"""
from __future__ import annotations

import io
import ipaddress

import dmarc as pkg
import dns.resolver
import pytest

from geosmtp.checks.authresults import format_header
from geosmtp.checks.dmarc import DMARCCheck, parse_record, walk_names
from geosmtp.checks.dns import DNS
from geosmtp.checks.interface import CheckContext, Facts
from geosmtp.checks.registry import validate_options
from tests.support.fakedns import FakeDNS


@pytest.fixture(scope="module")
def fake_dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def zone(fake_dns):
    fake_dns.clear()
    fake_dns.reset_queries()
    return fake_dns


def check(fake_dns, **options) -> DMARCCheck:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = fake_dns.port
    r.timeout = r.lifetime = 2.0
    return DMARCCheck(validate_options(DMARCCheck, options), CheckContext(hostname="mx.example.test", dns=DNS(r)))


def facts(header: bytes, spf=None, dkim=(), sender: str = "bounce@sender.test", spf_scope="mailfrom") -> Facts:
    results = {"dkim": [{"result": r, "domain": d, "selector": "s"} for r, d in dkim]}
    if spf is not None:
        results["spf"] = {"result": spf[0], "domain": spf[1], "scope": spf_scope}
    message = header + b"Subject: t\r\n\r\nbody\r\n"
    return Facts(phase="data", listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.1"), trusted=False,
                 hostname="mx.example.test", sender=sender, results=results, open_message=lambda: io.BytesIO(message))


# -- the table ---------------------------------------------------------------------------
# records: name -> TXT at _dmarc.<name> (a list: several records); exists: names given an A
# record; author: the From domain; spf/dkim: what the earlier checks found; want: (result,
# policy). pkg: None when the package has no notion of the case; else (the name whose record
# applies, org_domain to give it or None, {identifier: its Organizational Domain} as the
# package's "public suffix list", and DIFFERS: the package's (result, policy) when not ours).
SAME = None
CASES = {
    "spf relaxed aligned": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="example.test",
        spf=("pass", "bounce.example.test"), want=("pass", "reject"),
        pkg=("example.test", None, {"bounce.example.test": "example.test"}, SAME)),
    "dkim relaxed aligned, sibling names": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="news.example.test", exists=["news.example.test"],
        dkim=[("pass", "mail.example.test")], want=("pass", "reject"),
        pkg=("example.test", "example.test", {"mail.example.test": "example.test"}, SAME)),
    "nothing aligned": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="example.test",
        spf=("pass", "other.test"), dkim=[("pass", "other.test")], want=("fail", "reject"),
        pkg=("example.test", None, {}, SAME)),
    "aligned dkim that failed does not count": dict(
        records={"example.test": "v=DMARC1; p=quarantine"}, author="example.test",
        spf=("softfail", "example.test"), dkim=[("fail", "example.test"), ("permerror", "example.test")],
        want=("fail", "quarantine"), pkg=("example.test", None, {}, SAME)),
    "spf strict, subdomain": dict(
        records={"example.test": "v=DMARC1; p=reject; aspf=s"}, author="example.test",
        spf=("pass", "bounce.example.test"), want=("fail", "reject"),
        pkg=("example.test", None, {"bounce.example.test": "example.test"}, SAME)),
    "dkim strict, identical": dict(
        records={"example.test": "v=DMARC1; p=reject; adkim=s"}, author="example.test",
        dkim=[("pass", "EXAMPLE.test")], want=("pass", "reject"), pkg=("example.test", None, {}, SAME)),
    "dkim strict, subdomain": dict(
        records={"example.test": "v=DMARC1; p=reject; adkim=s"}, author="example.test",
        dkim=[("pass", "mail.example.test")], want=("fail", "reject"),
        pkg=("example.test", None, {"mail.example.test": "example.test"}, SAME)),
    "existing subdomain takes sp": dict(
        records={"example.test": "v=DMARC1; p=reject; sp=quarantine"}, author="news.example.test",
        exists=["news.example.test"], want=("fail", "quarantine"),
        pkg=("example.test", "example.test", {}, SAME)),
    "non-existent subdomain takes np": dict(
        records={"example.test": "v=DMARC1; p=none; sp=quarantine; np=reject"}, author="ghost.example.test",
        want=("fail", "reject"), pkg=("example.test", "example.test", {}, ("fail", "quarantine"))),  # DIFFERS
    "existing subdomain ignores np": dict(
        records={"example.test": "v=DMARC1; p=none; sp=quarantine; np=reject"}, author="news.example.test",
        exists=["news.example.test"], want=("fail", "quarantine"), pkg=("example.test", "example.test", {}, SAME)),
    "np without sp falls back to p for existing names": dict(
        records={"example.test": "v=DMARC1; p=quarantine; np=reject"}, author="www.example.test",
        exists=["www.example.test"], want=("fail", "quarantine"), pkg=("example.test", "example.test", {}, SAME)),
    "the Author Domain's own record takes p, not np": dict(
        records={"example.test": "v=DMARC1; p=quarantine; np=reject"}, author="example.test",
        want=("fail", "quarantine"), pkg=("example.test", None, {}, SAME)),
    "tree walk finds the policy four labels up": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="a.b.c.d.example.test", exists=["a.b.c.d.example.test"],
        dkim=[("pass", "example.test")], want=("pass", "reject"),
        pkg=("example.test", "example.test", {}, SAME)),
    "a record between is not the policy: the Organizational Domain's is": dict(
        records={"example.test": "v=DMARC1; p=reject", "mail.example.test": "v=DMARC1; p=none"},
        author="x.mail.example.test", exists=["x.mail.example.test"], want=("fail", "reject"),
        pkg=("example.test", "example.test", {}, SAME)),
    "psd=y: the name below the PSD is the Organizational Domain": dict(
        records={"test": "v=DMARC1; p=reject; psd=y"}, author="brand.test",
        dkim=[("pass", "mail.brand.test")], want=("pass", "reject"),
        pkg=("test", "test", {"mail.brand.test": "brand.test"}, SAME)),
    "psd=y: another registrant does not align": dict(
        records={"test": "v=DMARC1; p=reject; psd=y"}, author="brand.test",
        spf=("pass", "other.test"), dkim=[("pass", "brand.other.test")], want=("fail", "reject"),
        pkg=("test", "test", {"brand.other.test": "other.test"}, SAME)),
    "psd=y policy for a deep name takes sp": dict(
        records={"test": "v=DMARC1; p=reject; sp=quarantine; psd=y"}, author="shop.brand.test",
        exists=["shop.brand.test"], want=("fail", "quarantine"), pkg=("test", "test", {}, SAME)),
    "the PSD policy is not used when the Organizational Domain has a record": dict(
        records={"test": "v=DMARC1; p=reject; psd=y", "brand.test": "v=DMARC1; p=none"}, author="brand.test",
        want=("fail", "none"), pkg=("brand.test", None, {}, SAME)),
    "psd=n makes a subdomain its own Organizational Domain": dict(
        records={"example.test": "v=DMARC1; p=none", "mail.example.test": "v=DMARC1; p=reject; psd=n"},
        author="mail.example.test", dkim=[("pass", "example.test")], want=("fail", "reject"),
        pkg=("mail.example.test", None, {}, ("pass", None))),  # DIFFERS: no Tree Walk, no psd=
    "psd=n: two names under it align": dict(
        records={"mail.example.test": "v=DMARC1; p=reject; psd=n"}, author="x.mail.example.test",
        exists=["x.mail.example.test"], dkim=[("pass", "y.mail.example.test")], want=("pass", "reject"),
        pkg=("mail.example.test", "mail.example.test", {"y.mail.example.test": "mail.example.test"}, SAME)),
    "t=y lowers reject to quarantine": dict(
        records={"example.test": "v=DMARC1; p=reject; t=y"}, author="example.test", want=("fail", "quarantine"),
        pkg=("example.test", None, {}, SAME)),
    "t=y lowers quarantine to none": dict(
        records={"example.test": "v=DMARC1; p=quarantine; t=y"}, author="example.test", want=("fail", "none"),
        pkg=("example.test", None, {}, SAME)),
    "t=y with a pass": dict(
        records={"example.test": "v=DMARC1; p=reject; t=y"}, author="example.test",
        dkim=[("pass", "example.test")], want=("pass", "quarantine"), pkg=None),
    "pct= is gone in RFC 9989 and ignored with unknown tags": dict(
        records={"example.test": "v=DMARC1; p=reject; pct=0; foo=bar; ri=3600"}, author="example.test",
        want=("fail", "reject"), pkg=("example.test", None, {}, SAME)),
    "tags and values in any case, any order after v=": dict(
        records={"example.test": "v=DMARC1;ADKIM=S; P=Reject ;"}, author="example.test",
        dkim=[("pass", "mail.example.test")], want=("fail", "reject"), pkg=("example.test", None, {}, SAME)),
    "no record anywhere": dict(records={}, author="example.test", want=("none", "none"), pkg=None),
    "two records at one name are discarded": dict(
        records={"example.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}, author="example.test",
        want=("none", "none"), pkg=None),
    "two records at the Author Domain: the parent's applies": dict(
        records={"news.example.test": ["v=DMARC1; p=none", "v=DMARC1; p=none; adkim=s"],
                 "example.test": "v=DMARC1; p=reject"},
        author="news.example.test", exists=["news.example.test"], want=("fail", "reject"), pkg=None),
    "a record not starting with v=DMARC1 is ignored": dict(
        records={"example.test": ["p=reject; v=DMARC1", "v=spf1 -all", "v=dmarc1; p=reject"]}, author="example.test",
        want=("none", "none"), pkg=None),
    "no valid p= but a valid rua= is p=none": dict(
        records={"example.test": "v=DMARC1; p=bounce; rua=mailto:d@example.test"}, author="example.test",
        want=("fail", "none"), pkg=("example.test", None, {}, "refused")),  # DIFFERS: RecordSyntaxError
    "no p= and no rua=: no DMARC processing": dict(
        records={"example.test": "v=DMARC1; sp=reject"}, author="example.test", want=("permerror", "none"),
        pkg=None),
    "invalid sp= with a valid rua= is p=none for all": dict(
        records={"example.test": "v=DMARC1; p=reject; sp=maybe; rua=mailto:d@example.test"}, author="example.test",
        want=("fail", "none"), pkg=None),
    "SPF of the HELO identity counts for the null sender": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="example.test", spf=("pass", "mx.example.test"),
        spf_scope="helo", sender="", want=("pass", "reject"), pkg=None),
    "SPF of the HELO identity does not count otherwise": dict(
        records={"example.test": "v=DMARC1; p=reject"}, author="example.test", spf=("pass", "mx.example.test"),
        spf_scope="helo", want=("fail", "reject"), pkg=None),
    "an IDN From domain is compared as A-labels": dict(
        records={"xn--bcher-kva.test": "v=DMARC1; p=reject"}, author="bücher.test",
        dkim=[("pass", "xn--bcher-kva.test")], want=("pass", "reject"), pkg=None),
}


def load(zone, case) -> None:
    for name, texts in case["records"].items():
        zone.txt(f"_dmarc.{name}", *([texts] if isinstance(texts, str) else texts))
    for name in case.get("exists", []):
        zone.a(name, "192.0.2.25")


def header_for(author: str) -> bytes:
    return f"From: Someone <someone@{author}>\r\n".encode()


def ours(zone, case, **options):
    f = facts(header_for(case["author"]), spf=case.get("spf"), dkim=case.get("dkim", ()),
              sender=case.get("sender", "bounce@sender.test"), spf_scope=case.get("spf_scope", "mailfrom"))
    return check(zone, **options).data(f)


class FakePSL:
    """The `dmarc` package's public suffix list hook: the test's Organizational Domains."""

    def __init__(self, orgs):
        self.orgs = orgs

    def get_public_suffix(self, domain):
        return self.orgs.get(domain, domain)


def package_says(case) -> tuple[str, str] | str:
    applied, org, orgs, _ = case["pkg"]
    record = case["records"][applied]
    try:
        policy = pkg.DMARCPolicy(record=record, domain=case["author"], org_domain=org, publicsuffix=FakePSL(orgs))
    except pkg.RecordSyntaxError:
        return "refused"
    ars = []
    if case.get("spf"):
        ars.append(pkg.SPFAuthResult(case["spf"][1], pkg.SPFResult(case["spf"][0])))
    for result, domain in case.get("dkim", ()):
        ars.append(pkg.DKIMAuthResult(domain, pkg.DKIMResult(result)))
    try:
        policy.verify(auth_results=ars, allow_policy_test_mode=True)
    except pkg.PolicyError:
        pass
    disposition = policy.result.disposition.value
    if policy.result.result is pkg.DMARCResult.PASS:
        return "pass", None
    return policy.result.result.value, disposition


@pytest.mark.parametrize("name", list(CASES))
def test_case(zone, name):
    case = CASES[name]
    load(zone, case)
    verdict = ours(zone, case, enforce=False)
    assert verdict.action == "accept"
    got = verdict.results["dmarc"]
    assert (got["result"], got["policy"]) == case["want"], got
    (auth,) = verdict.auth
    assert auth.method == "dmarc" and auth.result == case["want"][0]
    if case["pkg"] is not None:
        differs = case["pkg"][3]
        theirs = package_says(case)
        if differs is SAME:
            if case["want"][0] == "pass":  # on a pass the package reports disposition none, not the policy
                assert theirs == ("pass", None), theirs
            else:
                assert theirs == case["want"], theirs
        else:
            assert theirs == differs, theirs


def test_case_properties_in_the_header(zone):
    load(zone, CASES["non-existent subdomain takes np"])
    v = ours(zone, CASES["non-existent subdomain takes np"], enforce=False)
    assert format_header("mx.example.test", v.auth) == (
        "mx.example.test;\r\n\tdmarc=fail header.from=ghost.example.test policy.dmarc=reject")


def test_t_y_is_said_in_the_reason(zone):
    load(zone, CASES["t=y lowers reject to quarantine"])
    v = ours(zone, CASES["t=y lowers reject to quarantine"])
    assert v.action == "quarantine"
    assert v.auth[0].reason == "t=y: reject tested as quarantine"


# -- the Tree Walk itself -----------------------------------------------------------------
def test_walk_names_follow_the_rfc_example():
    assert walk_names("a.b.c.d.e.f.g.h.i.j.mail.example.com") == [
        "a.b.c.d.e.f.g.h.i.j.mail.example.com", "g.h.i.j.mail.example.com", "h.i.j.mail.example.com",
        "i.j.mail.example.com", "j.mail.example.com", "mail.example.com", "example.com", "com"]
    assert walk_names("a.mail.example.com") == ["a.mail.example.com", "mail.example.com", "example.com", "com"]
    assert len(walk_names("l1.l2.l3.l4.l5.l6.l7.l8")) == 8
    assert walk_names("com") == ["com"]


def test_walk_of_a_long_name_asks_at_most_eight_questions(zone):
    author = ".".join(f"l{i}" for i in range(1, 40)) + ".example.test"
    zone.txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
    v = check(zone).data(facts(header_for(author)))
    assert v.action == "quarantine" and v.results["dmarc"]["policy"] == "quarantine"
    asked = [q for q, t in zone.queries if t == "TXT"]
    assert asked == [f"_dmarc.{n}" for n in walk_names(author)] and len(asked) == 8


def test_walk_stops_at_psd(zone):
    zone.txt("_dmarc.mail.example.test", "v=DMARC1; p=reject; psd=n")
    zone.txt("_dmarc.example.test", "v=DMARC1; p=none")
    check(zone, enforce=False).data(facts(header_for("a.mail.example.test")))
    assert [q for q, t in zone.queries if t == "TXT"] == ["_dmarc.a.mail.example.test", "_dmarc.mail.example.test"]


def test_record_parsing_edges():
    assert parse_record("v=DMARC1") is not None and not parse_record("v=DMARC1").usable
    assert parse_record("v = DMARC1 ; p = reject").p == "reject"
    assert parse_record("V=DMARC1; p=reject") is None  # the tag is "v"
    assert parse_record(" v=DMARC1; p=reject") is None
    assert parse_record("v=DMARC10; p=reject") is None
    r = parse_record("v=DMARC1; p=reject; adkim=x; aspf=S; t=maybe; psd=Y; p=none")
    assert (r.p, r.adkim, r.aspf, r.testing, r.psd) == ("reject", "r", "s", False, "y")  # first p= wins


# -- whole messages ---------------------------------------------------------------------
def test_reject_is_550_naming_dmarc_and_the_domain(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    v = check(zone).data(facts(header_for("example.test"), spf=("pass", "other.test")))
    assert v.action == "reject"
    assert (v.reply.code, v.reply.enhanced) == (550, "5.7.1")
    assert "DMARC" in v.reply.text and "example.test" in v.reply.text


def test_quarantine_says_why(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
    v = check(zone).data(facts(header_for("example.test")))
    assert v.action == "quarantine" and v.reason == "DMARC policy quarantine for example.test"


def test_enforce_false_only_records(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    v = check(zone, enforce=False).data(facts(header_for("example.test")))
    assert v.action == "accept" and v.results["dmarc"] == {"result": "fail", "policy": "reject",
                                                            "domain": "example.test"}


def test_absent_spf_and_dkim_results_are_none(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    f = Facts(phase="data", listener="mx", mode="smtp", ip=ipaddress.ip_address("192.0.2.1"), trusted=False,
              hostname="mx", open_message=lambda: io.BytesIO(b"From: a@example.test\r\n\r\n"))
    assert check(zone).data(f).action == "reject"


def test_several_from_domains_the_strictest_failing_policy_wins(zone):
    zone.txt("_dmarc.good.test", "v=DMARC1; p=reject")
    zone.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    zone.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    v = check(zone).data(facts(b"From: a@good.test, b@shop.test, Bank <ceo@bank.test>\r\n",
                               dkim=[("pass", "good.test")]))
    assert v.action == "reject" and "bank.test" in v.reply.text
    assert [(a.result, dict(a.properties)["header.from"]) for a in v.auth] == [
        ("pass", "good.test"), ("fail", "shop.test"), ("fail", "bank.test")]


def test_an_address_in_the_display_name_is_not_the_author(zone):
    zone.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    v = check(zone).data(facts(b'From: "ceo@bank.test" <x@evil.test> (ceo@bank.test)\r\n'))
    assert [dict(a.properties)["header.from"] for a in v.auth] == ["evil.test"]


def test_a_second_from_field_is_evaluated_too(zone):
    zone.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    v = check(zone).data(facts(b"From: me@mine.test\r\nFrom: ceo@bank.test\r\n", dkim=[("pass", "mine.test")]))
    assert v.action == "reject" and v.results["dmarc"]["domain"] == "bank.test"


def test_same_domain_twice_is_one_author_domain(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    v = check(zone).data(facts(b"From: a@example.test, B <b@EXAMPLE.test>\r\n", dkim=[("pass", "example.test")]))
    assert v.action == "accept" and len(v.auth) == 1


def test_too_many_from_domains_is_incomplete(zone):
    header = ("From: " + ", ".join(f"u@d{i}.test" for i in range(8)) + "\r\n").encode()
    v = check(zone, max_author_domains=3).data(facts(header))
    assert [a.result for a in v.auth] == ["none", "none", "none", "permerror"]
    assert v.auth[-1].reason == "From has 8 domains, only 3 evaluated"
    assert v.action == "accept" and v.results["dmarc"]["result"] == "permerror"


@pytest.mark.parametrize("header, why", [
    (b"To: x@example.test\r\n", "no From header field"),
    (b"From: not an address\r\n", "no domain in From"),
    (b"From: <>\r\n", "no domain in From"),
    (b"From: a@[192.0.2.1]\r\n", "no domain in From"),
    (b"From: a@exa\x00mple.test\r\n", "no domain in From"),
    (b"From: a@" + b"x" * 300 + b".test\r\n", "no domain in From"),
    (b"From: undisclosed-recipients:;\r\n", "no domain in From"),
])
def test_no_usable_from_is_permerror_never_a_crash(zone, header, why):
    v = check(zone).data(facts(header))
    assert v.action == "accept"
    assert [(a.result, a.reason, a.properties) for a in v.auth] == [("permerror", why, ())]
    assert v.results["dmarc"] == {"result": "permerror", "policy": "none", "domain": ""}


def test_dns_trouble_is_temperror_accepted_or_deferred(zone):
    zone.servfail("_dmarc.example.test")
    v = check(zone).data(facts(header_for("example.test")))
    assert v.action == "accept" and v.results["dmarc"]["result"] == "temperror"
    v = check(zone, temperror="defer").data(facts(header_for("example.test")))
    assert v.action == "defer" and (v.reply.code, v.reply.enhanced) == (451, "4.4.3")


def test_temperror_on_the_walk_above_is_temperror(zone):
    zone.servfail("_dmarc.test")  # the walk from a name without a record reaches it
    v = check(zone).data(facts(header_for("example.test")))
    assert v.results["dmarc"]["result"] == "temperror"


def test_trouble_above_a_found_record_matters_only_when_the_walk_is_needed(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    zone.servfail("_dmarc.test")
    v = check(zone).data(facts(header_for("example.test"), dkim=[("pass", "example.test")]))
    assert v.results["dmarc"]["result"] == "pass"  # identical: no Organizational Domain needed
    assert ("_dmarc.test", "TXT") not in zone.queries
    v = check(zone).data(facts(header_for("example.test"), dkim=[("pass", "mail.example.test")]))
    assert v.results["dmarc"]["result"] == "temperror"  # relaxed: the walk is needed, and fails


def test_temperror_for_one_identifier_does_not_hide_another_aligned(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    zone.servfail("_dmarc.mail.example.test")
    v = check(zone).data(facts(header_for("example.test"), spf=("pass", "mail.example.test"),
                               dkim=[("pass", "example.test")]))
    assert v.results["dmarc"]["result"] == "pass"
    v = check(zone).data(facts(header_for("example.test"), spf=("pass", "mail.example.test")))
    assert v.results["dmarc"]["result"] == "temperror" and v.action == "accept"


def test_np_existence_check_temperror(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=none; np=reject")
    zone.servfail("ghost.example.test")
    v = check(zone).data(facts(header_for("ghost.example.test")))
    assert v.results["dmarc"]["result"] == "temperror"


def test_hostile_record_text_never_reaches_the_header(zone):
    zone.txt("_dmarc.example.test", "v=DMARC1; p=reject\r\nX-Evil: 1; sp=\x00")
    v = check(zone, enforce=False).data(facts(header_for("news.example.test")))
    header = format_header("mx.example.test", v.auth)
    assert "X-Evil" not in header and "\x00" not in header


def test_options():
    assert validate_options(DMARCCheck, {}) == {"enforce": True, "temperror": "accept", "max_author_domains": 5}
    with pytest.raises(Exception, match="temperror"):
        validate_options(DMARCCheck, {"temperror": "reject"})




@pytest.mark.parametrize("value", ["alice@victim.test@attacker.test", "<alice@victim.test@attacker.test>",
                                   '"\\" <alice@victim.test>'])
def test_an_ambiguous_from_is_refused_not_judged_on_another_domain(value):
    """A reader shows victim.test, a parser would take attacker.test (or nothing): with
    enforce the message is refused (RFC 7489 6.6.1), without it recorded as permerror."""
    from geosmtp.checks.dmarc import ambiguous_from
    assert ambiguous_from([value])
    assert not ambiguous_from(["Alice <alice@victim.test>"]) and not ambiguous_from(["undisclosed"])
