"""SPF (RFC 7208): may the client send mail for the MAIL FROM domain, or, for the null
sender, for its HELO name (sections 2.3, 2.4)?

Our own check_host() (section 4) on context.dns, so every question goes to our resolver
settings with their timeout, never a library's module resolver. The record is parsed whole
before it is evaluated (4.6: a syntax error anywhere is a permerror), the terms are tried
left to right (5), redirect= applies when nothing matched (6.1), macros are expanded by
section 7, and the limits of 4.6.4 hold across includes and redirects: at most 10 terms that
query DNS, at most 2 of them void, at most 10 names per mx or ptr.

exp= (6.2) is parsed and checked like any domain-spec but never fetched: our refusal says
"SPF validation failed" (RFC 7372 5.7.23) with the domain, not a text the domain chose.

What hostile DNS can do ends as a result, never an exception: several v=spf1 records, bytes
that are not ASCII, NUL in a term, include loops (they run out of the 10 terms), names that
cannot be names. One departure, for section 11.1's sake: PTR names are validated until the
second one whose lookup fails (5.5 would go on through all 10, each failure a timeout).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote

import dns.name
import dns.reversename
import gevent
from loguru import logger
from pydantic import BaseModel, ConfigDict

from geosmtp.checks.dns import BadName
from geosmtp.checks.dns import TempError as DNSTempError
from geosmtp.checks.interface import AuthResult, Check, Facts, Verdict, safe_text
from geosmtp.memo import short_text_memo

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
MAX_DNS_TERMS = 10  # 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS = 2  # 4.6.4: terms whose query found nothing (NXDOMAIN or no record)
MAX_NAMES = 10  # 4.6.4: MX hosts of one mx term, PTR names of one ptr term or %{p}
MAX_NAME = 253  # 7.3: an expanded name longer loses labels on its left
MAX_PTR_ERRORS = 2  # failed address lookups that end the validation of PTR names
YIELD_EVERY = 1000  # words of a record parsed between two turns of the gevent hub

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.S)  # 12: name "=" macro-string
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)", re.S)  # qualifier mechanism
_DUAL_CIDR = re.compile(r"(.*?)(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # 12: no leading zero
_IP4 = re.compile(rf"({_QNUM}(?:\.{_QNUM}){{3}})(?:/(0|[1-9][0-9]?))?")
_IP6 = re.compile(r"([0-9A-Fa-f:.]+)(?:/(0|[1-9][0-9]{0,2}))?")
_MACRO = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}|%%|%_|%-")  # 7.1
_LITERAL = re.compile(r"[\x21-\x24\x26-\x7e]+")  # 7.1 macro-literal: visible ASCII but "%"
_DOMAIN_END = re.compile(r"\.(?:[0-9A-Za-z]*[A-Za-z][0-9A-Za-z]*|[0-9A-Za-z]+-[0-9A-Za-z-]*[0-9A-Za-z])\.?\Z")
_MACRO_LETTERS = "slodipvh"  # 7.2; c, r and t belong to exp text only, which we never expand
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SPECIAL = {"%%": "%", "%_": " ", "%-": "%20"}
_NETWORKS = {"ip4": (_IP4, socket.AF_INET, 4, 32), "ip6": (_IP6, socket.AF_INET6, 6, 128)}


class SPFError(Exception):
    """Ends check_host() with `result` (permerror or temperror); the message says why."""

    def __init__(self, result: str, why: str):
        super().__init__(why)
        self.result = result


def _perm(why: str) -> SPFError:
    return SPFError("permerror", why)


# -- the record (sections 4.5, 4.6, 5, 6, 7.1, 12) ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Macro:
    """One %{...} of a macro-string (7.1): letter, how many right-hand parts, reversed,
    the delimiters to split on; `escape` for an upper-case letter (URL-escaped, 7.3)."""

    letter: str
    escape: bool
    parts: int
    reverse: bool
    delimiters: str


@dataclass(frozen=True, slots=True)
class Term:
    """A mechanism with what a match gives (from its qualifier, 4.6.2)."""

    result: str
    kind: str  # all include a mx ptr ip4 ip6 exists
    spec: tuple | None = None  # the domain-spec as macro tokens; None: the current domain
    network: tuple[int, int, int] | None = None  # ip4, ip6: (version, address as int, prefix)
    cidr4: int = 32  # a, mx: dual-cidr-length (5.3, 5.4)
    cidr6: int = 128


@dataclass(frozen=True, slots=True)
class Record:
    terms: tuple[Term, ...]
    redirect: tuple | None  # 6.1: never reached past an "all", which always matches


def select_record(texts: list[bytes]) -> str | None:
    """The domain's SPF record among its TXT records (4.5): the one starting with "v=spf1"
    and then a space or nothing; None when there is none, permerror when there are more."""
    found = [t for t in texts if t[:6].lower() == b"v=spf1" and t[6:7] in (b"", b" ")]
    if len(found) > 1:
        raise _perm(f"{len(found)} v=spf1 records")
    if not found:
        return None
    try:
        return found[0].decode("ascii")
    except UnicodeDecodeError:
        raise _perm("the record is not ASCII") from None


def parse_macro_string(text: str, domain_spec: bool) -> tuple:
    """Macro tokens (literal strings and Macro) of a macro-string (7.1); permerror for bad
    syntax. A domain-spec must end in a macro or in "." and a top label (domain-end)."""
    tokens: list = []
    pos, last_literal = 0, ""
    while pos < len(text):
        if text[pos] == "%":
            m = _MACRO.match(text, pos)
            if m is None:
                raise _perm(f"bad macro in {text[:60]!r}")
            if m.group(1) is None:
                tokens.append(_SPECIAL[m.group(0)])
            else:
                letter, digits, reverse, delimiters = m.groups()
                if letter.lower() not in _MACRO_LETTERS:
                    raise _perm(f"macro letter {letter!r} is not allowed here")
                if digits and not digits.strip("0"):
                    raise _perm("a macro keeps zero parts")
                parts = 128 if len(digits) > 3 else int(digits or 0)  # a name has at most 127 labels
                tokens.append(Macro(letter.lower(), letter.isupper(), parts, bool(reverse), delimiters or "."))
            last_literal, pos = "", m.end()
        else:
            m = _LITERAL.match(text, pos)
            if m is None:
                raise _perm(f"bad character in {text[:60]!r}")
            tokens.append(m.group(0))
            last_literal, pos = m.group(0), m.end()
    if domain_spec:
        if not tokens:
            raise _perm("empty domain-spec")
        if last_literal and not _DOMAIN_END.search(last_literal):
            raise _perm(f"domain-spec {text[:60]!r} does not end in a top label")
    return tuple(tokens)


def _parse_directive(term: str) -> Term:
    m = _DIRECTIVE.fullmatch(term)
    if m is None:
        raise _perm(f"bad term {term[:60]!r}")
    result, kind, rest = _QUALIFIERS.get(m.group(1), "pass"), m.group(2).lower(), m.group(3)
    if kind == "all":
        if rest:
            raise _perm(f"bad term {term[:60]!r}")
        return Term(result, kind)
    if kind in ("include", "exists"):  # 5.2, 5.7: ":" domain-spec
        if not rest.startswith(":"):
            raise _perm(f"{kind} needs a domain")
        return Term(result, kind, parse_macro_string(rest[1:], True))
    if kind == "ptr":  # 5.5
        if rest and not rest.startswith(":"):
            raise _perm(f"bad term {term[:60]!r}")
        return Term(result, kind, parse_macro_string(rest[1:], True) if rest else None)
    if kind in ("a", "mx"):  # 5.3, 5.4: [":" domain-spec] [dual-cidr-length]
        colon = rest.startswith(":")
        spec, c4, c6 = _DUAL_CIDR.fullmatch(rest[1:] if colon else rest).groups()
        if bool(spec) != colon:
            raise _perm(f"bad term {term[:60]!r}")
        cidr4, cidr6 = int(c4 or 32), int(c6 or 128)
        if cidr4 > 32 or cidr6 > 128:
            raise _perm(f"bad prefix length in {term[:60]!r}")
        return Term(result, kind, parse_macro_string(spec, True) if colon else None, cidr4=cidr4, cidr6=cidr6)
    if kind in ("ip4", "ip6"):  # 5.6
        pattern, family, version, most = _NETWORKS[kind]  # inet_pton: thousands of terms stay quick
        m = pattern.fullmatch(rest[1:]) if rest.startswith(":") else None
        try:
            address = int.from_bytes(socket.inet_pton(family, m.group(1)), "big") if m else None
        except OSError:
            address = None
        if address is None or int(m.group(2) or most) > most:
            raise _perm(f"bad address in {term[:60]!r}")
        return Term(result, kind, network=(version, address, int(m.group(2) or most)))
    raise _perm(f"unknown mechanism {kind[:30]!r}")


@short_text_memo()  # Records are frozen: the same few senders' records come with every message
def parse_record(text: str) -> Record:
    """The whole record checked before any term is tried (4.6): terms are separated by
    spaces (4.6.1), redirect= and exp= may appear once (6), unknown modifiers are ignored
    but their value must still be a macro-string."""
    terms, modifiers = [], {}
    for n, word in enumerate(text.split(" ")[1:], 1):
        if n % YIELD_EVERY == 0:  # a 64 KB record is ~20 ms of parsing: let other sessions run
            gevent.sleep(0)
        if not word:
            continue
        m = _MODIFIER.fullmatch(word)
        if m is None:
            terms.append(_parse_directive(word))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise _perm(f"{name}= appears twice")
            modifiers[name] = parse_macro_string(value, True)
        else:
            parse_macro_string(value, False)
    return Record(tuple(terms), modifiers.get("redirect"))


# -- names ---------------------------------------------------------------------------------
def identity_domain(text: str) -> str | None:
    """The domain of an identity (MAIL FROM domain, HELO name) as check_host() takes it, or
    None when it cannot be one (4.3: malformed or single-label; an address literal)."""
    text = (text or "").rstrip(".")
    if not text.isascii() or len(text) > MAX_NAME:
        return None
    labels = text.split(".")
    if len(labels) < 2 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return text.lower()


@lru_cache(maxsize=1024)  # the same few domains for every message; a Name is immutable
def dns_name(text: str) -> dns.name.Name | None:
    """An expanded domain-spec as a DNS name (7.3: the final dot dropped, left labels
    removed past 253 characters); None when it cannot be asked (an empty or long label)."""
    if text.endswith("."):
        text = text[:-1]
    if len(text) > MAX_NAME:  # the first dot after which at most 253 characters are left
        cut = text.find(".", len(text) - MAX_NAME - 1)
        if cut < 0:
            return None
        text = text[cut + 1:]
    try:
        raw = [label.encode("utf-8") for label in text.split(".")]
        if not all(0 < len(label) < 64 for label in raw):
            return None
        return dns.name.Name([*raw, b""])
    except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, UnicodeError):
        return None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


# -- check_host() (section 4) --------------------------------------------------------------
class Evaluation:
    """One check_host() with its counters: the limits of 4.6.4 hold for the whole
    evaluation, includes and redirects included."""

    def __init__(self, resolver, ip, sender: str, helo: str | None):
        self.dns = resolver
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):  # (not parsed again)
            ip = ipaddress.ip_address(ip)
        if ip.version == 6 and ip.ipv4_mapped is not None:  # 5: an IPv4 client, as such
            ip = ip.ipv4_mapped
        self.ip = ip
        local, _, domain = sender.rpartition("@")
        self.local = local or "postmaster"  # 4.3
        self.sender_domain = domain
        self.helo = helo or "unknown"
        self.dns_terms = 0
        self.void_lookups = 0
        self._validated: list[str] | None = None  # for ptr and %{p}, asked once
        self._ptr_void = False

    @property
    def sender(self) -> str:
        return f"{self.local}@{self.sender_domain}"

    # -- limits ----------------------------------------------------------------------------
    def _count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _perm(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def _void(self) -> None:
        self.void_lookups += 1
        if self.void_lookups > MAX_VOID_LOOKUPS:
            raise _perm(f"more than {MAX_VOID_LOOKUPS} void lookups")

    def _query(self, name: dns.name.Name, rdtype: str) -> list:
        """The answer's rdata ([] for none); a DNS error ends the evaluation with temperror
        (section 5: an RCODE other than 0 or 3, or a timeout)."""
        try:
            return self.dns.query(name, rdtype)
        except DNSTempError as exc:
            raise SPFError("temperror", f"DNS: {exc}") from None
        except BadName:
            return []

    # -- the record ------------------------------------------------------------------------
    def check_host(self, domain: str) -> str:
        """The result for `domain` (4.3 to 4.7): none, neutral, pass, fail, softfail;
        permerror and temperror are raised as SPFError."""
        name = dns_name(domain)
        if name is None or len(name.labels) < 3:  # 4.3: malformed or single-label
            return "none"
        try:
            texts = self.dns.txt(name)
        except DNSTempError as exc:  # 4.4
            raise SPFError("temperror", f"DNS: {exc}") from None
        except BadName:
            return "none"
        text = select_record(texts)
        if text is None:
            return "none"
        record = parse_record(text)
        for term in record.terms:
            if self._matches(term, domain, name):
                return term.result
        if record.redirect is not None:  # 6.1
            self._count_dns_term()
            target = self._target(record.redirect, domain)
            result = self.check_host(target) if target is not None else "none"
            if result == "none":
                raise _perm("redirect= names a domain without SPF record")
            return result
        return "neutral"  # 4.7

    def _target(self, spec: tuple, domain: str) -> str | None:
        expanded = self.expand(spec, domain)
        name = dns_name(expanded)
        return None if name is None else _text(name)

    def _matches(self, term: Term, domain: str, name: dns.name.Name) -> bool:
        kind = term.kind
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            version, address, prefix = term.network
            return self.ip.version == version and self._within(address, prefix)
        self._count_dns_term()
        if kind == "include":  # 5.2: pass matches; fail, softfail, neutral do not
            target = self._target(term.spec, domain)
            result = self.check_host(target) if target is not None else "none"
            if result == "none":
                raise _perm("include: names a domain without SPF record")
            return result == "pass"
        if term.spec is not None:
            target = dns_name(self.expand(term.spec, domain))
            if target is None:  # a name that cannot be asked: nothing there
                self._void()
                return False
        else:
            target = name
        if kind == "a":  # 5.3
            return self._in(self._addresses(target, count_void=True), term)
        if kind == "mx":
            return self._mx(target, term)
        if kind == "ptr":  # 5.5
            want = _text(target)
            return any(n == want or n.endswith("." + want) for n in self._validated_names(count_void=True))
        answer = self._query(target, "A")  # exists (5.7): always A, whatever the client's family
        if not answer:
            self._void()
        return bool(answer)

    def _addresses(self, name: dns.name.Name, count_void: bool = False) -> list:
        """The addresses of `name` in the client's family (5.3: A for IPv4, AAAA for IPv6)."""
        answer = self._query(name, "A" if self.ip.version == 4 else "AAAA")
        if not answer and count_void:
            self._void()
        return [ipaddress.ip_address(r.address) for r in answer]

    def _in(self, addresses: list, term: Term) -> bool:
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        return any(self._within(int(a), prefix) for a in addresses)

    def _within(self, address: int, prefix: int) -> bool:
        """Whether the client is in address/prefix (of the client's family)."""
        return (int(self.ip) ^ address) >> (self.ip.max_prefixlen - prefix) == 0

    def _mx(self, name: dns.name.Name, term: Term) -> bool:
        """5.4: the addresses of the domain's MX hosts, at most 10 of them (more: permerror);
        no implicit MX when the domain has none."""
        records = self._query(name, "MX")
        if not records:
            self._void()
            return False
        if len(records) > MAX_NAMES:
            raise _perm(f"{len(records)} MX records (at most {MAX_NAMES})")
        for mx in sorted(records, key=lambda r: (r.preference, r.exchange)):
            if mx.exchange != dns.name.root and self._in(self._addresses(mx.exchange), term):
                return True
        return False

    def _validated_names(self, count_void: bool = False) -> list[str]:
        """The client's PTR names that resolve back to it (5.5), of the first 10 PTR names;
        a DNS error on the PTR or on a name makes that part not match (not temperror), and
        after a second failed name the rest are left unvalidated (section 11.1: the client
        writes its reverse zone, each timeout would cost our resolver's whole timeout)."""
        if self._validated is None:
            try:
                answer = self.dns.query(dns.reversename.from_address(str(self.ip)), "PTR")
            except (DNSTempError, BadName):
                answer = None
            self._ptr_void = answer == []
            self._validated, errors = [], 0
            for record in (answer or [])[:MAX_NAMES]:
                try:
                    addresses = self.dns.query(record.target, "A" if self.ip.version == 4 else "AAAA")
                except (DNSTempError, BadName):
                    errors += 1
                    if errors == MAX_PTR_ERRORS:
                        break
                    continue
                if any(ipaddress.ip_address(r.address) == self.ip for r in addresses):
                    self._validated.append(_text(record.target))
        if count_void and self._ptr_void:
            self._void()
        return self._validated

    # -- macros (section 7) ----------------------------------------------------------------
    def expand(self, tokens: tuple, domain: str) -> str:
        """7.3: each macro's value split on its delimiters, reversed if asked, its
        right-hand parts kept, joined with "."; upper-case letters URL-escaped."""
        out = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            parts = re.split("[" + re.escape(token.delimiters) + "]", self._macro_value(token.letter, domain))
            if token.reverse:
                parts.reverse()
            if token.parts:
                parts = parts[-token.parts:]
            value = ".".join(parts)
            out.append(quote(value, safe="") if token.escape else value)
        return "".join(out)

    def _macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":  # 7.3: dotted quad, or dot-separated nibbles for IPv6
            return str(self.ip) if self.ip.version == 4 else ".".join(self.ip.exploded.replace(":", ""))
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        return self._p(domain)

    def _p(self, domain: str) -> str:
        """%{p} (7.3): the validated name that is the domain, or one under it, or any."""
        names = self._validated_names()
        for name in names:
            if name == domain.lower():
                return name
        return next((n for n in names if n.endswith("." + domain.lower())), names[0] if names else "unknown")


def check_host(resolver, ip, domain: str, sender: str, helo: str | None) -> tuple[str, str]:
    """(result, why) of check_host(ip, domain, sender) on `resolver` (a checks.dns.DNS);
    `why` is empty unless the result is an error."""
    evaluation = Evaluation(resolver, ip, sender, helo)
    try:
        return evaluation.check_host(domain), ""
    except SPFError as exc:
        return exc.result, str(exc)


# -- the check -----------------------------------------------------------------------------
class SPFCheck(Check):
    """Type "spf": SPF of MAIL FROM, or of the HELO name for the null sender, at MAIL.

    Records results["spf"] = {"result", "domain", "scope"} and "spf=<result>
    smtp.mailfrom=<address>" (or smtp.helo=<name>) for Authentication-Results. A fail is
    refused with 550 5.7.23 when reject_fail is set, a temperror deferred with 451 4.7.24
    when defer_temperror is set (RFC 7372 3.2); every other result is only recorded."""

    records_auth = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        reject_fail: bool = False  # fail -> 550 5.7.23 at MAIL
        defer_temperror: bool = False  # temperror -> 451 4.7.24 at MAIL

    def __init__(self, options, context):
        super().__init__(options, context)
        self.settings = self.Options.model_validate(dict(options))

    def identity(self, facts: Facts) -> tuple[str, str, str, str]:
        """(scope, domain, sender, property) of the identity to check (2.3, 2.4)."""
        sender = facts.sender or ""
        if sender:
            return "mailfrom", sender.rpartition("@")[2], sender, "smtp.mailfrom"
        helo = facts.helo or ""
        return "helo", helo, f"postmaster@{helo}", "smtp.helo"

    def mail(self, facts: Facts) -> Verdict:
        scope, raw_domain, sender, prop = self.identity(facts)
        domain = identity_domain(raw_domain)
        if domain is None:  # 4.3: nothing to check
            result, why = "none", ""
        else:
            try:
                result, why = check_host(self.context.dns, facts.ip, domain, sender, facts.helo)
            except Exception as exc:  # a bug of ours must still give a result, and be seen
                logger.opt(exception=exc).error("spf: evaluating {} failed", domain)
                result, why = "temperror", "internal error"
        shown = domain or safe_text(raw_domain.lower(), 255)
        log = logger.info if why else logger.debug  # an error's cause is not in the header: here
        log("spf: {} {} for {} {}{}", result, scope, shown, facts.ip, f" ({why})" if why else "")
        if result == "fail" and self.settings.reject_fail:
            return Verdict.reject(f"SPF validation failed for {shown}", 550, "5.7.23",
                                  reason=f"spf fail for {shown}")
        if result == "temperror" and self.settings.defer_temperror:
            return Verdict.defer(f"SPF temporary error for {shown}, try again later", 451, "4.7.24",
                                 reason=f"spf temperror for {shown}: {why}")
        value = sender if scope == "mailfrom" else raw_domain
        return Verdict.accept(
            results={"spf": {"result": result, "domain": shown, "scope": scope}},
            auth=[AuthResult("spf", result, ((prop, value),) if value else ())])
