"""A fake remote MX for outbound-relay tests: a threaded SMTP server on a loopback address
that records every connection, command and message, and misbehaves on request.

The server under test connects to every MX on one configured port, so fakes for several
MX hosts share a port number on different loopback addresses::

    port = pick_port(["127.0.0.10", "127.0.0.11"])
    with FakeMX("127.0.0.10", port) as mx1, FakeMX("127.0.0.11", port, name="mx2.remote.test") as mx2:
        mx1.drop_at = "rcpt"
        ...
        [msg] = mx2.wait_for_messages(1)

Behaviour is set with plain attributes (see FakeMX.__init__), read afresh at every
connection and command, so a test may change them between connections. A reply is a
string ("250 2.1.5 Ok"; for a multi-line one give every line its code: "250-one\\n250 two")
or, where noted, a callable returning one.

Records: .messages (transactions answered 2xx at the final dot), .transactions (every
message received in full, whatever the answer; .reply is None if we hung or dropped at
"dot"), .commands ((connection, line) for every command line), .connections (a count)
and .tls_failures. Read them directly, or wait with wait_for_messages() / wait_for().

With .lmtp set it speaks LMTP (RFC 2033) instead: LHLO (EHLO and HELO get 500), and after
the final dot one reply per accepted recipient, from .lmtp_replies (lowercase address ->
reply) or .final_reply; .lmtp_drop_after = n closes the connection after n of them.

Everything runs in plain daemon threads (the pytest process is not monkey-patched); every
socket has a timeout and every wait is bounded, and stop() closes all open connections.
"""
from __future__ import annotations

import base64
import binascii
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.support import ports

DEFAULT_EXTENSIONS = ["PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
# Where hang_at / drop_at act: before the greeting; on EHLO or HELO, MAIL, (any) RCPT or DATA
# before replying; "body": once some message bytes are in after the 354 (if the whole message
# came in one piece that is after the dot too); "dot": the whole message is in, no reply yet.
STAGES = ("greeting", "ehlo", "mail", "rcpt", "data", "body", "dot")
MAX_LINE = 8192  # a command line longer than this gets 500 and the connection is closed

# Which EHLO keyword a MAIL / RCPT parameter needs (check_params).
_MAIL_PARAMS = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "AUTH": "AUTH",
                "RET": "DSN", "ENVID": "DSN", "REQUIRETLS": "REQUIRETLS"}
_RCPT_PARAMS = {"NOTIFY": "DSN", "ORCPT": "DSN"}


def pick_port(hosts: list[str] | tuple[str, ...]) -> int:
    """A TCP port number that is free on every one of `hosts` (loopback addresses)."""
    return ports.free_port(tuple(hosts))


@dataclass
class Message:
    """One transaction whose data was received in full."""

    mail_from: str  # "" for the null reverse-path <>
    rcpt_tos: list[str]  # accepted recipients only, as the client spelled them
    data: bytes  # dot-stuffing removed, CRLF line endings kept, ends with CRLF unless empty
    tls: str | None  # "TLSv1.3" etc., None in plain text
    helo: str | None  # the EHLO/HELO argument
    peer: tuple[str, int]
    connection: int  # sequence number of the connection (1, 2, ... since start/reset)
    mail_params: dict[str, str | None]  # {"SIZE": "123", "BODY": "8BITMIME", "SMTPUTF8": None}
    auth_user: str | None
    rcpt_params: dict[str, dict[str, str | None]] = field(default_factory=dict)  # per accepted rcpt
    reply: str | None = None  # the final reply sent; None if hung or dropped at "dot"
    replies: list[str] = field(default_factory=list)  # LMTP: every final reply sent (reply: the first)


class _Closed(Exception):
    """This connection is over: the client left, we dropped it, it timed out or stop()."""


def _reply_value(reply, *args) -> str:
    return str(reply(*args) if callable(reply) else reply)


def _parse_path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]] | None:
    """'FROM:<a@b.test> SIZE=12 SMTPUTF8' -> ('a@b.test', {'SIZE': '12', 'SMTPUTF8': None}).

    None when malformed. A source route (<@x,@y:a@b>) is dropped; '>' inside a quoted
    local part does not end the path."""
    if arg[:len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        return None
    quoted = escaped = False
    for end in range(1, len(rest)):
        ch = rest[end]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
    else:
        return None
    path, tail = rest[1:end], rest[end + 1:]
    if tail and not tail.startswith(" "):
        return None
    if path.startswith("@"):
        path = path.partition(":")[2]
    params: dict[str, str | None] = {}
    for word in tail.split():
        key, eq, value = word.partition("=")
        params[key.upper()] = value if eq else None
    return path, params


class _Connection:
    """One client connection, served in its own thread."""

    def __init__(self, mx: "FakeMX", sock: socket.socket, number: int, peer: tuple[str, int]):
        self.mx = mx
        self.sock = sock
        self.number = number
        self.peer = peer
        self.buf = bytearray()
        self.helo: str | None = None  # forgotten after STARTTLS
        self.esmtp = False
        self.tls: str | None = None
        self.auth_user: str | None = None
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params: dict[str, str | None] = {}
        self.rcpts: list[str] = []
        self.rcpt_params: dict[str, dict[str, str | None]] = {}

    # -- I/O -------------------------------------------------------------------------------
    def recv_more(self) -> None:
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            self.reply("421 4.4.2 Timeout, closing")
            raise _Closed from None
        except OSError:
            raise _Closed from None
        if not data:
            raise _Closed
        self.buf += data

    def read_line(self) -> bytes:
        """The next line from our own buffer (so pipelined commands are served in order)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            if len(self.buf) > MAX_LINE:
                self.reply("500 5.5.2 Line too long")
                raise _Closed
            self.recv_more()

    def reply(self, text: str) -> None:
        lines = str(text).replace("\r\n", "\n").split("\n")
        try:
            self.sock.sendall("".join(line + "\r\n" for line in lines).encode("utf-8"))
        except OSError:
            raise _Closed from None

    def checkpoint(self, stage: str) -> None:
        """Drop the connection or go silent here if the test asked for it."""
        if self.mx.drop_at == stage:
            raise _Closed
        if self.mx.hang_at == stage:
            self.mx._stopping.wait(self.mx.hang_timeout)
            raise _Closed

    def abort(self) -> None:
        """Called from stop(): wake up a blocked recv (works for TLS sockets too)."""
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the session -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.sock.settimeout(self.mx.timeout)
            self.checkpoint("greeting")
            self.reply(self.mx.greeting.replace("{name}", self.mx.name))
            while True:
                raw = self.read_line()
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                self.mx._record_command(self.number, line)
                if not raw.endswith(b"\r\n"):
                    self.reply("500 5.5.2 Line must end with CRLF")
                    continue
                verb, _, arg = line.partition(" ")
                handler = getattr(self, "do_" + verb.lower(), None) if verb.isalpha() else None
                if handler is None:
                    self.reply("500 5.5.2 Command not recognized")
                else:
                    handler(arg)
        except _Closed:
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            self.mx._forget(self)

    def offered(self) -> list[str]:
        """The EHLO keywords offered right now."""
        mx = self.mx
        words = list(mx.extensions)
        if mx.cert is not None and mx.starttls and not self.tls:
            words.append("STARTTLS")
        if mx.auth and (self.tls or not mx.require_tls_for_auth):
            words.append("AUTH PLAIN LOGIN")
        return words

    def do_lhlo(self, arg: str) -> None:
        if not self.mx.lmtp:
            return self.reply("500 5.5.2 Command not recognized")
        self.do_ehlo(arg, lmtp=True)

    def do_ehlo(self, arg: str, lmtp: bool = False) -> None:
        self.checkpoint("ehlo")
        if self.mx.lmtp and not lmtp:  # RFC 2033 4.1: never 250 to EHLO or HELO
            return self.reply("500 5.5.1 This is LMTP: use LHLO")
        if not arg.strip():
            return self.reply("501 5.5.4 EHLO needs a domain")
        if self.mx.ehlo_reply is not None:
            reply = _reply_value(self.mx.ehlo_reply)
            if reply.startswith("2"):
                self.helo, self.esmtp = arg.strip(), True
                self.reset()
            return self.reply(reply)
        self.helo, self.esmtp = arg.strip(), True
        self.reset()
        lines = [f"{self.mx.name} greets {self.helo}", *self.offered()]
        self.reply("\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}"
                             for i, text in enumerate(lines)))

    def do_helo(self, arg: str) -> None:
        self.checkpoint("ehlo")
        if self.mx.lmtp:
            return self.reply("500 5.5.1 This is LMTP: use LHLO")
        if not arg.strip():
            return self.reply("501 5.5.4 HELO needs a domain")
        self.helo, self.esmtp = arg.strip(), False
        self.reset()
        self.reply(f"250 {self.mx.name}")

    def param_error(self, params: dict[str, str | None], known: dict[str, str]) -> str | None:
        """A reply refusing parameters we did not offer (when check_params), else None."""
        if not params or not self.mx.check_params:
            return None
        if not self.esmtp:
            return "555 5.5.4 Parameters need EHLO"
        offered = {word.split()[0].upper(): word.split()[1:] for word in self.offered()}
        for key, value in params.items():
            if known.get(key) not in offered:
                return f"555 5.5.4 Unsupported option: {key}"
            if key == "BODY" and (value or "").upper() not in ("7BIT", "8BITMIME"):
                return f"555 5.5.4 Unsupported BODY={value}"
            if key == "SIZE":
                if not (value or "").isdigit():
                    return "501 5.5.4 Bad SIZE"
                limit = offered["SIZE"]
                if limit and limit[0].isdigit() and 0 < int(limit[0]) < int(value):
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
        return None

    def do_mail(self, arg: str) -> None:
        self.checkpoint("mail")
        if self.helo is None:
            return self.reply("503 5.5.1 Send EHLO/HELO first")
        if self.mail_from is not None:
            return self.reply("503 5.5.1 Nested MAIL command")
        if self.mx.require_auth and not self.auth_user:
            return self.reply("530 5.7.0 Authentication required")
        parsed = _parse_path(arg, "FROM:")
        if parsed is None:
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        address, params = parsed
        reply = self.param_error(params, _MAIL_PARAMS) or _reply_value(self.mx.mail_reply, address, self.number)
        if reply.startswith("2"):
            self.mail_from, self.mail_params = address, params
        self.reply(reply)

    def do_rcpt(self, arg: str) -> None:
        self.checkpoint("rcpt")
        if self.mail_from is None:
            return self.reply("503 5.5.1 Need MAIL command")
        parsed = _parse_path(arg, "TO:")
        if parsed is None or not parsed[0]:
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        address, params = parsed
        reply = self.param_error(params, _RCPT_PARAMS)
        if reply is None:
            chosen = self.mx.rcpt_replies.get(address.lower(), self.mx.default_rcpt_reply)
            reply = _reply_value(chosen, address, self.number)
        if reply.startswith("2"):
            self.rcpts.append(address)
            self.rcpt_params[address] = params
        self.reply(reply)

    def do_data(self, arg: str) -> None:
        self.checkpoint("data")
        if arg:
            return self.reply("501 5.5.4 DATA takes no arguments")
        if self.mail_from is None:
            return self.reply("503 5.5.1 Need MAIL command")
        if not self.rcpts:
            return self.reply("554 5.5.1 No valid recipients")
        reply = _reply_value(self.mx.data_reply)
        self.reply(reply)
        if not reply.startswith("3"):
            return None
        msg = Message(mail_from=self.mail_from, rcpt_tos=list(self.rcpts), data=self.read_data(),
                      tls=self.tls, helo=self.helo, peer=self.peer, connection=self.number,
                      mail_params=dict(self.mail_params), auth_user=self.auth_user,
                      rcpt_params=dict(self.rcpt_params))
        self.mx._record_transaction(msg)
        self.reset()
        self.checkpoint("dot")
        if self.mx.lmtp:
            return self.lmtp_replies(msg)
        msg.reply = _reply_value(self.mx.final_reply, msg)
        self.mx._record_reply(msg)  # before we answer: once the client sees 250 it is recorded
        self.reply(msg.reply)

    def lmtp_replies(self, msg: Message) -> None:
        """RFC 2033 4.2: one reply per accepted recipient, in RCPT order."""
        for rcpt in msg.rcpt_tos:
            if len(msg.replies) == self.mx.lmtp_drop_after:
                raise _Closed
            reply = _reply_value(self.mx.lmtp_replies.get(rcpt.lower(), self.mx.final_reply), msg)
            msg.replies.append(reply)
            if msg.reply is None:
                msg.reply = reply
                self.mx._record_reply(msg)
            self.reply(reply)

    def read_data(self) -> bytes:
        """The message up to CRLF.CRLF, dot-stuffing removed; bounded by mx.max_data."""
        if "body" in (self.mx.drop_at, self.mx.hang_at):
            while not self.buf:
                self.recv_more()
            self.checkpoint("body")
        scanned = 0
        while True:
            if self.buf.startswith(b".\r\n"):  # an empty message: the DATA line's CRLF starts the end
                end, skip = 0, 3
                break
            found = self.buf.find(b"\r\n.\r\n", max(0, scanned - 4))
            if found >= 0:
                end, skip = found + 2, found + 5
                break
            scanned = len(self.buf)
            if scanned > self.mx.max_data:
                self.reply("552 5.3.4 Message too big")
                raise _Closed
            self.recv_more()
        raw = bytes(self.buf[:end])
        del self.buf[:skip]
        return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in raw.split(b"\r\n"))

    def do_rset(self, arg: str) -> None:
        self.reset()
        self.reply("250 2.0.0 Ok")

    def do_noop(self, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def do_quit(self, arg: str) -> None:
        self.reply("221 2.0.0 Bye")
        raise _Closed

    def do_starttls(self, arg: str) -> None:
        if self.mx.cert is None or not self.mx.starttls:
            return self.reply("502 5.5.1 STARTTLS not available")
        if arg:
            return self.reply("501 5.5.4 STARTTLS takes no arguments")
        if self.tls:
            return self.reply("503 5.5.1 Already in TLS")
        context = self.mx._tls_context()
        self.reply("220 2.0.0 Ready to start TLS")
        self.buf.clear()  # RFC 3207: nothing sent before the handshake may be used after it
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.mx._record_tls_failure(self.number, exc)
            raise _Closed from None
        self.tls = self.sock.version()
        self.helo, self.esmtp, self.auth_user = None, False, None
        self.reset()

    def do_auth(self, arg: str) -> None:
        mx = self.mx
        if not mx.auth:
            return self.reply("502 5.5.1 AUTH not available")
        if not self.esmtp:
            return self.reply("503 5.5.1 Send EHLO first")
        if mx.require_tls_for_auth and not self.tls:
            return self.reply("538 5.7.11 Encryption required for requested authentication mechanism")
        if self.auth_user is not None:
            return self.reply("503 5.5.1 Already authenticated")
        if self.mail_from is not None:
            return self.reply("503 5.5.1 AUTH not allowed during a transaction")
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        try:
            if mechanism == "PLAIN":  # RFC 4616: authzid NUL authcid NUL password
                response = self.decode(initial) if initial else self.challenge("")
                _authzid, user, password = response.split("\0")
            elif mechanism == "LOGIN":
                user = self.decode(initial) if initial else self.challenge("VXNlcm5hbWU6")  # Username:
                password = self.challenge("UGFzc3dvcmQ6")  # Password:
            else:
                return self.reply("504 5.5.4 Unrecognized authentication type")
        except _Cancelled:
            return self.reply("501 5.0.0 Authentication cancelled")
        except (ValueError, binascii.Error):  # also UnicodeDecodeError and a wrong field count
            return self.reply("501 5.5.2 Cannot decode response")
        if user in mx.auth and mx.auth[user] == password:
            self.auth_user = user
            return self.reply("235 2.7.0 Authentication successful")
        return self.reply("535 5.7.8 Authentication credentials invalid")

    def challenge(self, prompt: str) -> str:
        """Send '334 prompt' and decode the client's base64 answer ('*' cancels)."""
        self.reply(f"334 {prompt}")
        answer = self.read_line().strip().decode("ascii", "replace")
        if answer == "*":
            raise _Cancelled
        return self.decode(answer)

    @staticmethod
    def decode(text: str) -> str:
        """Base64 as AUTH carries it ('=' is an empty initial response)."""
        return "" if text == "=" else base64.b64decode(text, validate=True).decode("utf-8")


class _Cancelled(Exception):
    """The client answered '*' to an AUTH challenge."""


class FakeMX:
    """A fake SMTP server on host:port that records everything (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.10", port: int | None = None,
                 name: str = "mx1.remote.test", cert=None):
        self.host = host
        self.port = port  # None: a free one is chosen by start()
        self.name = name
        self.cert = cert  # tests.support.certs.ServerCert (anything with cert_pem/key_pem) or None
        # -- behaviour (read per connection / command) --
        self.extensions: list[str] = list(DEFAULT_EXTENSIONS)
        self.starttls = True  # offer STARTTLS when cert is set
        self.tls_minimum: ssl.TLSVersion | None = None
        self.tls_maximum: ssl.TLSVersion | None = None
        self.greeting = "220 {name} ESMTP fake"
        self.ehlo_reply: str | None = None  # e.g. "502 5.5.1 no EHLO" (HELO still works)
        self.mail_reply: str | Callable[[str, int], str] = "250 2.1.0 Ok"  # callable(address, connection)
        self.rcpt_replies: dict[str, str | Callable[[str, int], str]] = {}  # lowercase address -> reply
        self.default_rcpt_reply: str | Callable[[str, int], str] = "250 2.1.5 Ok"
        self.data_reply = "354 End data with <CR><LF>.<CR><LF>"
        self.final_reply: str | Callable[[Message], str] = "250 2.0.0 Ok: queued"
        self.hang_at: str | None = None  # one of STAGES: go silent there
        self.drop_at: str | None = None  # one of STAGES: close the connection there
        self.hang_timeout = 120.0  # a hung connection is closed after this (or at stop())
        self.auth: dict[str, str] | None = None  # user -> password: offer AUTH PLAIN LOGIN
        self.require_tls_for_auth = True
        self.require_auth = False  # MAIL before AUTH gets 530
        self.check_params = True  # refuse MAIL/RCPT parameters whose extension was not offered
        self.timeout = 30.0  # per read; then 421 and close
        self.max_data = 50 * 1024 * 1024
        self.lmtp = False  # speak LMTP (see the module docstring)
        self.lmtp_replies: dict[str, str | Callable[[Message], str]] = {}  # lowercase address -> final reply
        self.lmtp_drop_after: int | None = None  # close after this many final replies
        # -- records --
        self.messages: list[Message] = []  # transactions answered with 2xx at the final dot
        self.transactions: list[Message] = []  # every fully received DATA, whatever the reply
        self.commands: list[tuple[int, str]] = []  # (connection, line) for every command line
        self.connections = 0
        self.tls_failures: list[tuple[int, str]] = []  # (connection, error) of failed handshakes
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._open: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._contexts: dict[tuple, ssl.SSLContext] = {}

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "FakeMX":
        self._stopping.clear()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port or 0))
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        listener.settimeout(0.1)  # the accept loop checks for stop() this often
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name=f"fakemx-{self.host}:{self.port}",
                                          daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection; release hung ones."""
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._cond:
            open_now = list(self._open)
        for conn in open_now:
            conn.abort()
        for t in self._threads:
            t.join(5)
        self._threads = []
        self._listener = self._accepter = None

    def __enter__(self) -> "FakeMX":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.connections += 1
                conn = _Connection(self, sock, self.connections, peer)
                self._open.add(conn)
                self._cond.notify_all()
            t = threading.Thread(target=conn.run, name=f"fakemx-{self.host}-{conn.number}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    # -- records ---------------------------------------------------------------------------
    def _record_command(self, number: int, line: str) -> None:
        with self._cond:
            self.commands.append((number, line))
            self._cond.notify_all()

    def _record_transaction(self, msg: Message) -> None:
        with self._cond:
            self.transactions.append(msg)
            self._cond.notify_all()

    def _record_reply(self, msg: Message) -> None:
        with self._cond:
            if msg.reply.startswith("2"):
                self.messages.append(msg)
            self._cond.notify_all()

    def _record_tls_failure(self, number: int, exc: Exception) -> None:
        with self._cond:
            self.tls_failures.append((number, str(exc)))
            self._cond.notify_all()

    def _forget(self, conn: _Connection) -> None:
        with self._cond:
            self._open.discard(conn)
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget all records (connection numbers start again at 1)."""
        with self._cond:
            self.messages.clear()
            self.transactions.clear()
            self.commands.clear()
            self.tls_failures.clear()
            self.connections = 0

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0):
        """Wait (bounded) until predicate() is truthy; its value, or AssertionError."""
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
            if not value:
                raise AssertionError(f"{self.host}:{self.port}: timed out after {timeout}s; "
                                     f"{self.connections} connections, commands {self.commands[-20:]}")
            return value

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[Message]:
        """The accepted messages, once there are at least `n` (AssertionError after `timeout`)."""
        self.wait_for(lambda: len(self.messages) >= n, timeout)
        with self._cond:
            return list(self.messages)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least `n` connections were accepted; their number."""
        self.wait_for(lambda: self.connections >= n, timeout)
        return self.connections

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no connection is open (the client has gone)."""
        self.wait_for(lambda: not self._open, timeout)

    # -- TLS -------------------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext:
        """A server context for the current cert and version limits (cached)."""
        key = (self.cert, self.tls_minimum, self.tls_maximum)
        context = self._contexts.get(key)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory(prefix="fakemx-") as tmp:
                cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert_file.write_bytes(self.cert.cert_pem)
                key_file.write_bytes(self.cert.key_pem)
                context.load_cert_chain(cert_file, key_file)
            if self.tls_minimum is not None:
                context.minimum_version = self.tls_minimum
            if self.tls_maximum is not None:
                context.maximum_version = self.tls_maximum
            self._contexts[key] = context
        return context
