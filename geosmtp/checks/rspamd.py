"""A check that asks rspamd about the finished message, before the end of DATA is answered.

    [[check]]
    type = "rspamd"
    url = "http://127.0.0.1:11333"     # rspamd's normal worker (or "unix:/run/rspamd/normal.sock")

At the end of DATA the message, as stored (our Received: first), is POSTed to /checkv2
with the envelope in the request headers rspamd's protocol defines (IP, Helo, Hostname,
From, one Rcpt per recipient, Queue-Id, User, TLS-Cipher, TLS-Version, MTA-Name, Pass). The
reply's action becomes the verdict:

    reject           550 5.7.1, with rspamd's messages.smtp_message when it gives one
    soft reject      451 4.7.1 (rspamd's message too)
    greylist         451 4.7.1
    rewrite subject  the Subject replaced by the reply's `subject`
    add header       X-Spam-Flag: YES and X-Spam-Score, or quarantine (add_header_action)
    no action        accepted, with X-Spam-Score (score_header; "" for none)
    quarantine, discard   quarantine (geosmtp never drops a message it said 250 to)

and the reply's `milter` block (add_headers, remove_headers) is applied through the
verdict's header fields, like every other check's. Fields rspamd adds are put in front of
the message, as every check's are: rspamd's `order` (an insert position) is not kept.

With `required = true`, rspamd is pinged every ping_interval and /readyz says 503 while it
does not answer (a node that would defer every message should leave the balancer).

No usable answer (rspamd down, an HTTP error, a reply that is not JSON or too big, a
timeout, an action we do not know) raises: the engine applies the check's on_error (by
default defer: 451 4.3.0), logs it and counts it in geosmtp_check_errors_total.

Values from the client (HELO, MAIL FROM, RCPT TO) and from DNS (the PTR name) go into HTTP
request headers: a CR or LF there would end the header and start one of the client's
choosing. Every control character (CR, LF, NUL...) is replaced by "?" and the header is
sent: leaving it out would let a NUL in HELO hide the HELO from rspamd's rules.
"""
from __future__ import annotations

import json
import math
import re
from email.header import Header
from typing import Any, Literal

import gevent
from gevent.monkey import get_original
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geosmtp.checks.interface import Check, CheckContext, Facts, Verdict, safe_text
from geosmtp.checks.rspamd_client import RspamdBadReply, RspamdClient, RspamdUnavailable, parse_url
from geosmtp.config import Duration

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 2.2 (the rule Verdict holds fields to)
_FOLD = re.compile(r"\r?\n(?=[ \t])")  # a folding newline, as rspamd writes it (CRLF or LF)
_LEADING_CODES = re.compile(r"^\s*(?:[245]\d\d(?:[ -]|$))?\s*(?:[245]\.\d{1,3}\.\d{1,3}(?:\s|$))?\s*")
VALUE_LIMIT = 2048  # characters of one request header value: more than an SMTP line carries
ADDED_LIMIT = 64  # fields rspamd may add to one message
ADDED_VALUE_LIMIT = 16384  # characters of one such field's value (X-Spamd-Result can be long)

REJECT_TEXT = "Message refused as spam"
SOFT_TEXT = "Try again later"
GREYLIST_TEXT = "Greylisted, try again later"


def in_main_thread() -> bool:
    """Whether this is the process's main thread (the server's hub), monkey-patched or not."""
    current, main = get_original("threading", ["current_thread", "main_thread"])
    return current() is main()


def clean_value(value: object) -> bytes:
    """A request header value: control characters (CR, LF, NUL...) as "?", UTF-8."""
    return _CONTROL.sub("?", str(value))[:VALUE_LIMIT].encode("utf-8", "replace")


def request_headers(facts: Facts, pass_all: bool = False, mta_name: str | None = None
                    ) -> list[tuple[str, bytes]]:
    """The /checkv2 request headers for the message of `facts`, as rspamd's protocol names them."""
    out = [("IP", clean_value(facts.ip))]
    if facts.helo:
        out.append(("Helo", clean_value(facts.helo)))
    if facts.ptr:  # the forward-confirmed name (an fcrdns check before this one)
        out.append(("Hostname", clean_value(facts.ptr)))
    if facts.sender is not None:
        out.append(("From", clean_value(facts.sender or "<>")))
    out += [("Rcpt", clean_value(r)) for r in facts.recipients]
    if facts.queue_id:
        out.append(("Queue-Id", clean_value(facts.queue_id)))
    if facts.auth_user:
        out.append(("User", clean_value(facts.auth_user)))
    if facts.tls:
        version, _, cipher = facts.tls.partition(" ")
        if cipher:
            out.append(("TLS-Cipher", clean_value(cipher)))
        out.append(("TLS-Version", clean_value(version)))
    if mta_name:
        out.append(("MTA-Name", clean_value(mta_name)))
    if pass_all:
        out.append(("Pass", b"all"))
    return out


def reply_text(message: Any, default: str) -> str:
    """rspamd's smtp_message made fit for our reply: its first line, printable ASCII, without
    a leading reply code or enhanced code of its own (ours are set by the action), and never
    empty or codes alone (then `default`)."""
    if not isinstance(message, str):
        return default
    line = next((ln for ln in message.splitlines() if ln.strip()), "")
    line = "".join(ch if " " <= ch <= "~" else "?" for ch in line)
    line = _LEADING_CODES.sub("", line, count=1).strip()
    return safe_text(line) if re.search(r"[A-Za-z]", line) else default


def field_value(value: Any) -> str | None:
    """A header value from rspamd, or None if it cannot be one: folding newlines (CRLF or LF
    before white space) become CRLF; any other control character but tab makes it unusable."""
    if not isinstance(value, str) or len(value) > ADDED_VALUE_LIMIT:
        return None
    value = _FOLD.sub("\r\n", value.strip())
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value.replace("\r\n ", "").replace("\r\n\t", "")):
        return None
    return value


def encoded_subject(subject: str) -> str:
    """A Subject value: ASCII as it is, anything else as RFC 2047 encoded-words; folded
    with CRLF at white space when long (RFC 5322 2.1.1: a line is at most 998 octets)."""
    subject = _CONTROL.sub(" ", subject).strip()
    return Header(subject, "us-ascii" if subject.isascii() else "utf-8").encode(linesep="\r\n")


class RspamdOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = "http://127.0.0.1:11333"  # "http://IP:port" or "unix:/path"
    connect_timeout: Duration = Field(2.0, gt=0)
    read_timeout: Duration = Field(15.0, gt=0)  # the reply, whole; the check's `timeout` bounds all
    pass_all: bool = False  # "Pass: all": every rule runs, even after a pre-result
    mta_name: str | None = None  # sent as MTA-Name (rspamd's milter_headers, ARC use it)
    add_header_action: Literal["header", "quarantine"] = "header"
    spam_flag_header: str = "X-Spam-Flag"  # "YES" with the add header action
    score_header: str = "X-Spam-Score"  # the score on every message let through; "" for none
    reject_message_from_rspamd: bool = True  # rspamd's smtp_message in our 5xx/4xx
    max_reply_size: int = Field(1 << 20, ge=1024)  # octets; a bigger reply is unusable
    max_connections: int = Field(16, ge=1, le=1000)  # kept per process
    max_idle: Duration = Field(60.0, gt=0)  # a kept connection unused this long is closed
    ping_on_start: bool = True  # GET /ping when the check is made, logged (never fails the start)
    required: bool = False  # rspamd not answering /ping makes /readyz say 503 (pinged every ping_interval)
    ping_interval: Duration = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parse_url(v)
        return v

    @field_validator("spam_flag_header", "score_header")
    @classmethod
    def _field_name(cls, v: str, info) -> str:
        if v == "" and info.field_name == "score_header":
            return v
        if not _FIELD_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a header field name")
        return v

    @field_validator("mta_name")
    @classmethod
    def _mta_name(cls, v: str | None) -> str | None:
        if v is not None and _CONTROL.search(v):
            raise ValueError("has a control character")
        return v


class RSpamdCheck(Check):
    """type = "rspamd": rspamd's verdict on the finished message (data phase)."""

    Options = RspamdOptions

    def __init__(self, options, context: CheckContext):
        super().__init__(options, context)
        self.opts = RspamdOptions.model_validate(dict(options))
        o = self.opts
        self.client = RspamdClient(o.url, connect_timeout=o.connect_timeout, read_timeout=o.read_timeout,
                                   max_reply_size=o.max_reply_size, max_idle=o.max_idle,
                                   max_connections=o.max_connections)
        self.down: str | None = None  # why the last /ping failed (a required check's readiness)
        self._watch = None
        self._started = False
        self._start_background()

    def _start_background(self) -> None:
        """The /ping at start (or, required, the watch). A greenlet belongs to the hub of the
        thread that spawns it: a reload builds checks in a threadpool thread, whose hub never
        runs, so there the start waits for the first call on the server's hub (data, readiness)."""
        if self._started or not in_main_thread():
            return
        self._started = True
        if self.opts.required:
            self._watch = gevent.spawn(self._watch_loop)
        elif self.opts.ping_on_start:
            gevent.spawn(self.ping)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.kill(block=False)
        self.client.close()

    def ping_problem(self) -> str | None:
        """Why rspamd does not answer /ping with "pong" now, or None."""
        try:
            reply = self.client.request("GET", "/ping")
        except (RspamdUnavailable, RspamdBadReply) as exc:
            return str(exc)
        if reply.status != 200 or not reply.body.strip().startswith(b"pong"):
            return f"/ping answered HTTP {reply.status} {safe_text(reply.body[:40].decode('latin-1'))!r}"
        return None

    def ping(self) -> bool:
        """Whether rspamd answers; logged either way, never raised (a start never fails on it)."""
        problem = self.ping_problem()
        if problem:
            logger.warning("rspamd at {} is not answering: {}", self.client.url, problem)
        else:
            logger.info("rspamd at {} answers", self.client.url)
        return problem is None

    def _watch_loop(self) -> None:
        """required = true: /ping every ping_interval; a change is logged, kept in `down`."""
        first = True
        while True:
            problem = self.ping_problem()
            if problem and (first or not self.down):
                logger.warning("rspamd at {} is not answering: {}", self.client.url, problem)
            elif not problem and (first or self.down):
                logger.info("rspamd at {} answers{}", self.client.url, "" if first else " again")
            self.down, first = problem, False
            gevent.sleep(self.opts.ping_interval)

    def readiness(self) -> str | None:
        """Why the server should not get traffic because of this check (required = true and
        rspamd not answering its last /ping), or None. Read by the server's /readyz."""
        self._start_background()
        if self.down is None:
            return None
        return f"rspamd at {self.client.url} is not answering ({self.down})"

    # -- the data phase -------------------------------------------------------------------------
    def data(self, facts: Facts) -> Verdict:
        self._start_background()
        if facts.open_message is None:
            raise RspamdUnavailable("no message to scan")
        headers = request_headers(facts, self.opts.pass_all, self.opts.mta_name)
        reply = self.client.request("POST", "/checkv2", headers, body=facts.open_message)
        if reply.status != 200:
            raise RspamdBadReply(f"{self.client.url}: HTTP {reply.status} {safe_text(reply.body[:200].decode('latin-1'))}")
        return self.verdict(parse_reply(reply.body), facts)

    def verdict(self, result: dict, facts: Facts) -> Verdict:
        """The verdict for rspamd's parsed reply (see the module's docstring for the table)."""
        o = self.opts
        action = result["action"]
        score, required = result["score"], result["required_score"]
        why = f"rspamd {action}, score {score:.2f}/{required:.2f}"
        message = (result.get("messages") or {}).get("smtp_message") if o.reject_message_from_rspamd else None
        if action == "reject":
            return Verdict.reject(reply_text(message, REJECT_TEXT), 550, "5.7.1", reason=why)
        if action == "soft reject":
            return Verdict.defer(reply_text(message, SOFT_TEXT), 451, "4.7.1", reason=why)
        if action == "greylist":
            return Verdict.defer(reply_text(message, GREYLIST_TEXT), 451, "4.7.1", reason=why)
        added, removed = milter_changes(result.get("milter"), facts)
        results = {"rspamd": {"action": action, "score": score, "required_score": required}}
        if o.score_header:
            added.append((o.score_header, f"{score:.2f}"))
        if action == "rewrite subject":
            subject = result.get("subject")
            if not isinstance(subject, str) or not subject.strip():
                subject = f"***SPAM*** {facts.header('Subject') or ''}"
            removed.append(("Subject", 0))
            added.append(("Subject", encoded_subject(subject)))
        elif action == "add header":
            added.append((o.spam_flag_header, "YES"))
            if o.add_header_action == "quarantine":
                return Verdict.quarantine(why, headers=added, remove_headers=removed, results=results)
        elif action in ("quarantine", "discard"):
            return Verdict.quarantine(why, headers=added, remove_headers=removed, results=results)
        elif action != "no action":
            raise RspamdBadReply(f"rspamd answered an action we do not know: {safe_text(action, 60)!r}")
        return Verdict("accept", reason=why, headers=added, remove_headers=removed, results=results)


def parse_reply(body: bytes) -> dict:
    """rspamd's JSON reply, checked for what we use: action (a string), score and
    required_score (finite numbers). RspamdBadReply otherwise."""
    try:
        result = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise RspamdBadReply(f"reply is not JSON ({exc})") from None
    if not isinstance(result, dict):
        raise RspamdBadReply("reply is not a JSON object")
    action = result.get("action")
    if not isinstance(action, str):
        raise RspamdBadReply("reply has no action")
    for key in ("score", "required_score"):
        value = result.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RspamdBadReply(f"reply's {key} is not a number")
        result[key] = float(value)
    if not isinstance(result.get("messages", {}), dict):
        result["messages"] = {}
    return result


def milter_changes(block: Any, facts: Facts) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """rspamd's `milter` block as (fields to add, (name, n) fields to remove). Each header
    rspamd names is checked: a bad name or value is logged and left out, the rest applies.

    add_headers: name → value, {"value": ..., "order": n}, or a list of those.
    remove_headers: name → index: 0 every such field, n > 0 the n-th, n < 0 the n-th from
    the end (converted to our 1-based n with the message's own count of that field)."""
    added: list[tuple[str, str]] = []
    removed: list[tuple[str, int]] = []
    if not isinstance(block, dict):
        return added, removed
    adds = block.get("add_headers")
    for name, spec in (adds.items() if isinstance(adds, dict) else ()):
        for item in (spec if isinstance(spec, list) else [spec]):
            value = field_value(item.get("value") if isinstance(item, dict) else item)
            if not (isinstance(name, str) and _FIELD_NAME.fullmatch(name)) or value is None:
                logger.warning("rspamd: header field {!r} to add is unusable; left out", safe_text(name, 80))
                continue
            if len(added) >= ADDED_LIMIT:
                logger.warning("rspamd: more than {} header fields to add; the rest left out", ADDED_LIMIT)
                break
            added.append((name, value))
    removes = block.get("remove_headers")
    counts: dict[str, int] | None = None
    for name, index in (removes.items() if isinstance(removes, dict) else ()):
        if not (isinstance(name, str) and _FIELD_NAME.fullmatch(name)) \
                or isinstance(index, bool) or not isinstance(index, int):
            logger.warning("rspamd: header field {!r} to remove is unusable; left alone", safe_text(name, 80))
            continue
        if index >= 0:
            removed.append((name, index))
            continue
        if counts is None:  # read the header section only when an index counts from the end
            counts = {}
            for n, _ in facts.headers():
                counts[n.lower()] = counts.get(n.lower(), 0) + 1
        position = counts.get(name.lower(), 0) + index + 1
        if position >= 1:
            removed.append((name, position))
    return added, removed

