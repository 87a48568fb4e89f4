"""One SMTP session: the command loop, connection state and the mail transaction.

Read a line → parse → check → act → exactly one reply. Each verb has one handler that returns
a Reply; only the loop writes replies, counts errors and closes. The connection state
(greeting, later TLS and AUTH) lives on the Session; the transaction (MAIL..DATA) is a
separate object that RSET, EHLO/HELO and the end of DATA drop.
"""
from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Callable

from loguru import logger

from geosmtp import policy, replies
from geosmtp.connection import (
    BareNewline,
    Connection,
    ConnectionClosed,
    LineFlood,
    LineTooLong,
    ReadTimeout,
)
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.protocol import (
    Address,
    PathError,
    ProtocolError,
    parse_command,
    parse_forward_path,
    parse_params,
    parse_reverse_path,
)
from geosmtp.replies import Reply
from geosmtp.spool import Spool, SpoolError

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, including CRLF
_rng = random.Random()  # session ids for logs: unique enough, and no system call each


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs to know, as plain values (the server builds it from config)."""

    hostname: str
    listener: str = "smtp"
    mode: str = "smtp"
    max_message_size: int = 36_700_160
    max_recipients: int = 100
    max_line_length: int = 10_000
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    max_errors: int = 20
    normalize_newlines: bool = False
    hold: bool = False  # accepted messages wait in queue/hold/ for an operator
    trusted_networks: tuple = ()


@dataclass
class Transaction:
    """MAIL FROM through the end of DATA."""

    sender: Address | None  # None is the null reverse-path <>
    body: str = "7BIT"
    smtputf8: bool = False
    declared_size: int | None = None
    originals: list[str] = field(default_factory=list)  # RCPT TO addresses, as accepted
    recipients: dict[str, Recipient] = field(default_factory=dict)  # delivery address → state
    refused: int = 0  # RCPT commands refused in this transaction


_date_cache: tuple[int, str] = (0, "")


def _now_rfc5322() -> str:
    """The current date in RFC 5322 form, computed at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, localtime=True))
    return _date_cache[1]


def received_header(s: "Session", qid: str, tx: Transaction) -> bytes:
    """Our trace header (RFC 5321 4.4), prepended to the stored message."""
    proto = "UTF8SMTP" if tx.smtputf8 else ("ESMTP" if s.esmtp else "SMTP")
    ip = s.ip
    literal = f"IPv6:{ip.compressed}" if ip.version == 6 else str(ip)
    helo = "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "?" for c in (s.helo or ""))[:255]
    lines = [
        f"Received: from {helo or 'unknown'} ([{literal}])",
        f"\tby {s.settings.hostname} (geosmtp) with {proto} id {qid}",
    ]
    if len(tx.originals) == 1:
        lines.append(f"\tfor <{tx.originals[0]}>")
    lines[-1] += f"; {_now_rfc5322()}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Session:
    def __init__(
        self,
        conn: Connection,
        ip: str,
        settings: SessionSettings,
        spool: Spool,
        directory: policy.LocalDirectory,
        on_queued: Callable[[str], None] = lambda qid: None,
    ):
        self.conn = conn
        self.ip = ipaddress.ip_address(ip)
        self.settings = settings
        self.spool = spool
        self.directory = directory
        self.on_queued = on_queued
        self.id = f"{_rng.getrandbits(40):010x}"
        self.log = logger.bind(sid=self.id)
        # connection state
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.trusted = policy.is_trusted(self.ip, settings.trusted_networks)
        self.errors = 0
        self.messages = 0
        # transaction state
        self.tx: Transaction | None = None

    @property
    def facts(self) -> policy.ClientFacts:
        return policy.ClientFacts(self.ip, self.settings.mode, self.trusted, self.auth_user)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        self.log.info("connect from [{}] on {}", self.ip, self.settings.listener)
        how = "quit"
        try:
            if not self.send(replies.greeting(self.settings.hostname)):
                while not self.send(self.next_reply()):
                    pass
        except ConnectionClosed as exc:
            how = f"lost ({exc})"
        except Exception:  # a bug in one session must never reach another
            self.log.exception("session failed")
            how = "internal error"
            try:
                self.conn.write(replies.INTERNAL_ERROR.to_bytes())
                self.conn.flush()
            except ConnectionClosed:
                pass
        finally:
            self.log.info(
                "disconnect from [{}] helo={} messages={} errors={} time={:.3f}s ({})",
                self.ip, self.helo, self.messages, self.errors, time.monotonic() - started, how,
            )

    def next_reply(self) -> Reply:
        try:
            line = self.conn.read_line(COMMAND_LINE_LIMIT, self.settings.command_timeout)
        except LineTooLong:
            return replies.LINE_TOO_LONG
        except LineFlood:
            return replies.LINE_FLOOD
        except BareNewline:
            return replies.BARE_NEWLINE_IN_COMMAND
        except ReadTimeout:
            return replies.COMMAND_TIMEOUT
        try:
            command = parse_command(line)
        except ProtocolError as exc:
            return exc.reply
        self.log.trace("<- {} {}", command.verb, command.arg if command.verb not in SECRET_VERBS else "****")
        handler = VERBS.get(command.verb)
        if handler is None:
            return replies.NOT_SMTP if command.verb in NOT_SMTP_VERBS else replies.UNKNOWN_COMMAND
        return handler(self, command.arg)

    def send(self, reply: Reply) -> bool:
        """Queue one reply for the client; True when the connection must close after it."""
        if reply.code >= 500:  # the client's mistakes; 4xx are ours or temporary
            self.errors += 1
            if self.errors >= self.settings.max_errors and not reply.close:
                reply = replies.TOO_MANY_ERRORS
        if reply.code >= 400:
            self.log.info("-> {}", reply)
        else:
            self.log.trace("-> {}", reply)
        self.conn.write(reply.to_bytes())
        if reply.close:
            self.conn.flush()
        return reply.close

    # -- connection-level verbs ---------------------------------------------------------------
    def extensions(self) -> list[str]:
        return [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.settings.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]

    def do_ehlo(self, arg: str) -> Reply:
        if not arg:
            return replies.EHLO_NEEDS_DOMAIN
        self.helo, self.esmtp, self.tx = arg, True, None
        return replies.ehlo(self.settings.hostname, f"[{self.ip}]", self.extensions())

    def do_helo(self, arg: str) -> Reply:
        if not arg:
            return replies.HELO_NEEDS_DOMAIN
        self.helo, self.esmtp, self.tx = arg, False, None
        return replies.helo(self.settings.hostname)

    def do_rset(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        self.tx = None
        return replies.RESET_OK

    def do_noop(self, arg: str) -> Reply:
        return replies.NOOP_OK  # RFC 5321 4.1.1.9: a parameter is allowed and ignored

    def do_quit(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        return replies.closing_bye(self.settings.hostname)

    def do_vrfy(self, arg: str) -> Reply:
        if not arg:
            return replies.bad_address("VRFY needs an argument", "5.5.4")
        return replies.VRFY_CANNOT  # never confirms that a user exists

    def do_expn(self, arg: str) -> Reply:
        return replies.EXPN_DISABLED

    def do_help(self, arg: str) -> Reply:
        return replies.HELP

    # -- the transaction ----------------------------------------------------------------------
    def do_mail(self, arg: str) -> Reply:
        if self.helo is None:
            return replies.NEED_EHLO
        if self.tx is not None:
            return replies.NESTED_MAIL
        try:
            sender, param_text = parse_reverse_path(arg)
            params = parse_params(param_text)
        except PathError as exc:
            return replies.MAIL_SYNTAX if exc.brackets else replies.bad_address(exc.reason, "5.1.7")
        except ProtocolError as exc:
            return exc.reply
        tx = Transaction(sender)
        for name, value in params.items():
            if not self.esmtp:  # RFC 5321 4.1.1.2: parameters need an EHLO session
                return replies.unknown_parameter(name)
            if name == "SIZE":  # RFC 1870
                if value is None or not value.isdigit() or len(value) > 20:
                    return replies.bad_parameter("SIZE", "not a number")
                tx.declared_size = int(value)
                if tx.declared_size > self.settings.max_message_size:
                    return replies.MESSAGE_TOO_BIG_DECLARED
            elif name == "BODY":  # RFC 6152
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.bad_parameter("BODY", "must be 7BIT or 8BITMIME")
                tx.body = value.upper()
            elif name == "SMTPUTF8":  # RFC 6531 3.4
                if value is not None:
                    return replies.bad_parameter("SMTPUTF8", "takes no value")
                tx.smtputf8 = True
            else:
                return replies.unknown_parameter(name)
        if sender is not None and not sender.is_ascii and not tx.smtputf8:
            return replies.NEED_SMTPUTF8
        if refusal := policy.check_mail(self.facts):
            return refusal
        self.tx = tx
        return replies.SENDER_OK

    def do_rcpt(self, arg: str) -> Reply:
        tx = self.tx
        if tx is None:
            return replies.NEED_MAIL
        reply = self._rcpt(tx, arg)
        if reply.code >= 400:
            tx.refused += 1
        return reply

    def _rcpt(self, tx: Transaction, arg: str) -> Reply:
        try:
            rcpt, param_text = parse_forward_path(arg)
            params = parse_params(param_text)
        except PathError as exc:
            return replies.RCPT_SYNTAX if exc.brackets else replies.bad_address(exc.reason, "5.1.3")
        except ProtocolError as exc:
            return exc.reply
        if params:  # no RCPT parameters are offered (DSN is not advertised)
            return replies.unknown_parameter(next(iter(params)))
        if not rcpt.is_ascii and not tx.smtputf8:
            return replies.NEED_SMTPUTF8
        if str(rcpt) in tx.originals:
            return replies.RECIPIENT_OK
        if len(tx.originals) >= self.settings.max_recipients:
            return replies.TOO_MANY_RECIPIENTS  # RFC 5321 4.5.3.1.10
        verdict = policy.resolve_rcpt(self.facts, rcpt, self.directory)
        if isinstance(verdict, Reply):
            return verdict
        tx.originals.append(str(rcpt))
        for address in verdict:
            tx.recipients.setdefault(address, Recipient(address=address, original=str(rcpt)))
        return replies.RECIPIENT_OK

    def do_data(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        tx = self.tx
        if tx is None:
            return replies.NEED_MAIL
        if not tx.recipients:
            # RFC 2920 3.1: 554 when every RCPT was refused; no RCPT at all is a bad sequence
            return replies.NO_VALID_RECIPIENTS if tx.refused else replies.NEED_RCPT
        self.tx = None  # whatever happens next, the transaction ends with this DATA
        writer = self.spool.open_message()
        writer.write(received_header(self, writer.id, tx))
        self.conn.write(replies.START_DATA.to_bytes())
        s = self.settings
        try:
            result = self.conn.read_data(
                writer.write, s.max_message_size, s.max_line_length, s.normalize_newlines, s.data_timeout
            )
        except ReadTimeout:
            writer.abort()
            return replies.DATA_TIMEOUT
        except BaseException:
            writer.abort()
            raise
        if result.problem is not None:
            writer.abort()
            self.log.info("message refused: {} ({} octets read)", result.problem, result.size)
            return DATA_PROBLEMS[result.problem]
        envelope = Envelope(
            id=writer.id,
            created=time.time(),
            sender=str(tx.sender) if tx.sender else "",
            recipients=list(tx.recipients.values()),
            client=ClientInfo(
                address=str(self.ip), helo=self.helo, listener=s.listener, auth_user=self.auth_user
            ),
            size=writer.size,
            body=tx.body,
            smtputf8=tx.smtputf8,
        )
        try:
            self.spool.commit(writer, envelope, hold=s.hold)
        except SpoolError as exc:
            self.log.error("cannot queue message: {}", exc)
            return replies.STORAGE_FULL if exc.full else replies.STORAGE_ERROR
        self.messages += 1
        self.log.info(
            "queued {} from=<{}> to={} size={}{}",
            envelope.id, envelope.sender, ",".join(f"<{r}>" for r in tx.originals), envelope.size,
            " (held)" if s.hold else "",
        )
        if not s.hold:
            self.on_queued(envelope.id)
        return replies.queued(envelope.id)


DATA_PROBLEMS = {
    "size": replies.MESSAGE_TOO_BIG,
    "line": replies.MESSAGE_LINE_TOO_LONG,
    "bare": replies.BARE_NEWLINE,
}

# One written-out table: grep finds every handler.
VERBS: dict[str, Callable[[Session, str], Reply]] = {
    "EHLO": Session.do_ehlo,
    "HELO": Session.do_helo,
    "MAIL": Session.do_mail,
    "RCPT": Session.do_rcpt,
    "DATA": Session.do_data,
    "RSET": Session.do_rset,
    "NOOP": Session.do_noop,
    "QUIT": Session.do_quit,
    "VRFY": Session.do_vrfy,
    "EXPN": Session.do_expn,
    "HELP": Session.do_help,
}
SECRET_VERBS = frozenset({"AUTH"})
NOT_SMTP_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS"})
