"""Forward-confirmed reverse DNS ("iprev", RFC 8601 2.7.3): the client's PTR names, and the
addresses of each; a name that gives the client's address back is the client's name.

PTR data is written by whoever holds the reverse zone, that is, by the client: a name is
used only when it is a host name (LDH labels, RFC 1123 2.1), lowercased, at most 10 of them
(as RFC 7208 5.5 bounds PTR work), and the forward lookups run in parallel so ten slow names
cost one resolver timeout, not ten. Only the address family of the client is asked (A for
IPv4, AAAA for IPv6): the other family can never give the client's address back.

Results: results["fcrdns"] = "pass" | "fail" | "temperror" | "permerror" | "none" (no PTR
at all), results["ptr"] = the confirmed name (only on pass: the session writes it into
Received:), and an iprev method for Authentication-Results: pass, fail (names that do not
lead back), temperror (a lookup failed now), permerror (no PTR is published, RFC 8601
2.7.3). With `reject = true` a client without a confirmed name is refused with RFC 7372's
5.7.25 (4.7.25 while the DNS fails).
"""
from __future__ import annotations

import ipaddress

from loguru import logger
from pydantic import BaseModel, ConfigDict

from geosmtp.checks.dns import BadName, TempError
from geosmtp.checks.interface import AuthResult, Check, Facts, Verdict, safe_text
from geosmtp.config import is_hostname

MAX_NAMES = 10


def valid_name(text: str) -> str | None:
    """The PTR name as a host name we can use (lowercase, no final dot), or None when it is
    anything else (control characters, spaces, escapes, an address-looking last label)."""
    name = text.rstrip(".").lower() if text.isascii() else ""
    if not is_hostname(name) or name.rsplit(".", 1)[-1].isdigit():
        return None
    return name


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reject: bool = False  # refuse clients without forward-confirmed reverse DNS (5.7.25)


class FCrDNSCheck(Check):
    Options = Options
    records_auth = True

    def _forward(self, name: str, ip) -> str:
        """"pass" when `name` resolves to `ip`, "fail" when it does not, "temperror"."""
        try:
            found = self.context.dns.query(name, "A" if ip.version == 4 else "AAAA")
        except TempError:
            return "temperror"
        except BadName:
            return "fail"
        for r in found:
            try:
                if ipaddress.ip_address(r.address) == ip:
                    return "pass"
            except (AttributeError, ValueError):
                continue
        return "fail"

    def evaluate(self, ip) -> tuple[str, str | None]:
        """(fcrdns result, the confirmed name or None)."""
        try:
            raw = self.context.dns.ptr(str(ip))
        except TempError as exc:
            logger.info("fcrdns [{}]: PTR lookup failed: {}", ip, safe_text(exc, 200))
            return "temperror", None
        if not raw:
            return "none", None
        names = []
        for text in raw:
            name = valid_name(text)
            if name is None:
                logger.info("fcrdns [{}]: PTR {!r} is not a host name, ignored", ip, safe_text(text, 120))
            elif name not in names:
                names.append(name)
            if len(names) == MAX_NAMES:
                break
        if not names:
            return "fail", None
        done = self.context.dns.in_parallel(lambda name: self._forward(name, ip), names)
        outcomes = [value if ok else "temperror" for ok, value in done]
        for name, outcome in zip(names, outcomes):
            if outcome == "pass":
                return "pass", name
        return ("temperror" if "temperror" in outcomes else "fail"), None

    def connect(self, facts: Facts) -> Verdict:
        result, name = self.evaluate(facts.ip)
        iprev = "permerror" if result == "none" else result
        results = {"fcrdns": result}
        if name is not None:
            results["ptr"] = name
        auth = (AuthResult("iprev", iprev, (("policy.iprev", str(facts.ip)),)),)
        if result != "pass" and self.options["reject"]:
            if result == "temperror":
                return Verdict.defer(f"Reverse DNS of [{facts.ip}] cannot be checked now, try again later",
                                     450, "4.7.25", results=results, auth=auth)
            return Verdict.reject(f"Reverse DNS validation failed for [{facts.ip}]", 550, "5.7.25",
                                  results=results, auth=auth)
        logger.debug("fcrdns [{}]: {} {}", facts.ip, result, name or "")
        return Verdict.accept(results=results, auth=auth)
