"""A check that asks a Postfix policy server (postgrey, policyd-spf, policyd-weight...).

The request carries the attributes Postfix's SMTP server sends (SMTPD_POLICY_README) that
we know at this phase; the reply's action, an access(5) action, becomes the verdict
(geosmtp.checks.access_actions). Servers written for Postfix work unchanged:

    [[check]]
    type = "policy"
    address = "127.0.0.1:10023"     # or "unix:/run/postgrey.sock"
    phases = ["rcpt"]

The check takes part only in the phases it is configured for: the phase methods are set on
the object when it is made (the engine calls what the object has).

`instance` is one value per mail transaction, the same for all its RCPTs, as Postfix sends
it: postgrey and policyd-weight use it to know one message from the next. It is kept in the
transaction's results ("policyd_instance"; "policyd_connection_instance" for connect and
helo), which is where the engine keeps what lasts exactly one transaction.

What goes in a request comes partly from the client (HELO, MAIL FROM, RCPT TO) and from DNS
(the PTR name). A CR or LF in a value would end its line and start another attribute of the
attacker's choosing ("helo_name=x\\nclient_address=127.0.0.1"), and a NUL is forbidden by
the protocol. Such characters (every control character) are replaced by "?", and the
request is sent: refusing to ask would let whoever sends a NUL in HELO choose the outcome
(skip the policy server, or be refused as the default action says); with "?" the server
still decides, on a value that matches no real name, so nothing is whitelisted by accident.
"""
from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import replace
from typing import Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geosmtp.checks.access_actions import UnusableReply, to_verdict
from geosmtp.checks.interface import ACCEPT, Check, CheckContext, Facts, Verdict
from geosmtp.checks.policy_client import PolicyClient, PolicyUnavailable, UnreadableReply, parse_address
from geosmtp.config import Duration

Phase = Literal["connect", "helo", "mail", "rcpt", "data"]
PROTOCOL_STATES = {  # SMTPD_POLICY_README's protocol_state for each of our phases
    "connect": "CONNECT",
    "helo": "EHLO",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "END-OF-MESSAGE",  # our data checks run on the finished message
}
CONNECTION_PHASES = ("connect", "helo")
TX_KEY = "policyd_instance"
CONNECTION_KEY = "policyd_connection_instance"
VALUE_LIMIT = 2048  # octets of one value: more than any SMTP line can carry
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SERIAL = itertools.count(1)

DEFAULT_VERDICTS = {  # a request that failed or a reply we cannot read (Postfix: default_action)
    "defer": lambda why: Verdict.defer("Server configuration problem", code=451, enhanced="4.3.5", reason=why),
    "reject": lambda why: Verdict.reject("Server configuration problem", code=550, enhanced="5.3.5", reason=why),
    "accept": lambda why: Verdict(ACCEPT, reason=why),
}


def clean_value(value: object) -> str:
    """One attribute value safe for its line: control characters (CR, LF, NUL...) as "?"."""
    return _CONTROL.sub("?", str(value))[:VALUE_LIMIT]


def new_instance() -> str:
    """A value unique in this process and over restarts: pid, time, a counter (as Postfix)."""
    return f"{os.getpid():x}.{time.time_ns() // 1000:x}.{next(_SERIAL)}"


def request_attributes(phase: str, facts: Facts, instance: str, policy_context: str | None = None
                       ) -> list[tuple[str, str]]:
    """The attributes of one smtpd_access_policy request, in Postfix's order. The Postfix 2.1
    set is always sent (empty when not known yet, as Postfix does); the later ones only when
    we know them (no SASL method, client port or server address reaches a check)."""
    name = facts.ptr or "unknown"
    recipients = facts.recipients
    if phase == "rcpt":
        recipient, count = facts.recipient or "", 0
    elif phase == "data":  # Postfix: the recipient only when there is exactly one
        recipient, count = (recipients[0] if len(recipients) == 1 else ""), len(recipients)
    else:
        recipient, count = "", 0
    attrs = [
        ("request", "smtpd_access_policy"),
        ("protocol_state", PROTOCOL_STATES[phase]),
        ("protocol_name", "ESMTP"),
        ("helo_name", facts.helo or ""),
        ("queue_id", facts.queue_id or ""),
        ("sender", facts.sender or ""),
        ("recipient", recipient),
        ("recipient_count", str(count)),
        ("client_address", str(facts.ip)),
        ("client_name", name),
        ("reverse_client_name", name),
        ("instance", instance),
    ]
    if facts.auth_user:
        attrs.append(("sasl_username", facts.auth_user))
    if facts.size is not None:
        attrs.append(("size", str(facts.size)))
    if facts.tls:
        protocol, _, cipher = facts.tls.partition(" ")
        attrs += [("encryption_protocol", protocol), ("encryption_cipher", cipher)]
    if policy_context:
        attrs.append(("policy_context", policy_context))
    return attrs


def encode_request(attrs: list[tuple[str, str]]) -> bytes:
    """name=value lines and the empty line, every value cleaned (see the module's docstring)."""
    lines = "".join(f"{name}={clean_value(value)}\n" for name, value in attrs)
    return (lines + "\n").encode("utf-8", "replace")


class PolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str  # "127.0.0.1:10023", "[::1]:10023" or "unix:/path" (an IP: no DNS for this)
    phases: list[Phase] = Field(default_factory=lambda: ["rcpt"], min_length=1)
    connect_timeout: Duration = Field(2.0, gt=0)
    read_timeout: Duration = Field(7.0, gt=0)  # the check's `timeout` (20 s) bounds it all
    max_idle: Duration = Field(300.0, gt=0)  # a kept connection unused this long is closed
    max_ttl: Duration = Field(1000.0, gt=0)  # and any after this long
    try_limit: int = Field(2, ge=1, le=5)  # attempts: a dead kept connection is reopened once
    retry_delay: Duration = Field(1.0, ge=0)  # before trying a connection that just failed again
    max_connections: int = Field(16, ge=1, le=1000)  # per process
    default_action: Literal["defer", "accept", "reject"] = "defer"  # no usable reply: 451 4.3.5
    policy_context: str | None = None  # sent as policy_context (Postfix 3.1)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a phase is named twice")
        return v


class PolicyCheck(Check):
    """type = "policy": one Postfix policy server, asked at the configured phases."""

    Options = PolicyOptions

    def __init__(self, options, context: CheckContext):
        super().__init__(options, context)
        opts = PolicyOptions.model_validate(dict(options))
        self.phases = tuple(opts.phases)
        self.default_action = opts.default_action
        self.policy_context = opts.policy_context
        self.client = PolicyClient(opts.address, connect_timeout=opts.connect_timeout,
                                   read_timeout=opts.read_timeout, max_idle=opts.max_idle,
                                   max_ttl=opts.max_ttl, try_limit=opts.try_limit,
                                   retry_delay=opts.retry_delay, max_connections=opts.max_connections)
        for phase in self.phases:  # only these: the engine calls the phase methods an object has
            setattr(self, phase, self._asker(phase))

    def _asker(self, phase: str):
        def ask(facts: Facts) -> Verdict:
            return self.ask(phase, facts)
        ask.__name__ = phase
        return ask

    def close(self) -> None:
        self.client.close()

    def ask(self, phase: str, facts: Facts) -> Verdict:
        key = CONNECTION_KEY if phase in CONNECTION_PHASES else TX_KEY
        instance = facts.results.get(key)
        minted = not isinstance(instance, str)
        if minted:
            instance = new_instance()
        request = encode_request(request_attributes(phase, facts, instance, self.policy_context))
        try:
            verdict = to_verdict(self.client.ask(request).get("action"))
        except (PolicyUnavailable, UnreadableReply, UnusableReply) as exc:
            why = f"policy service {self.client.address}: {exc}"
            logger.warning("{}; default_action={}", why, self.default_action)
            verdict = DEFAULT_VERDICTS[self.default_action](why)
        else:
            if verdict.action == ACCEPT and verdict.reason:
                logger.info("{} {}: {}", self.client.address, phase, verdict.reason)
        if minted:
            verdict = replace(verdict, results={**verdict.results, key: instance})
        return verdict
