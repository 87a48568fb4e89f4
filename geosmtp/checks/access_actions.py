"""A policy server's `action=` (a Postfix access(5) action) turned into a Verdict.

Policy servers written for Postfix (postgrey, policyd-spf, policyd-weight) answer with
the actions of a Postfix access table. Each maps onto what our engine can do:

    OK, DUNNO, a number alone          accept (Postfix: "all-numerical" is OK)
    REJECT [text], 5NN [text]          reject (550 5.7.1 when the action gives no code)
    5.X.Y [text]                       reject, 550 with that enhanced code
    DEFER [text], DEFER_IF_PERMIT,     defer (450 4.7.1, Postfix's access_map_defer_code)
    4NN [text], 4.X.Y [text]
    421 / 521 [text]                   close: the reply, then the connection ends (access(5))
    DEFER_IF_REJECT [text]             accept, logged: it only turns a *later* reject into a
                                       defer; our later checks answer for themselves
    HOLD [text], DISCARD [text]        quarantine: we never throw away accepted mail silently,
                                       so DISCARD keeps the message in hold/ as HOLD does
    PREPEND Name: value                accept, with the header field added to the message
    WARN / INFO [text]                 accept, the text logged
    FILTER, REDIRECT, BCC, others      accept, logged as not supported here

DEFER_IF_PERMIT defers at once: Postfix defers it unless a later restriction rejects, and
a later reject is still given on the client's next try. An enhanced code of the wrong class
("450 5.7.1 ...") is replaced by the default of the reply code's class.

Anything else that starts like a code but is not one ("55 x", "250 ok", "2.0.0", "600",
"5.7") is junk, as is an empty action: UnusableReply, and the check's default_action
applies (as Postfix answers 451 4.3.5 for a table result it cannot read). Nothing here
raises anything else, whatever the text.
"""
from __future__ import annotations

import re

from geosmtp.checks.interface import CLOSE, Verdict, make_reply, safe_text

_CODE = re.compile(r"[45]\d\d", re.ASCII)
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}", re.ASCII)
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2 (as the Verdict checks it)
HEADER_VALUE_LIMIT = 900  # with the name, within RFC 5322's 998-octet line

ACCEPTS = {"OK", "DUNNO"}
IGNORED = {"FILTER", "REDIRECT", "BCC"}  # message routing we do not offer
LOGGED = {"WARN", "INFO"}


class UnusableReply(Exception):
    """The policy server's answer cannot be read as an action."""


def _split(text: str) -> tuple[str, str, str]:
    """(first word, separator, the rest) at the first run of white space."""
    parts = text.split(None, 1)
    if not parts:
        return "", "", ""
    return parts[0], " ", (parts[1].strip() if len(parts) > 1 else "")


def _split_enhanced(text: str, klass: str, default: str) -> tuple[str, str]:
    """(enhanced code, rest of the text): a leading "X.Y.Z" of the right class is kept;
    one of another class is dropped in favour of the default."""
    head, _, rest = _split(text)
    m = _ENHANCED.fullmatch(head)
    if not m:
        return default, text
    return (head if m.group(1) == klass else default), rest


def _refusal(code: int, text: str, action: str) -> Verdict:
    klass = str(code)[0]
    enhanced, text = _split_enhanced(text, klass, f"{klass}.7.1")
    reason = f"policy service: {safe_text(action, 200)}"
    if code in (421, 521):
        return Verdict(CLOSE, reply=make_reply(code, enhanced, text or "Closing connection", close=True),
                       reason=reason)
    if klass == "5":
        return Verdict.reject(text, code=code, enhanced=enhanced, reason=reason)
    return Verdict.defer(text, code=code, enhanced=enhanced, reason=reason)


def _prepend(text: str) -> Verdict:
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not _FIELD_NAME.fullmatch(name):
        return Verdict(reason=f"policy service PREPEND without a valid header field ignored: "
                              f"{safe_text(text, 200)}")
    return Verdict.accept(headers=[(name, safe_text(value.strip(), HEADER_VALUE_LIMIT))])


def to_verdict(action: str | None) -> Verdict:
    """The Verdict for one action string (the value of `action=`); UnusableReply if junk.
    An accept carrying a `reason` is one the caller logs (WARN, ignored actions...)."""
    if action is None:
        raise UnusableReply("no action= in the reply")
    action = action.strip()
    word, _, text = _split(action)
    upper = word.upper()
    shown = safe_text(action, 200)
    if not word:
        raise UnusableReply("an empty action")
    if word.isascii() and word.isdigit():  # ASCII: no other script's digits
        if not text:  # all-numerical is OK in access(5), before any code is looked for
            if _CODE.fullmatch(word):
                return Verdict(reason=f"policy service answered a reply code alone, read as OK: {shown}")
            return Verdict()
        if _CODE.fullmatch(word):
            return _refusal(int(word), text, action)
        raise UnusableReply(f"not a reply code: {shown}")
    if word[:1].isdigit():
        m = _ENHANCED.fullmatch(word)
        if m and m.group(1) in "45":
            return _refusal(550 if m.group(1) == "5" else 450, action, action)
        raise UnusableReply(f"not a reply code: {shown}")
    if upper in ACCEPTS:
        return Verdict()
    if upper == "REJECT":
        return _refusal(550, text, action)
    if upper in ("DEFER", "DEFER_IF_PERMIT"):
        return _refusal(450, text, action)
    if upper == "DEFER_IF_REJECT":
        return Verdict(reason=f"policy service DEFER_IF_REJECT accepted (it defers only a later "
                              f"reject; later checks give their own): {shown}")
    if upper == "HOLD":
        return Verdict.quarantine("policy service HOLD" + (f": {text}" if text else ""))
    if upper == "DISCARD":  # accepted mail is never dropped unseen: it waits in hold/
        return Verdict.quarantine("policy service DISCARD, held instead" + (f": {text}" if text else ""))
    if upper == "PREPEND":
        return _prepend(text)
    if upper in LOGGED:
        return Verdict(reason=f"policy service {upper}: {safe_text(text, 300)}")
    if upper in IGNORED:
        return Verdict(reason=f"policy service action not supported here, accepted: {shown}")
    return Verdict(reason=f"policy service action unknown here, accepted: {shown}")
