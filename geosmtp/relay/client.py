"""The outbound SMTP client: one connection to one remote server, blocking-style on gevent.

It speaks RFC 5321 with EHLO (HELO fallback), STARTTLS (RFC 3207), AUTH PLAIN (RFC 4616),
PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531), with
the per-stage timeouts of RFC 5321 4.5.3.2; and LMTP (RFC 2033: LHLO, then one reply per
accepted recipient after the final dot) over TCP or a unix socket, for delivery to a local
mail store. It returns one Reply per recipient and raises
TransientError or PermanentError for what ends the conversation; what to do about either
is the caller's business. Policy (whether TLS is needed, which host) lives in relay.pool.
"""
from __future__ import annotations

import base64
import re
import socket
from dataclasses import dataclass
from time import monotonic
from typing import BinaryIO

import gevent.socket

from geosmtp import linescan
from geosmtp.connection import (
    Connection,
    ConnectionClosed,
    HandshakeFailed,
    LineFlood,
    LineTooLong,
    ReadTimeout,
    readable_now,
)
from geosmtp.delivery.target import Message
from geosmtp.relay.errors import PermanentError, TransientError, error_for
from geosmtp.replies import Reply

REPLY_LINE_LIMIT = 4096  # RFC 5321 says 512; real servers send longer lines
MAX_REPLY_LINES = 100
CHUNK = 64 * 1024
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


class ConnectionLost(TransientError):
    """The server closed the connection or it broke."""


class StaleConnection(ConnectionLost):
    """A kept connection was gone before the first reply of a new transaction: nothing was
    delivered, and the message can go at once on a fresh connection."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """RFC 5321 4.5.3.2, with the minimums it gives as defaults."""

    connect: float = 30.0
    command: float = 300.0  # greeting, EHLO, MAIL, RCPT, RSET...
    data: float = 600.0  # the reply after the final dot

    @property
    def data_start(self) -> float:  # 4.5.3.2.4: the 354 after DATA, 2 minutes
        return min(self.command, 120.0)

    @property
    def block(self) -> float:  # 4.5.3.2.5: each block of the body, 3 minutes
        return min(self.data, 180.0)


def remote_reply(code: int, lines: list[str]) -> Reply:
    """A remote server's reply as one Reply with a single-line text: the enhanced code
    (RFC 2034) when the server gave a valid one, control characters removed."""
    enhanced = None
    texts = []
    for line in lines:
        m = _ENHANCED.match(line)
        if m and int(m.group(1)) == code // 100:
            enhanced = enhanced or f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            line = line[m.end():]
        texts.append(_UNPRINTABLE.sub(" ", line).strip())
    text = " ".join(t for t in texts if t) or "(no text)"
    return Reply(code, enhanced, text[:1000])


def _stuffed(chunk: bytes, line_start: bool) -> bytes:
    """RFC 5321 4.5.2: one more "." before every line that begins with "."."""
    out = linescan.dot_stuffed(chunk)
    return b"." + out if line_start and chunk[:1] == b"." else out


class Client:
    """A connected, greeted client. Build it with Client.open()."""

    def __init__(self, conn: Connection, label: str, timeouts: Timeouts):
        self.conn = conn
        self.label = label  # "name[address]" for logs and DSNs
        self.timeouts = timeouts
        self.extensions: dict[str, str] = {}
        self.tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
        self.auth_user: str | None = None
        self.server_name = ""  # the name the server gives in its EHLO/HELO reply, lower case
        self.transactions = 0
        self.idle_since = monotonic()
        self.broken = False
        self.lmtp = False  # set by lhlo(): one final reply per accepted recipient

    # -- connection set-up ------------------------------------------------------------------
    @classmethod
    def open(cls, address: str, port: int, label: str, timeouts: Timeouts) -> Client:
        """Connect over TCP and read the greeting. A server that does not answer 220 is a
        failure of this host only: the caller tries the next one."""
        try:
            sock = gevent.socket.create_connection((address, port), timeout=timeouts.connect)
        except (OSError, socket.timeout) as exc:
            raise _connect_failed(label, exc) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls._greeted(sock, label, timeouts)

    @classmethod
    def open_unix(cls, path: str, label: str, timeouts: Timeouts) -> Client:
        """Connect to a unix socket (a local LMTP server) and read the greeting."""
        sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeouts.connect)
            sock.connect(path)
        except (OSError, socket.timeout) as exc:
            sock.close()
            raise _connect_failed(label, exc) from None
        return cls._greeted(sock, label, timeouts)

    @classmethod
    def _greeted(cls, sock: socket.socket, label: str, timeouts: Timeouts) -> Client:
        client = cls(Connection(sock, send_timeout=timeouts.block), label, timeouts)
        try:
            greeting = client.read_reply(timeouts.command, "greeting")
        except BaseException:
            client.close()
            raise
        if greeting.code != 220:
            client.close()
            raise error_for(greeting, label)
        return client

    def hello(self, name: str) -> None:
        """EHLO, or HELO when the server does not know EHLO (RFC 5321 3.2)."""
        reply = self._greet("EHLO", name)
        if reply is not None and reply.code in (500, 502, 504, 550):  # no ESMTP here: plain SMTP
            reply = self._greet("HELO", name)
        if reply is not None:
            self.broken = True
            raise error_for(reply, self.label)

    def lhlo(self, name: str) -> None:
        """LHLO (RFC 2033 4.1), which makes this an LMTP session: after the final dot the
        server answers once for every accepted recipient. There is no fallback."""
        self.lmtp = True
        reply = self._greet("LHLO", name)
        if reply is not None:
            self.broken = True
            raise error_for(reply, self.label)

    def _greet(self, verb: str, name: str) -> Reply | None:
        """EHLO, HELO or LHLO; None when the server said 250 (its extensions are kept),
        else its reply."""
        self.conn.write(f"{verb} {name}\r\n".encode("ascii"))
        code, lines = self._read(self.timeouts.command, verb)
        if code != 250:
            return remote_reply(code, lines)
        self.extensions = _extensions(lines[1:]) if verb != "HELO" else {}
        self.server_name = lines[0].partition(" ")[0].lower()
        return None

    def starttls(self, context, server_hostname: str, helo_name: str) -> bool:
        """STARTTLS and EHLO again. False when the server answers other than 220 (the
        session stays in plaintext and usable); raises TransientError when the handshake
        fails (the connection is then unusable)."""
        if self.conn.pending():
            # replies nobody asked for: a man in the middle, or a broken server
            self.broken = True
            raise TransientError(Reply(451, "4.7.5", f"{self.label} sent unexpected data before STARTTLS"), self.label)
        reply = self.command("STARTTLS", "STARTTLS")
        if reply.code != 220:
            return False
        if self.conn.pending():  # bytes after the 220 would be taken as TLS-protected replies
            self.broken = True
            raise TransientError(Reply(451, "4.7.5", f"{self.label} sent data after its STARTTLS reply"), self.label)
        try:
            self.tls = self.conn.start_tls(context, self.timeouts.command, server_hostname=server_hostname)
        except HandshakeFailed as exc:
            self.broken = True
            raise TransientError(Reply(451, "4.7.5", f"TLS handshake with {self.label} failed: {exc}"), self.label) from None
        self.extensions = {}
        self.hello(helo_name)  # RFC 3207 4.2: everything learnt before is forgotten
        return True

    def auth_plain(self, user: str, password: str) -> None:
        """AUTH PLAIN (RFC 4616) with the initial response. The caller ensures TLS. The
        command is never logged: it carries the password."""
        if "PLAIN" not in self.extensions.get("AUTH", "").upper().split():
            raise TransientError(Reply(451, "4.7.0", f"{self.label} does not offer AUTH PLAIN"), self.label)
        token = base64.b64encode(f"\0{user}\0{password}".encode("utf-8")).decode("ascii")
        reply = self.command(f"AUTH PLAIN {token}", "AUTH")
        if reply.code != 235:
            # a rejected login is the relay operator's problem to fix, not the sender's:
            # keep the mail and retry (Postfix does the same)
            raise TransientError(Reply(451, "4.7.0", f"authentication to {self.label} failed: {reply}"), self.label)
        self.auth_user = user

    # -- the transaction --------------------------------------------------------------------
    def send(self, msg: Message, body: BinaryIO) -> list[Reply]:
        """One mail transaction; a Reply for each of msg.recipients, in order. Raises
        TransientError when the connection is lost or times out before the final dot (every
        recipient is then undecided), PermanentError when this server can never take the
        message. In LMTP, a connection lost while the final replies come in leaves the
        replies already read as they are and gives the rest the 4xx of the loss."""
        self._check(msg, body)
        rcpts, data = self._envelope(msg)
        accepted = [i for i, r in enumerate(rcpts) if r.code // 100 == 2]
        if data is not None and data.code == 354:
            if accepted:
                for i, final in zip(accepted, self._final_replies(msg.prefix, body, len(accepted))):
                    rcpts[i] = final
                return rcpts
            if self.lmtp:
                # a 354 with no valid recipient breaks RFC 2033 4.2 (it must be 503), and
                # the count of replies after a dot would be zero: not worth keeping
                self.close()
                return rcpts
            # RFC 2920 3.1: a server that says 354 with no valid recipient gets an empty
            # message, which it must refuse
            self.conn.write(b".\r\n")
            self.read_reply(self.timeouts.data, "end of data")
        elif accepted:  # DATA refused after recipients were accepted
            for i in accepted:
                rcpts[i] = data or Reply(451, "4.5.0", "no DATA reply")
        self.reset()
        return rcpts

    def _check(self, msg: Message, body: BinaryIO) -> None:
        """What makes this server unable to ever take the message: PermanentError."""
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and msg.size > int(limit):
            raise PermanentError(Reply(552, "5.3.4", f"message size {msg.size} exceeds the limit "
                                       f"of {self.label} ({limit})"), self.label)
        if msg.smtputf8 and "SMTPUTF8" not in self.extensions:
            raise PermanentError(Reply(553, "5.6.7", f"{self.label} does not support SMTPUTF8, "
                                       "which this message needs"), self.label)
        if msg.eightbit and "8BITMIME" not in self.extensions and not _all_ascii(body):
            # RFC 6152 3: convert or refuse; we do not rewrite MIME, so the sender hears of it
            raise PermanentError(Reply(554, "5.6.3", f"{self.label} does not support 8BITMIME, "
                                       "which this message needs"), self.label)

    def _mail_command(self, msg: Message) -> str:
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={msg.size}"
        if msg.eightbit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if msg.smtputf8:
            params += " SMTPUTF8"
        return f"MAIL FROM:<{msg.sender}>{params}"

    def _envelope(self, msg: Message) -> tuple[list[Reply], Reply | None]:
        """MAIL, RCPT for each recipient, DATA: in one go when the server pipelines (RFC
        2920), else one at a time. The RCPT replies (each the MAIL reply when MAIL was
        refused) and DATA's, None when DATA was not sent."""
        commands = [self._mail_command(msg)] + [f"RCPT TO:<{r}>" for r in msg.recipients]
        pipelining = "PIPELINING" in self.extensions
        for line in commands + ["DATA"] if pipelining else commands[:1]:
            self.conn.write(line.encode("utf-8") + b"\r\n")
        mail = self._mail_reply()
        if pipelining:
            rcpts = [self.read_reply(self.timeouts.command, "RCPT TO") for _ in msg.recipients]
            data = self.read_reply(self.timeouts.data_start, "DATA")
        else:
            rcpts = []
            data = None
            if mail.code == 250:
                for line in commands[1:]:
                    # after a 421 the server is gone: the rest get the same answer
                    rcpts.append(rcpts[-1] if self.broken else self.command(line, "RCPT TO"))
                if any(r.code // 100 == 2 for r in rcpts) and not self.broken:
                    data = self.command("DATA", "DATA", self.timeouts.data_start)
        if mail.code != 250:
            rcpts = [mail] * len(msg.recipients)
        return rcpts, data

    def _mail_reply(self) -> Reply:
        """The reply to MAIL FROM. On a kept connection, a loss or a 421 here is a
        StaleConnection: nothing was delivered, the message can go on a fresh one."""
        reused = self.transactions > 0
        self.transactions += 1
        try:
            mail = self.read_reply(self.timeouts.command, "MAIL FROM")
        except ConnectionLost as exc:
            if reused:
                raise StaleConnection(exc.reply, exc.remote) from None
            raise
        if mail.code == 421 and reused:  # it timed us out while the connection was kept
            raise StaleConnection(mail, self.label)
        return mail

    def _send_body(self, prefix: bytes, body: BinaryIO) -> Reply:
        """The prefix and the body, dot-stuffed, the final dot, and the (first) reply."""
        line_start = True
        for chunk in (prefix, *iter(lambda: body.read(CHUNK), b"")):
            if not chunk:
                continue
            if b"\0" in chunk:
                self._refuse_nul()
            self.conn.write(_stuffed(chunk, line_start))
            line_start = chunk.endswith(b"\n")
            self._flush("message body")
        self.conn.write(b".\r\n" if line_start else b"\r\n.\r\n")
        return self.read_reply(self.timeouts.data, "end of data")

    def _refuse_nul(self) -> None:
        """A NUL in the message (spooled by a version that still took them): a next hop that
        drops NULs would read "\r\n\0.\r\n" as our end of data and the rest as commands
        of ours. Not stripped either: the DKIM signature made over these bytes would break,
        and the message would not be what was accepted. The final dot is never sent: the
        connection is closed mid-DATA, so the server discards the transaction (RFC 5321
        3.8), and the recipients bounce with the reason."""
        self.close()
        raise PermanentError(Reply(554, "5.6.0", "message contains a NUL character: "
                                   "not sent (RFC 5322 2.3)"), self.label)

    def _final_replies(self, prefix: bytes, body: BinaryIO, accepted: int) -> list[Reply]:
        """Send the content; the replies after the final dot, one for each accepted
        recipient: SMTP's one reply for all of them, or LMTP's one each, in RCPT order (RFC
        2033 4.2). In LMTP, a reply that never comes (timeout, lost connection) is the 4xx
        that says so, for it and every one after it: those recipients are deferred, the
        ones answered before stand."""
        if not self.lmtp:
            return [self._send_body(prefix, body)] * accepted
        replies: list[Reply] = []
        try:
            replies.append(self._send_body(prefix, body))
            while len(replies) < accepted:
                replies.append(self.read_reply(self.timeouts.data, "end of data"))
        except TransientError as exc:
            replies += [exc.reply] * (accepted - len(replies))
        return replies

    def reset(self) -> None:
        """RSET after a transaction that did not end in a final reply, so the connection
        can carry the next message. A failure only means the connection is not kept: the
        replies already received stand."""
        if self.broken:
            return
        try:
            if self.command("RSET", "RSET").code != 250:
                self.broken = True
        except TransientError:
            self.broken = True

    def quiet(self) -> bool:
        """Whether a kept connection is still fit to use: not broken, and the server has
        sent nothing since (an idle timeout's 421, or the end of the connection)."""
        if self.broken or self.conn.pending():
            return False
        try:
            return not readable_now(self.conn.sock)
        except (OSError, ValueError):
            return False

    def quit(self) -> None:
        """QUIT politely, briefly; the connection is closed whatever happens."""
        try:
            if not self.broken:
                self.conn.write(b"QUIT\r\n")
                self.read_reply(min(self.timeouts.command, 5.0), "QUIT")
        except (TransientError, PermanentError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.broken = True
        self.conn.close()

    # -- reading and writing ----------------------------------------------------------------
    def command(self, line: str, stage: str, timeout: float | None = None) -> Reply:
        self.conn.write(line.encode("utf-8") + b"\r\n")
        return self.read_reply(self.timeouts.command if timeout is None else timeout, stage)

    def _flush(self, stage: str) -> None:
        try:
            self.conn.flush()
        except ConnectionClosed as exc:
            self.broken = True
            raise ConnectionLost(Reply(451, "4.4.2", f"lost connection with {self.label} "
                                       f"while sending {stage}: {exc}"), self.label) from None

    def read_reply(self, timeout: float, stage: str) -> Reply:
        """One whole reply, its lines joined; it must all arrive within `timeout`."""
        return remote_reply(*self._read(timeout, stage))

    def _read(self, timeout: float, stage: str) -> tuple[int, list[str]]:
        self._flush(stage)
        deadline = monotonic() + timeout
        lines: list[str] = []
        code = None
        try:
            while len(lines) < MAX_REPLY_LINES:
                raw = self.conn.read_line(REPLY_LINE_LIMIT, max(deadline - monotonic(), 0.001), strict=False)
                if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b" ", b"-", b""):
                    raise ValueError(raw[:80])
                if code is not None and int(raw[:3]) != code:
                    raise ValueError(raw[:80])
                code = int(raw[:3])
                text = raw[4:].decode("utf-8", "replace")
                lines.append(text)
                if raw[3:4] != b"-":
                    break
            else:
                raise ValueError(b"too many lines")
            if code == 421:  # RFC 5321 3.8: the server is closing the connection
                self.broken = True
        except ReadTimeout:
            self.broken = True
            raise TransientError(Reply(451, "4.4.2", f"timeout waiting for {stage} reply from "
                                       f"{self.label}"), self.label) from None
        except (ConnectionClosed, LineFlood) as exc:
            self.broken = True
            raise ConnectionLost(Reply(451, "4.4.2", f"lost connection with {self.label} "
                                       f"after {stage}: {exc}"), self.label) from None
        except (ValueError, LineTooLong) as exc:
            self.broken = True
            raise TransientError(Reply(451, "4.5.0", f"protocol error from {self.label} after {stage}: "
                                       f"{exc!s:.80}"), self.label) from None
        return code, lines


def _connect_failed(label: str, exc: BaseException) -> TransientError:
    return TransientError(Reply(451, "4.4.1", f"connect to {label} failed: "
                                f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}"))


def _all_ascii(body: BinaryIO) -> bool:
    """Whether the rest of `body` is 7-bit (its position is kept)."""
    start = body.tell()
    try:
        return all(chunk.isascii() for chunk in iter(lambda: body.read(CHUNK), b""))
    finally:
        body.seek(start)


def _extensions(lines: list[str]) -> dict[str, str]:
    """EHLO lines after the first → {"SIZE": "10240000", "PIPELINING": "", ...}."""
    out = {}
    for line in lines:
        keyword, _, param = line.strip().partition(" ")
        if keyword:
            out[keyword.upper()] = param.strip()
    return out
