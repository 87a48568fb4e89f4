"""Inbound checks: policy at every SMTP phase, built in (SPF, DKIM, DMARC, DNSBL, FCrDNS,
greylisting, policy servers) or the operator's own (`type = "python"`).

    interface.py    Check, Verdict, Facts, CheckContext: what a check is, sees and answers
    engine.py       runs a phase's checks in config order under timeouts; the end of DATA
    registry.py     the check types and how a [[check]] table becomes a check
    authresults.py  our Authentication-Results, and spotting forged ones
    headers.py      the stored message's header section, split and edited
    dns.py          DNS on our resolver settings, with the outcomes checks tell apart

A custom check imports what it needs from here: `from geosmtp.checks import Check, Verdict`.
"""
from geosmtp.checks.interface import AuthResult, Check, CheckContext, Facts, Verdict

__all__ = ["AuthResult", "Check", "CheckContext", "Facts", "Verdict"]
