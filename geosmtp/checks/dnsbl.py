"""DNS block and allow lists (RFC 5782): the client's address asked of several zones at once.

Each zone is asked for A records at the reversed address (IPv4 octets, IPv6 nibbles) under
it; an answer counts as a listing only when it falls in the zone's configured `answers`.
What a listing does is the zone's `action`:

  reject  the client is refused, naming the zone;
  score   the zone's `score` is added up; at `threshold` the client is refused;
  header  an X-DNSBL field says so in every message of the connection;
  accept  an allow list (DNSWL): a listing here makes every other zone's listing not count.

A negative score is an allow list that only weighs (list.dnswl.org's low trust level, say).
Spamhaus answers 127.255.255.252/254/255 when it refuses our query (a public resolver, over
quota): that is the list telling us about ourselves, never about the client, so those answers
(each zone's `errors`) never count and are logged at most once per zone per
`error_log_interval`. A DNS failure is "not listed" (logged): a list we cannot ask must not
refuse mail, nor defer it.

The lookups run at connect, all zones in parallel greenlets, each under the resolver's
timeout. The refusal is given at `phase`: at "connect" (554, the greeting refused and the
connection closed) or at "rcpt" (550 to each RCPT TO, the default). RCPT is where Postfix's
reject_rbl_client and postscreen's "enforce" refuse, for reasons that hold here: a sender
MTA treats a refused greeting as a broken host and keeps the mail queued (trying the other
MXes) so the legitimate sender never learns why, while a 550 at RCPT bounces at once with
our text naming the list; the log gets the sender and recipient for judging false
positives; and postmaster@ (RFC 5321 4.5.1) stays reachable for the delisting talk.
"""
from __future__ import annotations

import ipaddress
import re
import string
import time
from typing import Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geosmtp.checks.dns import DNS, BadName, TempError, reversed_ip
from geosmtp.checks.interface import Check, Facts, Verdict, safe_text
from geosmtp.config import Duration, is_hostname

DEFAULT_MESSAGE = "Service unavailable; client [{ip}] blocked using {zone}"
SPAMHAUS_ERRORS = ["127.255.255.252", "127.255.255.254", "127.255.255.255"]
HEADER = "X-DNSBL"
_OCTET = re.compile(r"(\*|\d{1,3}(?:-\d{1,3})?)")


class AnswerRange:
    """One `answers` entry: "127.0.0.2", "127.0.0.2-127.0.0.11", "127.0.0.0/24", or one
    pattern per octet ("127.0.*.2-3": any third octet, fourth 2 or 3, as DNSWL's trust)."""

    def __init__(self, text: str):
        self.text = text
        self.octets: list[tuple[int, int]] | None = None
        self.low = self.high = None
        first, dash, last = text.partition("-")
        try:
            if "/" in text:
                net = ipaddress.IPv4Network(text, strict=False)
                self.low, self.high = net[0], net[-1]
                return
            if dash and "." in last:
                self.low, self.high = ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
                if self.low > self.high:
                    raise ValueError(f"{text}: the range ends before it starts")
                return
            if "*" not in text and not dash:
                self.low = self.high = ipaddress.IPv4Address(text)
                return
        except ipaddress.AddressValueError as exc:
            raise ValueError(f"{text}: {exc}") from None
        parts = text.split(".")
        if len(parts) != 4 or not all(_OCTET.fullmatch(p) for p in parts):
            raise ValueError(f"{text!r} is not an address, a-b range, CIDR or octet pattern")
        self.octets = []
        for p in parts:
            lo, _, hi = ("0-255" if p == "*" else p).partition("-")
            lo_n, hi_n = int(lo), int(hi or lo)
            if not 0 <= lo_n <= hi_n <= 255:
                raise ValueError(f"{text}: octet {p} is not 0-255 low-high")
            self.octets.append((lo_n, hi_n))

    def __contains__(self, ip: ipaddress.IPv4Address) -> bool:
        if self.octets is None:
            return self.low <= ip <= self.high
        return all(lo <= b <= hi for b, (lo, hi) in zip(ip.packed, self.octets))


class Zone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zone: str
    answers: list[str] = ["127.0.0.2-127.0.0.254"]  # what counts as a listing (RFC 5782 2.3)
    action: Literal["reject", "score", "header", "accept"] = "reject"
    score: float = 1.0  # action "score": added to the client's score (negative: an allow list)
    message: str = DEFAULT_MESSAGE  # the refusal's text: {zone}, {ip}, {answer}
    errors: list[str] = SPAMHAUS_ERRORS  # answers that mean "the list refused us"
    ipv6: bool = True  # ask this zone about IPv6 clients (some lists are IPv4 only)

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        v = v.rstrip(".").lower()
        if not is_hostname(v):
            raise ValueError("must be a DNS zone such as zen.spamhaus.org")
        return v

    @field_validator("answers", "errors")
    @classmethod
    def _ranges(cls, v: list[str]) -> list[str]:
        for text in v:
            AnswerRange(text)
        return v

    @field_validator("message")
    @classmethod
    def _message(cls, v: str) -> str:
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
        except ValueError as exc:
            raise ValueError(f"bad template ({exc})") from None
        if any(f not in ("zone", "ip", "answer") or spec or conv for f, spec, conv in fields):
            raise ValueError("a template uses only {zone}, {ip} and {answer}")  # no {0}, {ip.x}, {ip!r}
        if safe_text(v) != v:
            raise ValueError("has a control character")
        return v


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zones: list[Zone] = Field(min_length=1)
    threshold: float = Field(1.0, gt=0)  # score of the "score" zones at which the client is refused
    phase: Literal["connect", "rcpt"] = "rcpt"  # where the refusal is given (lookups: connect)
    exempt_recipients: list[str] = ["postmaster"]  # local parts never refused at rcpt
    error_log_interval: Duration = 600.0


class _Zone:
    """A configured zone with its answer ranges parsed."""

    def __init__(self, spec: dict):
        self.name = spec["zone"]
        self.answers = [AnswerRange(a) for a in spec["answers"]]
        self.errors = [AnswerRange(a) for a in spec["errors"]]
        self.action = spec["action"]
        self.score = spec["score"]
        self.message = spec["message"]
        self.ipv6 = spec["ipv6"]


class DNSBLCheck(Check):
    """Asks the configured zones about the client at connect; refuses at `phase`."""

    Options = Options

    def __init__(self, options, context):
        super().__init__(options, context)
        self.zones = [_Zone(z) for z in options["zones"]]
        # the zones to ask, each once, for an IPv4 and an IPv6 client
        self._names = {4: list(dict.fromkeys(z.name for z in self.zones)),
                       6: list(dict.fromkeys(z.name for z in self.zones if z.ipv6))}
        self.threshold = options["threshold"]
        self.exempt = {x.lower() for x in options["exempt_recipients"]}
        self.error_log_interval = options["error_log_interval"]
        self._error_logged: dict[str, float] = {}  # zone -> time of its last "refused us" log line
        self.clock = time.monotonic
        if options["phase"] != "rcpt":  # the engine calls only the phases an object has
            self.rcpt = None

    # -- lookups ------------------------------------------------------------------------------
    def _ask(self, zone: str, ip) -> list[ipaddress.IPv4Address]:
        """The zone's answers for `ip` ([] when not listed or the DNS failed)."""
        dns: DNS = self.context.dns
        name = f"{reversed_ip(ip)}.{zone}"
        try:
            records = dns.query(name, "A")
        except (TempError, BadName) as exc:
            logger.warning("dnsbl {}: lookup failed, counted as not listed: {}", zone, safe_text(exc, 200))
            return []
        out = []
        for r in records:
            try:
                out.append(ipaddress.IPv4Address(r.address))
            except (AttributeError, ValueError):
                continue
        return out

    def _refused_us(self, zone: str, answer) -> None:
        now = self.clock()
        last = self._error_logged.get(zone)
        if last is None or now - last >= self.error_log_interval:
            self._error_logged[zone] = now
            logger.warning("dnsbl {}: the list refused our query (answer {}): not counted as a listing; "
                           "use a resolver of our own or the list's data feed", zone, answer)

    def lookup(self, ip) -> list[tuple[_Zone, ipaddress.IPv4Address]]:
        """(zone entry, the answer that makes it a listing) for every entry listing `ip`.
        A zone named by several entries (an allow list's trust levels, each with its own
        action) is asked once."""
        names = self._names[ip.version]
        if not names:
            return []
        if len(names) == 1:  # one list: asked in this greenlet, under the resolver's own timeout
            answers = {}
            try:
                answers[names[0]] = self._ask(names[0], ip)
            except Exception as exc:
                logger.warning("dnsbl {}: no answer ({}), counted as not listed", names[0], exc)
            return self._listed(answers)
        dns: DNS = self.context.dns
        answers = {}
        for name, (ok, value) in zip(names, dns.in_parallel(lambda zone: self._ask(zone, ip), names)):
            if ok:
                answers[name] = value
            else:
                logger.warning("dnsbl {}: no answer in {:g}s, counted as not listed", name, dns.wait)
        return self._listed(answers)

    def _listed(self, answers: dict) -> list[tuple[_Zone, ipaddress.IPv4Address]]:
        listed = []
        for zone in self.zones:
            for answer in answers.get(zone.name, ()):
                if any(answer in r for r in zone.errors):
                    self._refused_us(zone.name, answer)
                elif any(answer in r for r in zone.answers):
                    listed.append((zone, answer))
                    break
        return listed

    # -- verdicts -----------------------------------------------------------------------------
    def connect(self, facts: Facts) -> Verdict:
        listed = self.lookup(facts.ip)
        allowed = next((z.name for z, _ in listed if z.action == "accept"), None)
        scored = [z for z, _ in listed if z.action == "score"]
        score = sum(z.score for z in scored)
        result = {"score": score, "listed": list(dict.fromkeys(z.name for z, _ in listed))}
        headers = []
        refusal = None
        if allowed:
            result["allowed"] = allowed
            logger.info("dnsbl: client [{}] on allow list {}; other listings ignored", facts.ip, allowed)
        else:
            for zone, answer in listed:
                if zone.action == "header":
                    headers.append((HEADER, safe_text(f"{zone.name} listed [{facts.ip}] ({answer})")))
                elif zone.action == "reject" and refusal is None:
                    refusal = zone.message.format(zone=zone.name, ip=str(facts.ip), answer=str(answer))
            if refusal is None and scored and score >= self.threshold:
                by = ", ".join(dict.fromkeys(z.name for z in scored if z.score > 0))
                refusal = f"Service unavailable; client [{facts.ip}] blocked using {by} (score {score:g})"
            if listed:
                logger.info("dnsbl: client [{}] listed on {} (score {:g})", facts.ip,
                            ", ".join(f"{z.name}={a}" for z, a in listed), score)
        if refusal is not None:
            result["refusal"] = safe_text(refusal)
            if self.rcpt is None:  # refused here: the engine makes it 554 and closes
                return Verdict.reject(result["refusal"], 550, "5.7.1", results={"dnsbl": result})
        return Verdict.accept(headers=headers, results={"dnsbl": result})

    def rcpt(self, facts: Facts) -> Verdict | None:
        refusal = (facts.results.get("dnsbl") or {}).get("refusal")
        if refusal is None:
            return None
        recipient = facts.recipient or ""
        local = (recipient.rpartition("@")[0] if "@" in recipient else recipient).lower()
        if local in self.exempt:
            return None
        return Verdict.reject(refusal, 550, "5.7.1")
