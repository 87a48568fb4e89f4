"""One SMTP session: the command loop, connection state and the mail transaction.

Read a line → parse → check → act → exactly one reply. Each verb has one handler that returns
a Reply; only the loop writes replies, counts errors and closes. The connection state
(greeting, later TLS and AUTH) lives on the Session; the transaction (MAIL..DATA) is a
separate object that RSET, EHLO/HELO and the end of DATA drop.
"""
from __future__ import annotations

import io
import ipaddress
import random
import time
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from functools import lru_cache, partial
from typing import Callable

import gevent
from loguru import logger

from geosmtp import auth, metrics, policy, replies
from geosmtp.checks import edits
from geosmtp.checks.engine import NO_CHECKS, Engine, SessionChecks
from geosmtp.checks.interface import Facts
from geosmtp.directory import Directory, DirectoryUnavailable
from geosmtp.connection import (
    BareNewline,
    Connection,
    ConnectionClosed,
    DataTooSlow,
    HandshakeFailed,
    LineFlood,
    LineTooLong,
    ReadTimeout,
)
from geosmtp.limits import DataClock, Limits
from geosmtp.ratelimit import HOUR, Limiter, MemoryLimiter, ip_messages
from geosmtp.stress import Evicted, Load
from geosmtp.tls import ServerTLS
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.protocol import (
    Address,
    ascii_lower,
    PathError,
    ProtocolError,
    parse_address,
    parse_command,
    parse_forward_path,
    parse_params,
    parse_reverse_path,
)
from geosmtp.replies import Reply
from geosmtp.spool import Spool, SpoolError

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, including CRLF
SASL_LINE_LIMIT = 12288 + 2  # RFC 4954 4: AUTH responses may be up to 12288 octets
_rng = random.Random()  # session ids for logs: unique enough, and no system call each


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs to know, as plain values: built by geosmtp.parts from the config,
    whose model holds every default (so none is repeated here)."""

    hostname: str
    listener: str
    mode: str
    max_message_size: int
    max_recipients: int
    max_line_length: int
    limits: Limits  # timeouts, data rate, errors
    stressed: Limits  # the same while the listener is under stress (geosmtp.stress)
    normalize_newlines: bool
    hold: bool  # accepted messages wait in queue/hold/ for an operator
    tls: str  # "none", "starttls" or "implicit"
    require_tls: bool
    handshake_timeout: float
    auth: bool  # offer AUTH on this listener
    allow_plaintext_auth: bool
    restrict_sender: bool
    max_auth_failures: int
    messages_per_hour_per_ip: int  # 0: no limit
    messages_per_hour_per_user: int
    auth_failures_per_hour_per_ip: int
    trusted_networks: tuple
    # input before the greeting or past DATA before the 354 ends the session (554 5.5.0),
    # except from trusted networks and authenticated clients
    forbid_unauth_pipelining: bool


class Draining(Exception):
    """Raised into an idle session (or one past the drain timeout) when the server stops."""


@dataclass
class Services:
    """The shared, long-lived parts a session works with (built once by the server)."""

    spool: Spool
    directory: Directory  # domains, mailboxes, aliases, AUTH users; replaced whole on reload
    on_queued: Callable[[str], None] = lambda qid: None
    tls: ServerTLS | None = None
    senders: dict = field(default_factory=dict)  # user → extra sender addresses / "@domain"
    limiter: Limiter = field(default_factory=MemoryLimiter)
    draining: bool = False  # the server is stopping: end each session at its next pause
    run: Callable = lambda fn, *args: fn(*args)  # runs slow work (scrypt) off the hub
    checks: dict[str, Engine] = field(default_factory=dict)  # per listener: inbound checks

    def use(self, directory: Directory, tls: ServerTLS | None, senders: dict, checks: dict[str, Engine]) -> None:
        """A reload's new parts (geosmtp.parts): the sessions that come from now on use them
        (open ones keep their directory for RCPT, and take the new one's users at AUTH)."""
        self.directory, self.tls, self.senders = directory, tls, senders
        self.checks = checks


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
    """Our trace header (RFC 5321 4.4), prepended to the stored message. The protocol name
    follows RFC 3848 (ESMTPS: TLS, ESMTPA: AUTH) and RFC 6531 (UTF8SMTP)."""
    proto = "UTF8SMTP" if tx.smtputf8 else ("ESMTP" if s.esmtp else "SMTP")
    if s.esmtp:
        proto += ("S" if s.tls else "") + ("A" if s.auth_user else "")
    ip = s.ip
    literal = f"IPv6:{ip.compressed}" if ip.version == 6 else str(ip)
    helo = _trace_text(s.helo or "")
    ptr = _trace_text(s.checks.ptr or "")
    lines = [f"Received: from {helo or 'unknown'} ({ptr + ' ' if ptr else ''}[{literal}])"]
    if s.tls:
        version, _, cipher = s.tls.partition(" ")
        lines.append(f"\t(using {version} with cipher {cipher})")
    lines.append(f"\tby {s.settings.hostname} (geosmtp) with {proto} id {qid}")
    if len(tx.originals) == 1:
        lines.append(f"\tfor <{tx.originals[0]}>")
    lines[-1] += f"; {_now_rfc5322()}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _trace_text(text: str) -> str:
    """A client's word (HELO, a reverse name) made safe inside Received: (printable ASCII,
    no parentheses or backslash: it sits in a comment), at most 255 characters."""
    return "".join(c if c.isascii() and c.isprintable() and c not in "()\\" else "?" for c in text)[:255]


@lru_cache(maxsize=4096)  # clients come back: parse and classify each address once
def client_key(ip: str) -> str:
    """The key rate and connection limits count a client under: its address, or for IPv6
    its /64 (one host usually holds a whole /64)."""
    address = ipaddress.ip_address(ip)
    return str(address) if address.version == 4 else str(ipaddress.ip_network((address, 64), strict=False))


@lru_cache(maxsize=4096)
def _client_identity(ip: str, trusted_networks: tuple) -> tuple:
    """→ (address object, inside trusted_networks?, the key rate limits count it under)."""
    address = ipaddress.ip_address(ip)
    return address, policy.is_trusted(address, trusted_networks), client_key(ip)


class Session:
    def __init__(
        self,
        conn: Connection,
        ip: str,
        settings: SessionSettings,
        services: Services,
        proxy: str | None = None,
        load: Load | None = None,
    ):
        self.conn = conn
        self.load = load  # the listener's load in this process: under stress or not
        self.ip, self.trusted, self.rate_key = _client_identity(ip, settings.trusted_networks)
        self.proxy = proxy  # the balancer that sent a PROXY header for this client, if any
        self.settings = settings
        self.services = services
        self.spool = services.spool
        self.directory = services.directory
        self.id = f"{_rng.getrandbits(40):010x}"
        self.log = logger.bind(sid=self.id)
        # connection state
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
        self.auth_user: str | None = None
        self.auth_failures = 0
        self.errors = 0
        self.verb = "CONNECT"  # the command the next reply answers (for metrics)
        self.idle = False  # waiting for a command outside a transaction: safe to interrupt
        self.messages = 0
        self._start_tls = False  # STARTTLS accepted: handshake once its 220 is out
        self.useful_at = time.monotonic()  # the last accepted MAIL/RCPT/DATA/AUTH/STARTTLS
        self.data_clock: DataClock | None = None  # while a message body arrives
        # transaction state
        self.tx: Transaction | None = None
        # what the inbound checks learn about this client and its transactions
        self.checks: SessionChecks = services.checks.get(settings.listener, NO_CHECKS).session()

    @property
    def limits(self) -> Limits:
        """The limits in force now: asked at every receive, so stress reaches open sessions."""
        return self.settings.stressed if self.load is not None and self.load.stressed else self.settings.limits

    def command_time(self) -> float:
        return self.limits.command_timeout

    def last_useful(self) -> float:
        """When this session last did something useful (geosmtp.stress picks whom to evict)."""
        clock = self.data_clock
        return self.useful_at if clock is None else max(self.useful_at, clock.progress())

    @property
    def evictable(self) -> bool:
        return self.conn.reading  # blocked in a receive: nothing half done is lost

    def spoke_out_of_turn(self, where: str) -> bool:
        """RFC 2920 3.1, RFC 5321 4.3.1: the client sent more before the reply it must wait
        for (the greeting, or the 354 after DATA). Postfix 3.9 (smtpd_forbid_unauth_pipelining)
        checks the same way: pending input at that moment, no waiting."""
        if not self.settings.forbid_unauth_pipelining or self.trusted or self.auth_user:
            return False
        unasked = self.conn.unasked()
        if not unasked:
            return False
        # how much only: past DATA those octets are a message, before the greeting anything
        self.log.info("improper pipelining {} from [{}]: {} octets unasked for", where, self.ip, unasked)
        return True

    def check_facts(self, phase: str, tx: Transaction | None = None, **more) -> Facts:
        """What the inbound checks see now (geosmtp.checks): plain values, never the session."""
        tx = tx or self.tx
        s = self.settings
        # (no setdefault: its default would be computed, and the results view with it, even
        # when given: a second view of other results would make run() copy the facts)
        if tx is not None:
            if "sender" not in more:
                more["sender"] = str(tx.sender) if tx.sender else ""
            if "recipients" not in more:
                more["recipients"] = tuple(tx.originals)
        if "results" not in more:
            more["results"] = self.checks.view(phase)  # what earlier checks recorded
        return Facts(phase=phase, listener=s.listener, mode=s.mode, ip=self.ip, trusted=self.trusted,
                     hostname=s.hostname, ptr=self.checks.ptr, helo=self.helo, tls=self.tls,
                     auth_user=self.auth_user, session=self.id, **more)

    def checked(self, phase: str, **more) -> Reply | None:
        """The inbound checks' refusal at this phase, or None (also when none run here)."""
        if not self.checks.wants(phase):
            return None
        return self.checks.run(self.check_facts(phase, **more), self.log)

    @property
    def facts(self) -> policy.ClientFacts:
        return policy.ClientFacts(self.ip, self.settings.mode, self.trusted, self.auth_user)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        self.log.info("connect from [{}]{} on {}", self.ip, f" via [{self.proxy}]" if self.proxy else "",
                      self.settings.listener)
        how = "quit"
        try:
            greeting = replies.greeting(self.settings.hostname)
            if self.settings.tls == "implicit":  # RFC 8314: TLS first, then the greeting
                self.handshake()  # (the client spoke first, as it must: not checked, like Postfix)
            elif self.spoke_out_of_turn("before the greeting"):
                greeting = replies.PROTOCOL_SYNC
            if greeting.code == 220:
                greeting = self.checked("connect") or greeting
            if not self.send(greeting):
                while not self.send(self.next_reply()):
                    if self._start_tls:
                        self.handshake()
                    if self.services.draining and self.tx is None:  # between transactions
                        raise Draining()
        except (Draining, Evicted) as exc:
            evicted = isinstance(exc, Evicted)
            how = "evicted to make room" if evicted else "server shutting down"
            self.verb = "-"
            self.conn.send_timeout = self.limits.command_timeout  # a drip may not read either
            try:
                self.send(replies.BUSY_CLOSING_IDLE if evicted else replies.SHUTTING_DOWN)
            except ConnectionClosed:
                pass
        except HandshakeFailed as exc:
            how = f"TLS handshake failed ({exc})"
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
            self._drop_tx()
            if self.checks.engine.stateful:  # checks keeping state for this session let it go
                self.checks.end_session(self.check_facts("end"), self.log)
            self.log.info(
                "disconnect from [{}] proxy={} helo={} tls={} user={} messages={} errors={} time={:.3f}s ({})",
                self.ip, self.proxy or "-", self.helo, self.tls or "-", self.auth_user or "-", self.messages,
                self.errors,
                time.monotonic() - started, how,
            )

    def handshake(self) -> None:
        """TLS on the live socket (STARTTLS or implicit). RFC 3207 4.2: everything learnt
        before it (greeting, AUTH, transaction) is forgotten."""
        self._start_tls = False
        tls = self.services.tls
        assert tls is not None  # config validation: a TLS listener has [tls]
        try:
            self.tls = self.conn.start_tls(tls.context, self.settings.handshake_timeout)
        except HandshakeFailed:
            metrics.TLS_FAILURES.inc()
            raise
        metrics.TLS.labels(self.tls.partition(" ")[0]).inc()
        self.helo, self.esmtp, self.auth_user = None, False, None
        self._drop_tx()
        self.log.info("TLS established: {}", self.tls)

    def next_reply(self) -> Reply:
        self.verb = "-"  # what metrics count the reply under: the verb, or "-" if none
        self.idle = self.tx is None and not self.conn.pending()
        try:
            line = self.conn.read_line(COMMAND_LINE_LIMIT, self.command_time)
        except LineTooLong:
            return replies.LINE_TOO_LONG
        except LineFlood:
            return replies.LINE_FLOOD
        except BareNewline:
            return replies.BARE_NEWLINE_IN_COMMAND
        except ReadTimeout:
            return replies.COMMAND_TIMEOUT
        finally:
            self.idle = False
        try:
            command = parse_command(line)
        except ProtocolError as exc:
            return exc.reply
        handler = VERBS.get(command.verb)
        if handler is not None:
            self.verb = command.verb
        else:
            # not logged: it may be a SASL response pipelined behind a refused AUTH
            self.log.trace("<- unknown command ({} octets)", len(line))
            return replies.NOT_SMTP if command.verb in NOT_SMTP_VERBS else replies.UNKNOWN_COMMAND
        self.log.trace("<- {} {}", command.verb, command.arg if command.verb not in SECRET_VERBS else "****")
        if self.settings.require_tls and not self.tls and command.verb not in ALLOWED_BEFORE_STARTTLS:
            return replies.TLS_REQUIRED
        return handler(self, command.arg)

    def send(self, reply: Reply) -> bool:
        """Queue one reply for the client; True when the connection must close after it."""
        metrics.child(metrics.COMMANDS, self.verb, _REPLY_CLASS[reply.code // 100]).inc()
        if reply.code >= 400 and self.verb in ("MAIL", "RCPT", "DATA"):
            metrics.child(metrics.REJECTED, self.verb, reply.enhanced or "-").inc()
        if reply.code >= 500:  # the client's mistakes; 4xx are ours or temporary
            self.errors += 1
            if self.errors >= self.limits.max_errors and not reply.close:
                reply = replies.TOO_MANY_ERRORS
        elif reply.code < 400 and self.verb in USEFUL_VERBS:
            self.useful_at = time.monotonic()
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
        out = [
            "PIPELINING",  # RFC 2920
            f"SIZE {self.settings.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self.settings.tls == "starttls" and not self.tls:
            out.append("STARTTLS")  # RFC 3207; never again once in TLS
        if self.auth_offered and not self.auth_user:
            out.append("AUTH PLAIN LOGIN")  # RFC 4954
        return out

    @property
    def auth_offered(self) -> bool:
        """AUTH is advertised here now: configured, and over TLS unless allowed in clear."""
        s = self.settings
        return s.auth and (bool(self.tls) or s.allow_plaintext_auth)

    def do_starttls(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        if self.tls:
            return replies.ALREADY_TLS
        if self.settings.tls != "starttls" or self.services.tls is None:
            return replies.TLS_NOT_AVAILABLE
        if self.helo is None:
            return replies.NEED_EHLO
        # CVE-2011-0411: whatever the client sent after STARTTLS<CRLF> in clear text could
        # be an attacker's, injected to run inside the TLS session. It is thrown away.
        injected = self.conn.discard_pending()
        if injected:
            self.log.warning("discarded {} bytes sent after STARTTLS before the handshake", injected)
        self._start_tls = True
        return replies.READY_FOR_TLS

    def do_auth(self, arg: str) -> Reply:
        """RFC 4954 with PLAIN (RFC 4616) and LOGIN. Nothing of the exchange is logged."""
        s = self.settings
        users = self.services.directory  # the newest: a reloaded users file counts at the next AUTH
        if not s.auth or not users.authenticates:
            return replies.AUTH_NOT_AVAILABLE
        if not self.auth_offered:
            return replies.ENCRYPTION_REQUIRED
        if self.helo is None:
            return replies.NEED_EHLO
        if self.auth_user:
            return replies.ALREADY_AUTHENTICATED
        if self.tx is not None:
            return replies.AUTH_IN_TRANSACTION
        ip_key = f"authfail:{self.rate_key}"
        limit = s.auth_failures_per_hour_per_ip
        if limit and self.services.limiter.count(ip_key, HOUR) >= limit:
            metrics.RATE_LIMITED.labels("auth_failures_per_hour").inc()
            return replies.AUTH_TOO_MANY_FAILURES
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if not mechanism or " " in initial:
            return replies.AUTH_SYNTAX
        verdict = self._sasl_verdict(mechanism, initial, users)
        if isinstance(verdict, Reply):
            return verdict
        ok, user = verdict
        if ok:
            self.auth_user = ascii_lower(user)
            self.log.info("AUTH {} succeeded: user={}", mechanism, self.auth_user)
            return replies.AUTH_OK
        return self._auth_failed(mechanism, ip_key)

    def _sasl_verdict(self, mechanism: str, initial: str, users) -> Reply | tuple[bool, str]:
        """The exchange of `mechanism` and the password's check: (ok, user), or the reply
        that ends AUTH without a verdict (cancelled, timed out, bad base64, directory down)."""
        try:
            if mechanism == "PLAIN":
                response = initial or self._sasl_challenge("")
                user, password = auth.parse_plain(auth.decode_response(response))
            elif mechanism == "LOGIN":
                first = initial or self._sasl_challenge("VXNlcm5hbWU6")  # "Username:"
                user = auth.decode_text(auth.decode_response(first))
                password = auth.decode_text(auth.decode_response(self._sasl_challenge("UGFzc3dvcmQ6")))
            else:
                return replies.UNKNOWN_MECHANISM
        except SaslCancelled:
            return replies.AUTH_CANCELLED
        except ReadTimeout:
            return replies.COMMAND_TIMEOUT
        except auth.BadBase64:
            return replies.AUTH_BAD_BASE64
        except auth.SaslError as exc:  # well-formed base64, malformed inside: a failure
            self.log.info("AUTH {} malformed: {}", mechanism, exc)
            return False, ""
        try:  # the hash from the directory (which may ask its database), scrypt in the threadpool
            return self.services.run(auth.check, password, users.password_hash(ascii_lower(user))), user
        except DirectoryUnavailable:
            return replies.AUTH_TEMPORARY  # the directory logged and counted it
        except Exception:
            self.log.exception("AUTH check failed")
            return replies.AUTH_TEMPORARY

    def _auth_failed(self, mechanism: str, ip_key: str) -> Reply:
        """A wrong password (or a malformed exchange): counted, slowed down, refused."""
        # never log the name tried: people type passwords into the user field
        self.auth_failures += 1
        metrics.AUTH_FAILURES.inc()
        self.services.limiter.add(ip_key, HOUR)
        self.log.info("AUTH {} failed ({} in this session)", mechanism, self.auth_failures)
        if self.auth_failures >= self.settings.max_auth_failures:
            return replies.AUTH_TOO_MANY_FAILURES
        gevent.sleep(min(2 ** (self.auth_failures - 1), 8))  # slow down guessing
        return replies.AUTH_FAILED

    def _sasl_challenge(self, text: str) -> str:
        """Send a 334 challenge and read the client's response line (never logged)."""
        self.conn.write(replies.challenge(text).to_bytes())
        try:
            line = self.conn.read_line(SASL_LINE_LIMIT, self.command_time)
        except (LineTooLong, BareNewline, LineFlood):
            raise auth.SaslError("bad response line") from None
        if line == b"*":  # RFC 4954 4: the client cancels
            raise SaslCancelled()
        try:
            return line.decode("ascii")
        except UnicodeDecodeError:
            raise auth.SaslError("response is not valid base64") from None

    def do_ehlo(self, arg: str) -> Reply:
        if not arg:
            return replies.EHLO_NEEDS_DOMAIN
        self._drop_tx()
        if refusal := self._greeted(arg, True):
            return refusal
        return replies.ehlo(self.settings.hostname, f"[{self.ip}]", self.extensions())

    def do_helo(self, arg: str) -> Reply:
        if not arg:
            return replies.HELO_NEEDS_DOMAIN
        self._drop_tx()
        if refusal := self._greeted(arg, False):
            return refusal
        return replies.helo(self.settings.hostname)

    def _greeted(self, name: str, esmtp: bool) -> Reply | None:
        """The client's EHLO/HELO name, kept unless a check refuses it (then the client has
        not greeted: it may try again)."""
        self.helo, self.esmtp = name, esmtp
        refusal = self.checked("helo")
        if refusal is not None and not refusal.close:
            self.helo, self.esmtp = None, False
        return refusal

    def do_rset(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        self._drop_tx()
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
        if self.auth_user and self.settings.restrict_sender:
            try:
                refusal = policy.check_sender(self.auth_user, sender, self.directory, self.services.senders)
            except DirectoryUnavailable:
                return replies.LOOKUP_FAILED
            if refusal:
                return refusal
        if refusal := self._rate_limited():
            metrics.RATE_LIMITED.labels("messages_per_hour").inc()
            return refusal
        if refusal := self.checked("mail", tx=tx):
            self.checks.end_transaction()  # what the refused MAIL's checks learnt goes with it
            return refusal
        self.tx = tx
        return replies.SENDER_OK

    def _rate_limited(self) -> Reply | None:
        s, limiter = self.settings, self.services.limiter
        if s.messages_per_hour_per_ip and limiter.count(ip_messages(self.rate_key), HOUR) >= s.messages_per_hour_per_ip:
            return replies.RATE_LIMITED
        if (self.auth_user and s.messages_per_hour_per_user
                and limiter.count(f"user:{self.auth_user}", HOUR) >= s.messages_per_hour_per_user):
            return replies.RATE_LIMITED
        return None

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
        try:
            verdict = policy.resolve_rcpt(self.facts, rcpt, self.directory)
        except DirectoryUnavailable:
            return replies.LOOKUP_FAILED  # the directory logged and counted it
        if isinstance(verdict, Reply):
            return verdict
        if refusal := self.checked("rcpt", recipient=str(rcpt)):
            return refusal
        tx.originals.append(str(rcpt))
        for address in verdict:
            tx.recipients.setdefault(address, Recipient(address=address, original=str(rcpt)))
        return replies.RECIPIENT_OK

    def _drop_tx(self) -> None:
        """End the transaction, wherever that happens (RSET, EHLO/HELO, STARTTLS, DATA, the
        end of the session), with what the checks learnt of it. It holds nothing open
        today (DATA's message writer lives only within do_data, which aborts it on any
        failure); BDAT's chunks will be let go here."""
        self.tx = None
        self.checks.end_transaction()

    def do_data(self, arg: str) -> Reply:
        """DATA: open the message, read the body, commit (three steps; the commit is shared
        by anything that ends a message)."""
        if arg:
            return replies.NO_ARGUMENTS_ALLOWED
        tx = self.tx
        if tx is None:
            return replies.NEED_MAIL
        if not tx.recipients:
            # RFC 2920 3.1: 554 when every RCPT was refused; no RCPT at all is a bad sequence
            return replies.NO_VALID_RECIPIENTS if tx.refused else replies.NEED_RCPT
        learnt = self.checks.tx  # the end-of-data checks still need what MAIL and RCPT learnt
        self._drop_tx()  # whatever happens next, the transaction ends with this DATA
        # RFC 2920 3.1: DATA ends a pipelined group; what follows it before the 354 would be
        # taken as the message (a replay of a whole session, a second message with it)
        if self.spoke_out_of_turn("after DATA"):
            return replies.PROTOCOL_SYNC
        writer = self._open_message(tx)
        self.conn.write(replies.START_DATA.to_bytes())
        self.useful_at = time.monotonic()
        if refusal := self._read_body(writer):
            return refusal
        return self._commit(tx, writer, learnt)

    def _open_message(self, tx: Transaction):
        """A writer for the message, our Received: header first."""
        writer = self.spool.open_message()
        writer.write(received_header(self, writer.id, tx))
        return writer

    def _commit(self, tx: Transaction, writer, learnt) -> Reply:
        """The message is whole: make it durable and queued, then 250 (or 452/451 and nothing
        queued). The end-of-data checks run at the spool's seam: on the finished message,
        before anything is queued; they may refuse it, add fields, or quarantine it."""
        s = self.settings
        envelope = Envelope(
            id=writer.id, created=time.time(), sender=str(tx.sender) if tx.sender else "",
            recipients=list(tx.recipients.values()),
            client=ClientInfo(address=str(self.ip), helo=self.helo, listener=s.listener,
                              auth_user=self.auth_user, tls=self.tls),
            size=writer.size, body=tx.body, smtputf8=tx.smtputf8,
        )
        at_end = partial(self._end_of_data, tx, envelope, learnt, writer) if self.checks.needs_data(learnt) else None
        try:
            self.spool.commit(writer, envelope, hold=s.hold, check=at_end)
        except Refused as exc:
            return exc.reply
        except SpoolError as exc:
            self.log.error("cannot queue message: {}", exc)
            return replies.STORAGE_FULL if exc.full else replies.STORAGE_ERROR
        self._accepted(envelope, tx)
        return replies.queued(envelope.id)

    def _end_of_data(self, tx: Transaction, envelope: Envelope, learnt, writer, file: Callable[[], str]) -> bool:
        """The data checks on the whole message (file(): the path of its file, written if
        it was not): raises Refused, or records their fields and quarantine in the envelope
        and returns whether it goes to hold/. A small message is read from the octets the
        writer kept, in memory."""
        kept = writer.kept
        opener = partial(io.BytesIO, kept) if kept is not None else partial(self.spool.open_body, envelope.id)
        facts = self.check_facts("data", tx=tx, queue_id=envelope.id, message_file=file, size=envelope.size,
                                 open_message=opener, results=self.checks.view("data", learnt))
        outcome = self.checks.data(facts, learnt, partial(self.spool.rewrite_message, writer, file), self.log)
        if outcome.refusal is not None:
            self.log.info("message refused at end of data: {}", outcome.refusal)
            raise Refused(outcome.refusal)
        if outcome.envelope:
            try:
                emptied = edits.apply_envelope(envelope, outcome.envelope, partial(self._edit_target, tx),
                                               parse_address, tx.smtputf8)
            except edits.EditRefused as exc:
                self.log.warning("message refused at end of data: a check's envelope change: {}", exc)
                raise Refused(EDIT_REFUSED) from None
            if emptied:
                outcome = replace(outcome, quarantine="; ".join(filter(None, (outcome.quarantine, emptied))))
        if outcome.headers:
            envelope.extra["headers"] = outcome.prefix()
        if outcome.quarantine:
            envelope.extra["quarantine"] = outcome.quarantine
            metrics.QUARANTINED.labels(self.settings.listener).inc()
        return outcome.quarantine is not None

    def _edit_target(self, tx: Transaction, address: str) -> list[str]:
        """The delivery addresses of a recipient a check adds: the rules of RCPT TO for this
        client (a local mailbox, or relaying only for whom may relay), so that no check makes
        us an open relay."""
        try:
            verdict = policy.resolve_rcpt(self.facts, parse_address(address), self.directory)
        except DirectoryUnavailable:
            raise edits.EditRefused(f"added recipient <{address}>: directory unavailable") from None
        if isinstance(verdict, Reply):
            raise edits.EditRefused(f"added recipient <{address}>: {verdict}")
        return verdict

    def _accepted(self, envelope: Envelope, tx: Transaction) -> None:
        """What follows a 250 for a message: counts, rate limits, the log line, the queue."""
        s = self.settings
        self.messages += 1
        metrics.child(metrics.ACCEPTED, s.listener).inc()
        metrics.RECEIVED_BYTES.inc(envelope.size)
        limiter = self.services.limiter
        if s.messages_per_hour_per_ip:
            limiter.add(ip_messages(self.rate_key), HOUR)
        if self.auth_user and s.messages_per_hour_per_user:
            limiter.add(f"user:{self.auth_user}", HOUR)
        quarantine = envelope.extra.get("quarantine")
        self.log.info(
            "queued {} from=<{}> to={} size={}{}",
            envelope.id, envelope.sender, ",".join(f"<{r}>" for r in tx.originals), envelope.size,
            f" (quarantined: {quarantine})" if quarantine else " (held)" if s.hold else "",
        )
        if not (s.hold or quarantine):
            self.services.on_queued(envelope.id)

    def _read_body(self, writer) -> Reply | None:
        """The message, after the 354, into `writer`; a Reply (and the writer aborted) if it
        cannot be queued: too big, bad lines, too slow or silent too long."""
        s = self.settings
        self.data_clock = clock = DataClock(lambda: self.limits)
        try:
            result = self.conn.read_data(writer.write, s.max_message_size, s.max_line_length,
                                         s.normalize_newlines, clock)
        except ReadTimeout as exc:
            writer.abort()
            slow = isinstance(exc, DataTooSlow)
            self.log.info("message refused: {} ({} octets in {:.1f}s)", "too slow" if slow else "silent too long",
                          clock.received, time.monotonic() - clock.started)
            return replies.DATA_TOO_SLOW if slow else replies.DATA_TIMEOUT
        except BaseException:
            writer.abort()
            raise
        finally:
            self.data_clock = None
        if result.problem is not None:
            writer.abort()
            self.log.info("message refused: {} ({} octets read)", result.problem, result.size)
            return DATA_PROBLEMS[result.problem]
        return None


EDIT_REFUSED = Reply(451, "4.3.0", "Temporary local problem, try again later")  # a check's envelope change
DATA_PROBLEMS = {
    "size": replies.MESSAGE_TOO_BIG,
    "line": replies.MESSAGE_LINE_TOO_LONG,
    "bare": replies.BARE_NEWLINE,
    "nul": replies.NUL_IN_MESSAGE,
}

class Refused(Exception):
    """The end-of-data checks refused the message: nothing is queued, `reply` is sent."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


class SaslCancelled(Exception):
    """The client answered a SASL challenge with "*"."""


# One written-out table: grep finds every handler.
VERBS: dict[str, Callable[[Session, str], Reply]] = {
    "STARTTLS": Session.do_starttls,
    "AUTH": Session.do_auth,
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
# what a client does that is worth its slot (geosmtp.stress): accepted, these move useful_at
USEFUL_VERBS = frozenset({"MAIL", "RCPT", "DATA", "AUTH", "STARTTLS"})
_REPLY_CLASS = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
# RFC 3207 4: with TLS required, only these may come before STARTTLS
ALLOWED_BEFORE_STARTTLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "RSET", "QUIT"})
NOT_SMTP_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS"})
