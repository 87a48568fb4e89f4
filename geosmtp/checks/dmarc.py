"""The "dmarc" check (RFC 9989, which obsoletes RFC 7489): the RFC5322.From domain's policy,
found by the DNS Tree Walk, applied to the SPF and DKIM results of the checks before it.

Policy discovery and Organizational Domains both come from the Tree Walk of section 4.10, never
from a Public Suffix List: _dmarc.<name> is asked for the name and then its parents (a name of
more than 8 labels jumps to its last 7 at the second query, so a walk is at most 8 queries),
stopping at a record with psd=y or psd=n. From the records found, 4.10.2 picks the
Organizational Domain: the first (longest) with psd=n; else one label below a psd=y record
(not the starting name's own); else the shortest name with a record; else the name itself.
The policy is the Author Domain's own record (p=), else its Organizational Domain's, else its
Public Suffix Domain's (sp=, or np= when the Author Domain does not exist: NXDOMAIN, RFC 8020).

Alignment: a DKIM pass (results["dkim"]) or an SPF pass of the MAIL FROM identity
(results["spf"]) whose domain is the Author Domain (adkim/aspf=s) or has the same
Organizational Domain (=r, the default). t=y lowers the policy by one step (4.7). A From
with several domains is evaluated per domain and the strictest failing policy wins (11.5); no
From domain at all gives permerror. DNS trouble gives temperror: accepted (fail open) or 451,
as `temperror` says. No reports are sent.
"""
from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import dns.exception
import dns.resolver
from pydantic import BaseModel, ConfigDict, Field

from geosmtp.checks.dns import BadName, TempError
from geosmtp.checks.interface import AuthResult, Check, Facts, Verdict, safe_text
from geosmtp.memo import short_text_memo

POLICIES = ("none", "quarantine", "reject")  # in order of strictness
MAX_LABELS = 8  # 4.10: at most this many queries per walk
_VERSION = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")  # "DMARC1" is case-sensitive
_TAG = re.compile(r"[ \t]*([A-Za-z]+)[ \t]*=[ \t]*([\x20-\x3a\x3c-\x7e]*?)[ \t]*")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+(?:![0-9]+[kmgt]?)?")
_HOSTNAME = re.compile(r"[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_\-]{0,61}[a-z0-9_])?)*")


class DMARCOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enforce: bool = True  # p=reject → 550 5.7.1, p=quarantine → hold/; False: only recorded
    temperror: Literal["accept", "defer"] = "accept"  # DNS trouble: deliver, or 451 4.4.3
    max_author_domains: int = Field(5, ge=1, le=20)  # From domains evaluated (RFC 9989 11.5)


# -- the record --------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """A DMARC Policy Record as section 4.7 reads it (defaults filled in). `usable` is False
    when p= is missing or invalid (or sp=/np= invalid) and no rua= URI is valid: then no
    DMARC processing applies (4.10.1)."""

    p: str = "none"
    sp: str | None = None
    np: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    testing: bool = False
    psd: str = "u"
    usable: bool = True


@short_text_memo()  # Records are frozen: the same few policies come with every message
def parse_record(text: str) -> Record | None:
    """The record, or None when the text is not a DMARC record (v=DMARC1 is not first)."""
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        m = _TAG.fullmatch(part)
        if m and m.group(2):  # a syntax error is discarded (4.8); unknown tags are ignored
            tags.setdefault(m.group(1).lower(), m.group(2))

    def choice(name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
        value = tags.get(name)
        return value.lower() if value is not None and value.lower() in allowed else default

    p, sp, np = (choice(t, POLICIES, None) for t in ("p", "sp", "np"))
    invalid = p is None or ("sp" in tags and sp is None) or ("np" in tags and np is None)
    if invalid:
        rua_ok = any(_URI.fullmatch(u.strip()) for u in tags.get("rua", "").split(","))
        if not rua_ok:
            return Record(usable=False, psd=choice("psd", ("y", "n", "u"), "u"))
        p, sp, np = "none", None, None  # "act as if a record containing p=none was retrieved"
    return Record(p=p, sp=sp, np=np, adkim=choice("adkim", ("r", "s"), "r"), aspf=choice("aspf", ("r", "s"), "r"),
                  testing=choice("t", ("y", "n"), "n") == "y", psd=choice("psd", ("y", "n", "u"), "u"))


# -- the DNS Tree Walk -------------------------------------------------------------------
def walk_names(domain: str) -> list[str]:
    """The names a Tree Walk from `domain` asks, in order (4.10 steps 3-7): at most 8."""
    labels = domain.split(".")
    names = [domain]
    n = MAX_LABELS - 1 if len(labels) >= MAX_LABELS else len(labels) - 1
    while n >= 1:
        names.append(".".join(labels[-n:]))
        n -= 1
    return names


def subdomain_of(name: str, parent: str) -> bool:
    return name.endswith("." + parent)


class TreeWalker:
    """Tree Walks for one message, asking each _dmarc name at most once."""

    def __init__(self, dns):
        self.dns = dns
        self.asked: dict[str, Record | None] = {}

    def record_at(self, name: str) -> Record | None:
        """The one DMARC record at _dmarc.<name>; None when there is none, or several (4.10
        step 2). TempError when DNS cannot say now."""
        if name not in self.asked:
            try:
                texts = self.dns.txt(f"_dmarc.{name}")
            except BadName:  # too long with the prefix: nothing can be published there
                texts = []
            records = [r for r in (parse_record(t.decode("utf-8", "replace")) for t in texts) if r is not None]
            self.asked[name] = records[0] if len(records) == 1 else None
        return self.asked[name]

    def walk(self, domain: str) -> list[tuple[str, Record]]:
        """The records a Tree Walk from `domain` finds, longest name first; it stops at a
        record with psd=y or psd=n."""
        found = []
        for name in walk_names(domain):
            record = self.record_at(name)
            if record is not None:
                found.append((name, record))
                if record.psd in ("y", "n"):
                    break
        return found

    def organizational_domain(self, domain: str, found: list[tuple[str, Record]] | None = None) -> str:
        """4.10.2: the Organizational Domain of `domain`."""
        found = self.walk(domain) if found is None else found
        labels = domain.split(".")
        for name, record in found:  # longest to shortest
            if record.psd == "n":
                return name
            if record.psd == "y" and name != domain:
                return ".".join(labels[-(name.count(".") + 2):])
        return found[-1][0] if found else domain


# -- one Author Domain -------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    domain: str
    result: str  # pass | fail | none | temperror | permerror
    policy: str = "none"  # the policy evaluated (after sp/np and t=y)
    reason: str = ""

    def auth(self) -> AuthResult:
        props = [("header.from", self.domain)] if self.domain else []
        if self.result in ("pass", "fail"):
            props.append(("policy.dmarc", self.policy))
        return AuthResult("dmarc", self.result, tuple(props), safe_text(self.reason, 200) or None)

    def fact(self) -> dict:
        return {"result": self.result, "policy": self.policy, "domain": self.domain}


def lowered(policy: str) -> str:
    """t=y: one level below (reject → quarantine, quarantine → none, none stays)."""
    return POLICIES[max(POLICIES.index(policy) - 1, 0)]


def domain_exists(dns_, domain: str) -> bool:
    """RFC 8020: NXDOMAIN means the name and everything under it do not exist."""
    try:
        dns_.resolver.resolve(dns_.name(domain), "A", search=False)
    except dns.resolver.NXDOMAIN:
        return False
    except dns.resolver.NoAnswer:
        return True
    except dns.exception.DNSException as exc:
        raise TempError(f"{domain} A: {type(exc).__name__}") from None
    return True


def evaluate(dns_, walker: TreeWalker, author: str, spf: str | None, dkim: list[str]) -> Outcome:
    """DMARC for one Author Domain given the SPF-authenticated domain and the DKIM
    signing domains that passed."""
    try:  # the Author Domain's own record first: with it, the walk above waits until needed
        own = walker.record_at(author)
        found = None if own is not None else walker.walk(author)
    except TempError as exc:
        return Outcome(author, "temperror", reason=f"policy lookup: {exc}")
    if own is not None:
        policy_domain, record = author, own
    else:
        records = dict(found)
        org = walker.organizational_domain(author, found)
        psd = next(((n, r) for n, r in found if r.psd == "y"), None)
        if org != author and org in records:
            policy_domain, record = org, records[org]
        elif psd is not None and subdomain_of(author, psd[0]):
            policy_domain, record = psd
        else:
            return Outcome(author, "none")
    if not record.usable:
        return Outcome(author, "permerror", reason=f"_dmarc.{policy_domain}: no valid p= and no valid rua=")

    if policy_domain == author:
        policy = record.p
    else:
        policy = record.sp or record.p
        if record.np is not None and record.np != policy:
            try:
                if not domain_exists(dns_, author):
                    policy = record.np
            except TempError as exc:
                return Outcome(author, "temperror", reason=f"existence of the author domain: {exc}")
    reason = ""
    if record.testing and policy != "none":
        reason = f"t=y: {policy} tested as {lowered(policy)}"
        policy = lowered(policy)

    try:
        aligned = align(walker, author, found, spf, record.aspf, dkim, record.adkim)
    except TempError as exc:
        return Outcome(author, "temperror", policy, f"alignment: {exc}")
    if aligned:
        return Outcome(author, "pass", policy, reason)
    return Outcome(author, "fail", policy, reason)


def align(walker: TreeWalker, author: str, found, spf: str | None, aspf: str, dkim: list[str], adkim: str) -> bool:
    """Whether one authenticated identifier is aligned with the Author Domain. Identical
    names are tried before any Tree Walk; a TempError is raised only when no identifier
    aligned and one could not be decided."""
    candidates = [(d, adkim) for d in dkim] + ([(spf, aspf)] if spf else [])
    if any(d == author for d, _ in candidates):
        return True
    relaxed = [d for d, mode in candidates if mode == "r"]
    if not relaxed:
        return False
    org = walker.organizational_domain(author, found)
    undecided = None
    for d in dict.fromkeys(relaxed):
        if d != org and not subdomain_of(d, org):
            continue  # its Organizational Domain is itself or a parent: it cannot be `org`
        try:
            if walker.organizational_domain(d) == org:
                return True
        except TempError as exc:
            undecided = exc
    if undecided is not None:
        raise undecided
    return False


# -- the message's identifiers ----------------------------------------------------------
def normal_domain(dns_, text: str) -> str | None:
    """A domain as DMARC compares it: A-labels (RFC 9989 5.3.1), lower case, no final dot;
    None when it is not a host name."""
    return _normal_domain(dns_.name, text)


@lru_cache(maxsize=4096)  # the same few domains in every message
def _normal_domain(to_name, text: str) -> str | None:
    text = text.strip().rstrip(".")
    if not text or text.startswith("["):
        return None
    try:
        name = to_name(text).to_text(omit_final_dot=True).lower()
    except Exception:  # BadName; dnspython's IDNA errors are not all DNSException
        return None
    return name if len(name) <= 253 and _HOSTNAME.fullmatch(name) else None


_QUOTED_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"?|\((?:\\.|[^()\\])*\)?')


def from_addresses(from_values: list[str]) -> tuple[tuple[str, str], ...] | None:
    """The From: fields' (name, address) pairs; None when the parser gives up on them."""
    return _parsed_from("\n".join(from_values)) if all("\n" not in v for v in from_values) \
        else _parse_from(from_values)


def _parse_from(from_values: list[str]) -> tuple[tuple[str, str], ...] | None:
    try:
        return tuple(email.utils.getaddresses(from_values))
    except Exception:  # a parser bug on hostile input
        return None


@short_text_memo()  # the same senders' From: comes with many messages (lists, newsletters)
def _parsed_from(joined: str) -> tuple[tuple[str, str], ...] | None:
    return _parse_from(joined.split("\n"))


def ambiguous_from(from_values: list[str], addresses: tuple[tuple[str, str], ...] | None = None) -> bool:
    """A From: whose author a reader and a parser could tell apart: the "@"s written outside
    quoted strings and comments are not each one whole address with a local part
    ("alice@victim.example@attacker.example": a mail reader shows the first domain, a parser
    may take the last, or none). RFC 7489 6.6.1 (kept by RFC 9989) lets a receiver refuse it."""
    pairs = from_addresses(from_values) if addresses is None else addresses
    if pairs is None:
        return True
    written = sum(_QUOTED_OR_COMMENT.sub("", v).count("@") for v in from_values)
    whole = [a for _, a in pairs if a.count("@") == 1 and not a.startswith("@")]
    return written != len(whole) or any(a.count("@") > 1 for _, a in pairs)


def author_domains(dns_, addresses: tuple[tuple[str, str], ...]) -> list[str]:
    """The distinct domains of the From: addresses, in order."""
    out: dict[str, None] = {}
    for _name, addr in addresses:
        if "@" in addr:
            domain = normal_domain(dns_, addr.rpartition("@")[2])
            if domain:
                out[domain] = None
    return list(out)


def spf_identity(results, sender: str | None, dns_) -> str | None:
    """The SPF-authenticated MAIL FROM domain, if SPF passed for it (RFC 9989 4.4.2; for a
    null sender the MAIL FROM identity is postmaster@HELO, RFC 7208 2.4)."""
    spf = results.get("spf")
    if not isinstance(spf, dict) or spf.get("result") != "pass":
        return None
    if spf.get("scope", "mailfrom") != "mailfrom" and not (spf.get("scope") == "helo" and sender == ""):
        return None
    return normal_domain(dns_, str(spf.get("domain") or ""))


def dkim_identities(results, dns_) -> list[str]:
    dkim = results.get("dkim")
    if not isinstance(dkim, (list, tuple)):
        return []
    out = []
    for sig in dkim:
        if isinstance(sig, dict) and sig.get("result") == "pass":
            domain = normal_domain(dns_, str(sig.get("domain") or ""))
            if domain:
                out.append(domain)
    return out


_RANK = {"fail": 4, "temperror": 3, "permerror": 2, "pass": 1, "none": 0}


def decisive(outcomes: list[Outcome]) -> Outcome:
    """The outcome that decides the message: the strictest failing policy first (11.5)."""
    return max(outcomes, key=lambda o: (_RANK[o.result], POLICIES.index(o.policy) if o.result == "fail" else 0))


# -- the check ---------------------------------------------------------------------------
class DMARCCheck(Check):
    """DMARC at end of DATA, after the spf and dkim checks (it reads their results)."""

    Options = DMARCOptions
    records_auth = True

    def data(self, facts: Facts) -> Verdict:
        dns_ = self.context.dns
        from_values = [f.value for f in facts.fields() if f.name.lower() == "from"]
        addresses = from_addresses(from_values)
        if ambiguous_from(from_values, addresses):
            outcome = Outcome("", "permerror", reason="From: cannot be parsed reliably")
            kw = {"results": {"dmarc": outcome.fact()}, "auth": [outcome.auth()]}
            if self.options.get("enforce", True):
                return Verdict.reject("From: header field cannot be parsed reliably", 550, "5.7.1", **kw)
            return Verdict.accept(**kw)
        domains = author_domains(dns_, addresses)
        if not domains:
            why = "no From header field" if not from_values else "no domain in From"
            outcome = Outcome("", "permerror", reason=why)
            return Verdict.accept(results={"dmarc": outcome.fact()}, auth=[outcome.auth()])
        limit = self.options.get("max_author_domains", 5)
        results = facts.results or {}
        spf = spf_identity(results, facts.sender, dns_)
        dkim = dkim_identities(results, dns_)
        walker = TreeWalker(dns_)
        outcomes = [evaluate(dns_, walker, d, spf, dkim) for d in domains[:limit]]
        if len(domains) > limit:
            outcomes.append(Outcome(domains[limit], "permerror",
                                    reason=f"From has {len(domains)} domains, only {limit} evaluated"))
        worst = decisive(outcomes)
        kw = {"results": {"dmarc": worst.fact()}, "auth": tuple(o.auth() for o in outcomes)}
        if worst.result == "fail" and self.options.get("enforce", True):
            if worst.policy == "reject":
                return Verdict.reject(f"Email rejected per DMARC policy for {worst.domain}", 550, "5.7.1", **kw)
            if worst.policy == "quarantine":
                return Verdict.quarantine(f"DMARC policy quarantine for {worst.domain}", **kw)
        if worst.result == "temperror" and self.options.get("temperror") == "defer":
            return Verdict.defer(f"DMARC policy for {worst.domain} cannot be checked now, try again later",
                                 451, "4.4.3", **kw)
        return Verdict.accept(**kw)
