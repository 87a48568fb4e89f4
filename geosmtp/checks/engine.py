"""Runs the configured checks of each SMTP phase and turns their verdicts into one answer.

Per listener, one Engine (built by geosmtp.parts from the [[check]] tables, in config order);
per session, one SessionChecks holding what the checks learnt: results and header fields of
the connection (connect, helo) and of the transaction (mail, rcpt, data), and whether the
message goes to quarantine. Each check runs under its timeout; an exception or a timeout
becomes its on_error verdict, logged and counted. A phase stops at the first reject, defer
or close; quarantines, headers and results add up.

At the end of DATA (geosmtp.spool's commit seam: the message is finished on disk, nothing is
queued) the data checks run, any Authentication-Results a client sent in our name is removed
(RFC 8601 5), ours is written from the methods' results, and the envelope gets the header
fields and the quarantine reason every delivery target and geosmtp-queue honour.
"""
from __future__ import annotations

import time
from collections import ChainMap
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Callable

import gevent
from loguru import logger

from geosmtp import metrics
from geosmtp.checks import edits as ed
from geosmtp.checks import headers as hdr
from geosmtp.checks.authresults import format_header, is_ours
from geosmtp.checks.interface import (
    ACCEPT, CLOSE, DEFER, HEADER_SECTION_LIMIT, QUARANTINE, REJECT, Facts, Verdict, phases_of,
)
from geosmtp.replies import Reply

CONNECTION_PHASES = ("connect", "helo")  # what these learn holds for every message of the session

REFUSED = {  # the reply when a verdict carries none
    REJECT: Reply(550, "5.7.1", "Refused by policy"),
    DEFER: Reply(451, "4.7.1", "Try again later"),
    CLOSE: Reply(421, "4.7.0", "Closing connection", close=True),
}
EDIT_FAILED = Reply(451, "4.3.0", "Temporary local problem, try again later")  # edits not applied
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header section too large")
ON_ERROR = {  # a check that failed or timed out, by its on_error
    "defer": Reply(451, "4.3.0", "Temporary local problem, try again later"),
    "reject": Reply(550, "5.7.1", "Refused by policy"),
}


@dataclass(frozen=True)
class CheckSpec:
    """One configured check: its name (for logs and metrics), the object, its settings."""

    name: str
    check: Any
    timeout: float = 20.0
    on_error: str = "defer"  # "accept" | "defer" | "reject"
    skip_trusted: bool = True  # not for authenticated clients and trusted networks
    phases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.phases:
            object.__setattr__(self, "phases", phases_of(self.check))
        # the metrics' children, looked up once (labels() costs a few microseconds a call)
        object.__setattr__(self, "seconds", metrics.CHECK_SECONDS.labels(self.name))
        object.__setattr__(self, "verdicts", lru_cache(maxsize=64)(
            lambda phase, verdict: metrics.CHECK_VERDICTS.labels(self.name, phase, verdict)))


def at_connect(reply: Reply) -> Reply:
    """RFC 5321 3.1: before the greeting a refusal is 554 (or 421 for a temporary one), and
    the connection ends with it."""
    code = 554 if reply.code >= 500 else 421
    return Reply(code, reply.enhanced, reply.text, close=True)


class Engine:
    """The checks of one listener, by phase."""

    def __init__(self, specs: list[CheckSpec], hostname: str, records_auth: bool = False):
        self.specs = specs
        self.hostname = hostname
        self.by_phase = {p: [s for s in specs if p in s.phases] for p in ("connect", "helo", "mail", "rcpt", "data")}
        # the checks that keep state per SMTP session (end_session lets it go)
        self.stateful = [s for s in specs if callable(getattr(s.check, "end_session", None))]
        # we write Authentication-Results (some check records a method): claims in our name go
        self.records_auth = records_auth or any(getattr(s.check, "records_auth", False) for s in specs)

    @property
    def has_data(self) -> bool:
        return bool(self.by_phase["data"]) or self.records_auth

    def session(self) -> "SessionChecks":
        return SessionChecks(self)

    @staticmethod
    def close_one(spec: CheckSpec) -> None:
        """Release what a check holds, when a reload replaced it (sessions still open may
        call it again: close() lets go of idle resources only)."""
        close = getattr(spec.check, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            logger.exception("check {}: close failed", spec.name)


NO_CHECKS = Engine([], "")


@dataclass
class _Learnt:
    results: dict = field(default_factory=dict)
    headers: list = field(default_factory=list)
    auth: list = field(default_factory=list)
    quarantine: list = field(default_factory=list)
    remove: list = field(default_factory=list)  # (name, n) fields to remove (data phase)
    edits: list = field(default_factory=list)  # geosmtp.checks.edits, in order (data phase)


_EMPTY = _Learnt()


class SessionChecks:
    """What one session's checks have learnt, and the phase calls the session makes."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.connection = _Learnt()
        self.tx = _Learnt()
        self._view: tuple = (None, None)  # (the transaction, its results view)

    @property
    def ptr(self) -> str | None:
        return self.connection.results.get("ptr")

    def end_transaction(self) -> None:
        if self.tx != _EMPTY:
            self.tx = _Learnt()

    def wants(self, phase: str) -> bool:
        return bool(self.engine.by_phase[phase])

    def results(self, tx: "_Learnt | None" = None) -> MappingProxyType:
        """What the connection's and the transaction's checks recorded, as a live read-only
        view: later checks of a phase see what earlier ones add, with no copy per verdict.
        The same view for the same transaction, so that Facts made with it need no copy."""
        tx = tx or self.tx
        if self._view[0] is not tx:
            self._view = (tx, MappingProxyType(ChainMap(tx.results, self.connection.results)))
        return self._view[1]

    def view(self, phase: str, learnt: "_Learnt | None" = None) -> MappingProxyType:
        """The results a run of `phase` shows its checks (give it to Facts: run() then uses
        the facts as they are)."""
        return self.results(None if learnt is self.connection or phase in CONNECTION_PHASES else learnt)

    def run(self, facts: Facts, log=logger, learnt: "_Learnt | None" = None) -> Reply | None:
        """Run the checks of facts.phase; the refusal to send, or None to go on. What they
        learn goes to the connection (connect, helo) or to the transaction (`learnt`, by
        default the current one)."""
        phase = facts.phase
        if learnt is None:
            learnt = self.connection if phase in CONNECTION_PHASES else self.tx
        # what every earlier check recorded, and what these record as they go
        view = self.results(None if learnt is self.connection else learnt)
        if facts.results is not view:
            facts = replace(facts, results=view)
        for spec in self.engine.by_phase[phase]:
            if spec.skip_trusted and (facts.trusted or facts.auth_user):
                continue
            verdict, reply = self._call(spec, facts, log)
            if reply is not None:
                return at_connect(reply) if phase == "connect" else reply
            if verdict is None:
                continue
            if verdict.results:
                learnt.results.update(verdict.results)  # facts.results is a live view of it
            learnt.headers.extend(verdict.headers)
            learnt.auth.extend(verdict.auth)
            if phase == "data":
                learnt.remove.extend(verdict.remove_headers)
                learnt.edits.extend(verdict.edits)
            if verdict.action == QUARANTINE:
                learnt.quarantine.append(f"{spec.name}: {verdict.reason}")
                log.info("check {}: {} quarantine: {}", spec.name, phase, verdict.reason)
            elif verdict.action != ACCEPT:
                out = verdict.reply or REFUSED[verdict.action]
                if phase == "connect" and verdict.action == CLOSE:  # RFC 5321 3.1: 554, then close
                    out = Reply(554, f"5{out.enhanced[1:]}" if out.enhanced else None, out.text, close=True)
                log.info("check {}: {} {}: {}", spec.name, phase, verdict.action, verdict.reason or out)
                return at_connect(out) if phase == "connect" else out
        return None

    def _call(self, spec: CheckSpec, facts: Facts, log) -> tuple[Verdict | None, Reply | None]:
        """One check's verdict, or (None, the on_error refusal) when it failed."""
        phase = facts.phase
        started = time.monotonic()
        try:
            with gevent.Timeout(spec.timeout):
                verdict = getattr(spec.check, phase)(facts)
            if verdict is not None and not isinstance(verdict, Verdict):
                raise TypeError(f"returned {type(verdict).__name__}, not a Verdict")
        except gevent.Timeout:
            return None, self._failed(spec, phase, "timeout", f"no verdict in {spec.timeout:g}s", log)
        except Exception as exc:
            log.opt(exception=exc).debug("check {} failed", spec.name)
            return None, self._failed(spec, phase, "error", f"{type(exc).__name__}: {exc}", log)
        finally:
            spec.seconds.observe(time.monotonic() - started)
        spec.verdicts(phase, verdict.action if verdict else ACCEPT).inc()
        return verdict, None

    @staticmethod
    def _failed(spec: CheckSpec, phase: str, kind: str, what: str, log) -> Reply | None:
        metrics.CHECK_ERRORS.labels(spec.name, kind).inc()
        log.warning("check {}: {} {} ({}); on_error={}", spec.name, phase, kind, what[:300], spec.on_error)
        return ON_ERROR.get(spec.on_error)

    # -- the end of DATA ----------------------------------------------------------------------
    def needs_data(self, tx: "_Learnt") -> bool:
        """Whether the end of DATA has anything to do (checks, our A-R, what was learnt)."""
        c = self.connection
        return self.engine.has_data or bool(c.headers or c.quarantine or tx.headers or tx.quarantine)

    def data(self, facts: Facts, tx: "_Learnt", rewrite: Callable, log=logger) -> "DataOutcome":
        """The data checks on the finished message (`tx`: what the transaction's MAIL and
        RCPT checks learnt); then what the message carries in front (our
        Authentication-Results, the checks' fields) and whether it is quarantined.
        `rewrite(edit)` replaces the message file, edit(src, dst) writing the new one: used
        only when fields are removed or edited (geosmtp.checks.edits: all of them in this one
        rewrite; the envelope edits go back in the outcome, for the session to apply)."""
        if self.wants("data") and (refusal := self.run(facts, log, tx)) is not None:
            return DataOutcome(refusal)
        hostname = self.engine.hostname
        rewrites = ed.changes_message(tx.edits)
        if tx.remove or self.engine.records_auth or rewrites:
            if not facts.header_section_whole():
                # fields past what we read could not be scanned (a forged A-R) or kept in place
                # (an edit): such a header section is refused, not passed on half-checked
                log.info("message refused: header section over {} octets", HEADER_SECTION_LIMIT)
                return DataOutcome(HEADER_TOO_BIG)
            section, fields = facts.header_section(), facts.fields()
            drop = hdr.field_indices(fields, tx.remove)
            if self.engine.records_auth:  # RFC 8601 5: nobody else speaks in our name
                forged = {i for i, f in enumerate(fields)
                          if f.name.lower() == "authentication-results" and is_ours(f.value, hostname)}
                if forged:
                    log.info("removed {} Authentication-Results field(s) in our name from the client",
                             len(forged))
                drop |= forged
            if rewrites:
                try:
                    rewrite(lambda src, dst: ed.rewrite_message(src, dst, section, fields, drop, tx.edits))
                except Exception as exc:  # whole or not at all: nothing is queued
                    log.error("the checks' changes to the message failed: {}: {}", type(exc).__name__, exc)
                    return DataOutcome(EDIT_FAILED)
            elif drop:
                rewrite(lambda src, dst: hdr.copy_without(src, dst, section, fields, drop))
        added = []
        auth = self.connection.auth + tx.auth
        if auth:
            added.append(("Authentication-Results", format_header(hostname, auth)))
        added += self.connection.headers + tx.headers
        quarantine = self.connection.quarantine + tx.quarantine
        envelope = tuple(e for e in tx.edits if isinstance(e, ed.ENVELOPE_EDITS))
        return DataOutcome(None, tuple(added), "; ".join(quarantine) or None, envelope)

    def end_session(self, facts: Facts, log=logger) -> None:
        """The SMTP session has ended: the checks that keep state per session (end_session)
        let it go, each under its timeout; a failure is logged, never raised."""
        for spec in self.engine.stateful:
            try:
                with gevent.Timeout(spec.timeout):
                    spec.check.end_session(facts)
            except (Exception, gevent.Timeout) as exc:
                log.warning("check {}: end of session failed ({}: {})", spec.name, type(exc).__name__, exc)


@dataclass(frozen=True)
class DataOutcome:
    refusal: Reply | None
    headers: tuple[tuple[str, str], ...] = ()
    quarantine: str | None = None  # why the message goes to hold/
    envelope: tuple = ()  # sender/recipient edits (geosmtp.checks.edits) for the session to apply

    def prefix(self) -> str:
        """The fields as the text put in front of the message ("Name: value" CRLF lines)."""
        return "".join(f"{name}: {value}\r\n" for name, value in self.headers)
