"""A milter as an inbound check (`type = "milter"`): the MTA side of Sendmail's milter
protocol, version 6, as Postfix speaks it (MILTER_README, libmilter's mfdef.h).

One milter connection per SMTP session, opened at the session's first phase and reused for
all its transactions: connect, helo, mail (with its ESMTP arguments), rcpt, and at the end of
DATA the whole message (DATA, each header field, end of headers, body chunks of at most 65535
octets, end of message). A transaction that ends before its end of message (a refused RCPT
and RSET, the next MAIL, a new EHLO) is aborted (SMFIC_ABORT) before the next command; the
session's end sends SMFIC_QUIT. Steps the milter said it does not want are not sent, and
steps it said it will not answer are not waited for. The macros Postfix sends at each stage
go along with each step, those the milter asked for (SETSYMLIST) if it did.

The replies, as Postfix reads them: continue; accept (at connect or helo: the milter is done
with the whole session; later: with this message); reject (550 5.7.1), tempfail (451 4.7.1)
and a reply code of the milter's own (made safe: one line, a matching enhanced code, text
of its own or ours) refuse the command at hand, and at connect or helo every later command
too; discard, which Postfix obeys by dropping the message, quarantines it here instead
(accepted into hold/, never dropped unseen); quarantine; progress (keep waiting, bounded).
At the end of the message the milter's modifications become edits (geosmtp.checks.edits),
applied once, to the message before it is published, whole or not at all.

When the milter cannot be reached, times out, resets the connection or answers something
that is not the protocol, `default_action` applies to that command and every later one of
the session (Postfix's milter_default_action): "tempfail" (451 4.7.1), "reject" (550 5.7.1)
or "accept" (the milter is left out for the rest of the session). A log line and the
geosmtp_check_errors metric (check "milter <address>") say which milter and why.

Header fields go to the milter as Postfix sends them: without our own Received: (the first
field; Sendmail compatibility), the space after the colon dropped unless the milter asks
for it (SMFIP_HDR_LEADSPC), folded lines joined by LF. So a milter's "change the n-th
Received:" counts without ours, and "insert at index i" counts with it (0: the very top).
"""
from __future__ import annotations

import os
import re
import socket as _stdsocket
import tempfile
import time
from typing import Literal

from gevent import socket
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geosmtp import __version__, metrics
from geosmtp.checks import edits as ed
from geosmtp.checks import milter_codec as mc
from geosmtp.checks.interface import ACCEPT, QUARANTINE, Check, CheckContext, Facts, Verdict, make_reply
from geosmtp.checks.policy_client import parse_address
from geosmtp.config import Duration

HEADER_LIMIT = 1024 * 1024  # octets of header section sent to the milter
MAX_PACKETS = 100_000  # replies to one step (modifications, body chunks, progress)
MAX_EDIT_OCTETS = 1024 * 1024  # header and envelope modifications of one message, in all
MAX_PROGRESS = 1000  # "still working" packets for one step
MAX_SESSIONS = 10_000  # conversations kept at once (a session that never ended is let go)
FINAL_AT_CONNECT = (mc.SMFIC_CONNECT, mc.SMFIC_HELO)

# the macros Postfix sends by default at each step (milter_*_macros), and the ones MILTER_README
# lists as always there; a milter's own list (SETSYMLIST) or `macros` replaces them
DEFAULT_MACROS = {
    "connect": ("j", "{daemon_name}", "v", "_", "{client_addr}", "{client_name}", "{client_ptr}"),
    "helo": ("{tls_version}", "{cipher}"),
    "mail": ("i", "{auth_type}", "{auth_authen}", "{mail_addr}"),
    "rcpt": ("i", "{rcpt_addr}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i",),
}
STAGES = {"connect": mc.SMFIM_CONNECT, "helo": mc.SMFIM_HELO, "mail": mc.SMFIM_ENVFROM,
          "rcpt": mc.SMFIM_ENVRCPT, "data": mc.SMFIM_DATA, "eoh": mc.SMFIM_EOH, "eom": mc.SMFIM_EOM}
COMMAND_STAGE = {mc.STAGE_COMMAND[v]: k for k, v in STAGES.items()}

# what each modification needs to have been negotiated
NEEDS = {mc.SMFIR_ADDHEADER: mc.SMFIF_ADDHDRS, mc.SMFIR_INSHEADER: mc.SMFIF_ADDHDRS,
         mc.SMFIR_CHGHEADER: mc.SMFIF_CHGHDRS, mc.SMFIR_CHGFROM: mc.SMFIF_CHGFROM,
         mc.SMFIR_ADDRCPT: mc.SMFIF_ADDRCPT, mc.SMFIR_ADDRCPT_PAR: mc.SMFIF_ADDRCPT_PAR,
         mc.SMFIR_DELRCPT: mc.SMFIF_DELRCPT, mc.SMFIR_REPLBODY: mc.SMFIF_CHGBODY,
         mc.SMFIR_QUARANTINE: mc.SMFIF_QUARANTINE}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
APPEND = 1 << 31  # an insert index past any header section: SMFIR_ADDHEADER appends


class MilterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str  # "inet:127.0.0.1:8891", "inet:[::1]:8891", "inet6:[::1]:8891", "unix:/run/x.sock"
    connect_timeout: Duration = 30.0  # connecting and the option negotiation
    command_timeout: Duration = 30.0  # a reply to connect, helo, mail, rcpt, data
    content_timeout: Duration = 300.0  # a reply to a header, end of headers, body, end of message
    default_action: Literal["tempfail", "accept", "reject"] = "tempfail"
    macros: dict[Literal["connect", "helo", "mail", "rcpt", "data", "eoh", "eom"], list[str]] = {}
    max_reply_size: int = Field(1024 * 1024, ge=65536)  # one reply packet; a longer one is refused unread
    max_body_size: int = Field(64 * 1024 * 1024, ge=0)  # a body the milter replaces

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(_normalized(value))
        return value


def _normalized(address: str) -> str:
    return "inet:" + address[6:] if address.startswith("inet6:") else address


class MilterFailed(Exception):
    """The milter is out for this session: `kind` (unavailable, timeout, reset, garbage)."""

    def __init__(self, kind: str, what: str):
        super().__init__(what)
        self.kind = kind


class _Done(Exception):
    """The milter gave a verdict for this step (carried), or is finished with the session."""

    def __init__(self, verdict: Verdict | None):
        super().__init__()
        self.verdict = verdict


class MilterCheck(Check):
    """One configured milter; a Conversation per SMTP session, keyed by Facts.session."""

    Options = MilterOptions

    def __init__(self, options, context: CheckContext):
        super().__init__(options, context)
        self.address = options["address"]
        self.family, self.sockaddr = parse_address(_normalized(self.address))
        self.label = f"milter {self.address}"
        self.conversations: dict[str, Conversation] = {}

    # -- the phases ------------------------------------------------------------------------------
    def connect(self, facts: Facts) -> Verdict | None:
        return self._step(facts, lambda c: c.connect(facts))

    def helo(self, facts: Facts) -> Verdict | None:
        return self._step(facts, lambda c: c.helo(facts))

    def mail(self, facts: Facts) -> Verdict | None:
        return self._step(facts, lambda c: c.mail(facts))

    def rcpt(self, facts: Facts) -> Verdict | None:
        return self._step(facts, lambda c: c.rcpt(facts))

    def data(self, facts: Facts) -> Verdict | None:
        return self._step(facts, lambda c: c.message(facts))

    def end_session(self, facts: Facts) -> None:
        conv = self.conversations.pop(facts.session, None)
        if conv is not None:
            conv.quit()

    def close(self) -> None:
        """A reload replaced this check: sessions still open finish their conversations."""

    # -- one step of a session's conversation ----------------------------------------------------
    def _step(self, facts: Facts, action) -> Verdict | None:
        conv = self.conversations.get(facts.session)
        if conv is None:
            while len(self.conversations) >= MAX_SESSIONS:  # sessions whose end was never told
                self.conversations.pop(next(iter(self.conversations))).quit()
            conv = self.conversations[facts.session] = Conversation(self, facts.session)
        if conv.over:
            return conv.after
        try:
            conv.open(facts)
            return action(conv)
        except _Done as done:
            return done.verdict
        except MilterFailed as exc:
            return conv.failed(exc, facts.phase)
        except BaseException:  # the engine's timeout (or a kill): the stream is out of step
            conv.failed(MilterFailed("timeout", "the check's timeout ended the exchange"), facts.phase,
                        count=False)
            raise

    def fallback(self) -> Verdict | None:
        action = self.options["default_action"]
        if action == "accept":
            return None
        if action == "reject":
            return Verdict.reject("Service unavailable", 550, "5.7.1", reason=f"{self.label} unavailable")
        return Verdict.defer("Service unavailable - try again later", 451, "4.7.1",
                             reason=f"{self.label} unavailable")


class Conversation:
    """The milter connection of one SMTP session and where it stands."""

    def __init__(self, check: MilterCheck, session: str):
        self.check = check
        self.options = check.options
        self.log = logger.bind(sid=session) if session else logger
        self.sock = None
        self.neg: mc.Negotiated | None = None
        self.out: list[bytes] = []  # packets that wait for no reply, sent with the next one that does
        self.inbuf = bytearray()  # octets read and not yet taken
        self.over = False  # nothing more is sent in this session; `after` answers every step
        self.after: Verdict | None = None
        self.connected = False  # SMFIC_CONNECT was sent (or skipped)
        self.in_message = False  # MAIL was sent and the message not finished: abort before more
        self.message_done = False  # the milter accepted or discarded this message: no more of it
        self.edits: list = []
        self.quarantine: str | None = None
        self.body = None  # the replaced body (a temporary file) while it arrives
        self.body_size = 0
        self.hidden_received = False  # our Received: was not shown: the milter's counts lack it

    # -- the connection ----------------------------------------------------------------------------
    def open(self, facts: Facts) -> None:
        if self.sock is not None:
            return
        started = time.monotonic()
        timeout = self.options["connect_timeout"]
        try:
            sock = socket.socket(self.check.family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.check.sockaddr)
        except (OSError, _stdsocket.timeout) as exc:
            raise MilterFailed("unavailable", f"cannot connect: {exc}") from None
        self.sock = sock
        self.send(mc.optneg(), reply=True, timeout=timeout)
        code, data = self.packet(started + timeout)
        if code != mc.SMFIC_OPTNEG:
            raise MilterFailed("garbage", f"answered {code!r} to the option negotiation")
        try:
            self.neg = mc.parse_optneg(data)
        except mc.ProtocolError as exc:
            raise MilterFailed("garbage", f"option negotiation: {exc}") from None
        if not self.connected:
            self.connected = True
            self.connect_step(facts)

    def send(self, data: bytes, reply: bool, timeout: float) -> None:
        """Queue a packet; write the queue when this one is answered (fewer writes: headers
        and body chunks that get no reply go out together)."""
        self.out.append(data)
        if reply or sum(map(len, self.out)) > 256 * 1024:
            payload, self.out = b"".join(self.out), []
            try:
                self.sock.settimeout(timeout)
                self.sock.sendall(payload)
            except (OSError, _stdsocket.timeout) as exc:
                kind = "timeout" if isinstance(exc, _stdsocket.timeout) else "reset"
                raise MilterFailed(kind, f"cannot write: {exc}") from None

    def packet(self, deadline: float) -> tuple[bytes, bytes]:
        """One reply packet, whole by `deadline`; one longer than max_reply_size is refused
        from its length, unread."""
        head = self._read(4, deadline)
        try:
            length = mc.packet_length(head, self.options["max_reply_size"])
        except mc.ProtocolError as exc:
            raise MilterFailed("garbage", str(exc)) from None
        data = self._read(length, deadline)
        return data[:1], data[1:]

    def _read(self, n: int, deadline: float) -> bytes:
        """`n` octets, from what an earlier recv brought first (one recv usually brings a
        whole reply: its length, its command and its data)."""
        buf = self.inbuf
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MilterFailed("timeout", "no reply in time")
            try:
                self.sock.settimeout(left)
                chunk = self.sock.recv(max(n - len(buf), 65536))
            except _stdsocket.timeout:
                raise MilterFailed("timeout", "no reply in time") from None
            except OSError as exc:
                raise MilterFailed("reset", f"connection lost: {exc}") from None
            if not chunk:
                raise MilterFailed("reset", "the milter closed the connection")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def close(self) -> None:
        self.over = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self._drop_body()

    def quit(self) -> None:
        """The session has ended: abort an unfinished message, then SMFIC_QUIT."""
        if self.sock is not None and not self.over:
            try:
                if self.in_message:
                    self.send(mc.packet(mc.SMFIC_ABORT), reply=False, timeout=1)
                self.send(mc.packet(mc.SMFIC_QUIT), reply=True, timeout=self.options["command_timeout"])
            except MilterFailed:
                pass
        self.close()

    def failed(self, exc: MilterFailed, phase: str, count: bool = True) -> Verdict | None:
        """The milter is out for the rest of the session: default_action from now on."""
        self.close()
        self.after = self.check.fallback()
        if count:
            metrics.CHECK_ERRORS.labels(self.check.label, exc.kind).inc()
            self.log.warning("{}: {} {} ({}); default_action={}", self.check.label, phase, exc.kind,
                             str(exc)[:300], self.options["default_action"])
        return self.after

    # -- steps -------------------------------------------------------------------------------------
    def macros(self, stage: str, facts: Facts) -> None:
        """The stage's macros (SMFIC_MACRO), sent even when the step itself is skipped (as
        Postfix does); no packet when none has a value."""
        names = self.neg.symlists.get(STAGES[stage]) or self.options["macros"].get(stage) or DEFAULT_MACROS[stage]
        values = known_macros(facts, self.check.context)
        pairs = [(n, values[n]) for n in names if values.get(n)]
        if pairs:
            self.send(mc.macros(mc.STAGE_COMMAND[STAGES[stage]], pairs), reply=False,
                      timeout=self.options["command_timeout"])

    def timeout_for(self, cmd: bytes) -> float:
        content = cmd in (mc.SMFIC_HEADER, mc.SMFIC_EOH, mc.SMFIC_BODY, mc.SMFIC_BODYEOB)
        return self.options["content_timeout" if content else "command_timeout"]

    def step(self, cmd: bytes, data: bytes = b"") -> tuple[bytes, bytes] | None:
        """Send one step; its final reply, or None when the step is skipped or gets no reply."""
        if self.neg.skips(cmd):
            return None
        timeout = self.timeout_for(cmd)
        answer = not self.neg.no_reply(cmd)
        self.send(mc.packet(cmd, data), reply=answer, timeout=timeout)
        if not answer:
            return None
        return self.answer(cmd, timeout)

    def answer(self, cmd: bytes, timeout: float) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        progress = 0
        for _ in range(MAX_PACKETS):
            code, data = self.packet(deadline)
            if code == mc.SMFIR_PROGRESS:
                progress += 1
                if progress > MAX_PROGRESS:
                    raise MilterFailed("garbage", f"more than {MAX_PROGRESS} progress packets")
                deadline = time.monotonic() + timeout
            elif code in NEEDS:
                if cmd != mc.SMFIC_BODYEOB and code != mc.SMFIR_QUARANTINE:
                    raise MilterFailed("garbage", f"a modification {code!r} before the end of the message")
                self.modification(code, data)
                deadline = time.monotonic() + timeout
            else:
                return code, data
        raise MilterFailed("garbage", f"more than {MAX_PACKETS} packets for one step")

    def verdict(self, cmd: bytes, code: bytes, data: bytes) -> Verdict | None:
        """A final reply as our verdict; raises _Done when the milter is finished with the
        session (accept at connect or helo)."""
        at_connect = cmd in FINAL_AT_CONNECT
        label = self.check.label
        if code in (mc.SMFIR_CONTINUE, mc.SMFIR_ACCEPT, mc.SMFIR_REJECT, mc.SMFIR_TEMPFAIL,
                    mc.SMFIR_DISCARD, mc.SMFIR_SHUTDOWN, mc.SMFIR_CONN_FAIL) and data:
            raise MilterFailed("garbage", f"reply {code!r} with {len(data)} octets of data")
        if code == mc.SMFIR_CONTINUE:
            return None
        if code == mc.SMFIR_ACCEPT:
            if at_connect:  # nothing more for this session
                self.quit()
                self.after = None
                raise _Done(None)
            self.message_done = True
            return None
        if code == mc.SMFIR_DISCARD:
            if at_connect:
                raise MilterFailed("garbage", "discard at connect or helo")
            self.message_done = True
            return Verdict.quarantine(f"{label} said discard (kept in hold/, not dropped)")
        if code in (mc.SMFIR_SHUTDOWN, mc.SMFIR_CONN_FAIL):
            verdict = Verdict.close("Service shutting down" if code == mc.SMFIR_SHUTDOWN else "Connection failed",
                                    reason=f"{label}: {'shutdown' if code == mc.SMFIR_SHUTDOWN else 'connection failure'}")
            self._refuse_all(verdict)
            return verdict
        if code == mc.SMFIR_REJECT:
            verdict = Verdict.reject("Command rejected", reason=f"{label}: reject")
        elif code == mc.SMFIR_TEMPFAIL:
            verdict = Verdict.defer("Service unavailable - try again later", reason=f"{label}: tempfail")
        elif code == mc.SMFIR_REPLYCODE:
            verdict = replycode_verdict(data, label)
        else:
            raise MilterFailed("garbage", f"unexpected reply {code!r}")
        if at_connect:
            self._refuse_all(verdict)
        return verdict

    def _refuse_all(self, verdict: Verdict) -> None:
        """Every later command of the session gets `verdict` (Postfix's reject_con)."""
        self.quit()
        self.after = verdict

    def ask(self, cmd: bytes, data: bytes = b"") -> Verdict | None:
        reply = self.step(cmd, data)
        return None if reply is None else self.verdict(cmd, *reply)

    def connect_step(self, facts: Facts) -> None:
        self.macros("connect", facts)
        ip = facts.ip
        family = mc.SMFIA_INET6 if ip.version == 6 else mc.SMFIA_INET
        name = client_text(facts.ptr or f"[{ip.compressed}]")
        verdict = self.ask(mc.SMFIC_CONNECT, mc.connect_data(name, family, 0, ip.compressed))
        if verdict is not None:
            raise _Done(verdict)

    def connect(self, facts: Facts) -> Verdict | None:
        return None  # open() sent SMFIC_CONNECT: whatever phase comes first

    def abort_message(self) -> None:
        if self.in_message:
            self.send(mc.packet(mc.SMFIC_ABORT), reply=False, timeout=self.options["command_timeout"])
        self.in_message = self.message_done = False
        self.edits, self.quarantine, self.edit_octets = [], None, 0
        self._drop_body()

    def helo(self, facts: Facts) -> Verdict | None:
        self.abort_message()  # EHLO ends a transaction
        self.macros("helo", facts)
        return self.ask(mc.SMFIC_HELO, mc.cstr(client_text(facts.helo or "")))

    def mail(self, facts: Facts) -> Verdict | None:
        self.abort_message()
        self.in_message = True
        self.macros("mail", facts)
        return self.ask(mc.SMFIC_MAIL, mc.cstr(f"<{client_text(facts.sender or '')}>"))

    def rcpt(self, facts: Facts) -> Verdict | None:
        if self.message_done:
            return None
        self.macros("rcpt", facts)
        return self.ask(mc.SMFIC_RCPT, mc.cstr(f"<{client_text(facts.recipient or '')}>"))

    def message(self, facts: Facts) -> Verdict | None:
        if not self.in_message:  # the MAIL phase was not ours (a check before us refused...)
            self.in_message = True
        if self.message_done:
            return None
        section = facts.header_section(HEADER_LIMIT)
        self.macros("data", facts)
        if (verdict := self.ask(mc.SMFIC_DATA)) is not None or self.message_done:
            return verdict
        leadspc = bool(self.neg.protocol & mc.SMFIP_HDR_LEADSPC)
        self.hidden_received = False
        if not self.neg.skips(mc.SMFIC_HEADER):
            for i, (name, value) in enumerate(header_fields(section, leadspc)):
                if i == 0 and name.lower() == b"received":  # ours: not shown (as Postfix)
                    self.hidden_received = True
                    continue
                if (verdict := self.ask(mc.SMFIC_HEADER, mc.cstr(name) + mc.cstr(value))) is not None \
                        or self.message_done:
                    return verdict
        else:
            fields = header_fields(section, leadspc)
            self.hidden_received = bool(fields) and fields[0][0].lower() == b"received"
        self.macros("eoh", facts)
        if (verdict := self.ask(mc.SMFIC_EOH)) is not None or self.message_done:
            return verdict
        if not self.neg.skips(mc.SMFIC_BODY):
            with facts.open_message() as fh:
                fh.seek(len(section), os.SEEK_CUR)
                while chunk := fh.read(mc.CHUNK):
                    reply = self.step(mc.SMFIC_BODY, chunk)
                    if reply is None:
                        continue
                    if reply[0] == mc.SMFIR_SKIP and self.neg.protocol & mc.SMFIP_SKIP:
                        break
                    if (verdict := self.verdict(mc.SMFIC_BODY, *reply)) is not None or self.message_done:
                        return verdict
        self.macros("eom", facts)
        reply = self.step(mc.SMFIC_BODYEOB)
        self.in_message = False  # finished: no abort needed
        verdict = self.verdict(mc.SMFIC_BODYEOB, *reply)
        edits = list(self.edits)
        if self.body is not None:
            edits.append(ed.BodyReplace(self.body))
            self.body = None
        quarantine = self.quarantine
        self.edits, self.quarantine, self.message_done, self.edit_octets = [], None, False, 0
        if verdict is not None and verdict.action != ACCEPT:
            if verdict.action == QUARANTINE:
                return Verdict(QUARANTINE, reason=verdict.reason, edits=tuple(edits))
            return verdict
        if quarantine is not None:
            return Verdict(QUARANTINE, reason=f"{self.check.label}: {quarantine}", edits=tuple(edits))
        return Verdict(ACCEPT, edits=tuple(edits)) if edits else None

    # -- modifications at the end of the message ---------------------------------------------------
    def modification(self, code: bytes, data: bytes) -> None:
        if not self.neg.actions & NEEDS[code]:
            raise MilterFailed("garbage", f"modification {code!r} not negotiated")
        if code != mc.SMFIR_REPLBODY:  # the replaced body has its own bound (max_body_size)
            self.edit_octets = getattr(self, "edit_octets", 0) + len(data)
            if self.edit_octets > MAX_EDIT_OCTETS:
                raise MilterFailed("garbage", f"modifications of more than {MAX_EDIT_OCTETS} octets for one message")
        try:
            if code == mc.SMFIR_REPLBODY:
                self._body_chunk(data)
            elif code == mc.SMFIR_QUARANTINE:
                (reason,) = mc.split_strings(data, 1)
                self.quarantine = text(reason)[:200] or "quarantine"
            elif code == mc.SMFIR_ADDHEADER:
                name, value = mc.split_strings(data, 2)
                self.edits.append(ed.HeaderInsert(APPEND, field_name(name), self.field_value(value)))
            elif code == mc.SMFIR_INSHEADER:
                index, rest = mc.split_index(data)
                name, value = mc.split_strings(rest, 2)
                self.edits.append(ed.HeaderInsert(index, field_name(name), self.field_value(value)))
            elif code == mc.SMFIR_CHGHEADER:
                index, rest = mc.split_index(data)
                name, value = mc.split_strings(rest, 2)
                n = max(index, 1)  # Sendmail: 0 is the first, like 1
                if name.lower() == b"received" and self.hidden_received:
                    n += 1  # the milter counts without ours
                self.edits.append(ed.HeaderChange(field_name(name), n, self.field_value(value)))
            elif code == mc.SMFIR_CHGFROM:
                parts = mc.split_strings(data)
                self._ignored_args("change sender", parts[1:])
                self.edits.append(ed.SenderChange(text(parts[0])))
            elif code in (mc.SMFIR_ADDRCPT, mc.SMFIR_ADDRCPT_PAR):
                parts = mc.split_strings(data, 1 if code == mc.SMFIR_ADDRCPT else None)
                self._ignored_args("add recipient", parts[1:])
                self.edits.append(ed.RecipientAdd(text(parts[0])))
            elif code == mc.SMFIR_DELRCPT:
                (rcpt,) = mc.split_strings(data, 1)
                self.edits.append(ed.RecipientRemove(text(rcpt)))
        except (mc.ProtocolError, ValueError) as exc:
            raise MilterFailed("garbage", f"modification {code!r}: {exc}") from None

    def _ignored_args(self, what: str, args: list[bytes]) -> None:
        args = [a for a in args if a]
        if args:  # as Postfix: ESMTP arguments of these are not used
            self.log.info("{}: {}: ignoring ESMTP arguments {!r}", self.check.label, what,
                          text(b" ".join(args))[:200])

    def field_value(self, raw: bytes) -> str:
        """A header value from the milter as one we write: one space after the colon is ours
        (with HDR_LEADSPC the milter's own is dropped), LF or CRLF folding becomes CRLF + the
        line's own white space (a tab if it had none), empty lines and control characters go."""
        value = text(raw)
        if self.neg.protocol & mc.SMFIP_HDR_LEADSPC and value[:1] == " ":
            value = value[1:]
        lines = [line for line in value.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        out = [safe_line(lines[0])]
        for line in lines[1:]:
            if not line.strip():
                continue
            out.append(safe_line(line if line[:1] in (" ", "\t") else "\t" + line))
        return "\r\n".join(out)

    def _body_chunk(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > self.options["max_body_size"]:
            raise MilterFailed("garbage", f"a replaced body over {self.options['max_body_size']} octets")
        if self.body is None:
            self.body = tempfile.TemporaryFile()
        self.body.write(data)

    def _drop_body(self) -> None:
        if self.body is not None:
            self.body.close()
        self.body, self.body_size = None, 0


# -- helpers ---------------------------------------------------------------------------------------
def text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def client_text(value: str) -> str:
    """A client's word (HELO, an address, a PTR name) for a milter: control characters (a
    NUL, CR, LF...) as "?": a milter may copy it into a header field it writes."""
    return _CONTROL.sub("?", value)


def safe_line(line: str) -> str:
    return "".join("?" if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in line)


def field_name(raw: bytes) -> str:
    name = raw.decode("ascii", "replace").strip()
    if not name:
        raise ValueError("an empty header field name")
    return name


def header_fields(section: bytes, leadspc: bool) -> list[tuple[bytes, bytes]]:
    """(name, value) of each field of a header section as the milter gets them: folded lines
    joined by LF (Sendmail's form), the one space after the colon dropped unless `leadspc`."""
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in section.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
            continue
        name, colon, rest = line.partition(b":")
        if colon and name.strip():
            fields.append((name.strip(), [rest]))
    out = []
    for name, lines in fields:
        value = b"\n".join(lines)
        if not leadspc and value[:1] == b" ":
            value = value[1:]
        out.append((name, value))
    return out


def replycode_verdict(data: bytes, label: str) -> Verdict:
    """SMFIR_REPLYCODE as a verdict: 4xx defer (421: close), 5xx reject, the text made safe."""
    try:
        code, enhanced, said = mc.parse_replycode(data)
    except mc.ProtocolError as exc:
        raise MilterFailed("garbage", str(exc)) from None
    reason = f"{label}: {code} {said}".strip()
    if code == 421:
        return Verdict("close", reply=make_reply(421, enhanced or "4.7.0", said or "Service not available", close=True),
                       reason=reason)
    if code >= 500:
        return Verdict("reject", reply=make_reply(code, enhanced or "5.7.1", said or "Command rejected"), reason=reason)
    return Verdict("defer", reply=make_reply(code, enhanced or "4.7.1", said or "Service unavailable - try again later"),
                   reason=reason)


def known_macros(facts: Facts, context: CheckContext) -> dict[str, str]:
    """The macro values we have now (MILTER_README's table), by name."""
    ip = facts.ip.compressed
    name = facts.ptr or "unknown"
    values = {
        "j": context.hostname or facts.hostname,
        "{daemon_name}": facts.listener,
        "v": f"geosmtp {__version__}",
        "_": f"{facts.ptr or 'unknown'} [{ip}]",
        "{client_addr}": ip,
        "{client_name}": name,
        "{client_ptr}": name,
    }
    if facts.tls:
        version, _, cipher = facts.tls.partition(" ")
        values["{tls_version}"], values["{cipher}"] = version, cipher
    if facts.auth_user:
        values["{auth_authen}"] = facts.auth_user
        values["{auth_type}"] = "unknown"  # the SASL mechanism is not among the facts
    if facts.queue_id:
        values["i"] = facts.queue_id
    if facts.sender is not None:
        values["{mail_addr}"] = facts.sender
    if facts.recipient:
        values["{rcpt_addr}"] = facts.recipient
    return {name: client_text(value) for name, value in values.items()}
