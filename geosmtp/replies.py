"""Every SMTP reply geosmtp sends: code, RFC 3463 enhanced code and text, in one place.

Handlers return one of these; only the session's command loop writes them. Tests import the
same names. Replies never name an internal mechanism or a configuration key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None  # RFC 3463 "class.subject.detail"; None for the greeting and EHLO
    text: str | tuple[str, ...]
    close: bool = False  # close the connection once this reply is written
    wire: bytes = field(init=False, repr=False, compare=False)  # the bytes sent, made once

    def __post_init__(self) -> None:
        lines = self.lines
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        object.__setattr__(self, "wire", "".join(out).encode("utf-8"))

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        return self.wire

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


# -- connection ---------------------------------------------------------------------------
@lru_cache(maxsize=64)  # one per listener host name; a Reply never changes
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP")


@lru_cache(maxsize=64)  # one per listener host name; a Reply never changes
def closing_bye(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} Bye", close=True)


def ehlo(hostname: str, client: str, extensions: list[str]) -> Reply:
    return Reply(250, None, (f"{hostname} greets {client}", *extensions))


@lru_cache(maxsize=64)  # one per listener host name; a Reply never changes
def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)


TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later", close=True)
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address", close=True)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection", close=True)
COMMAND_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for a command, closing connection", close=True)
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for data, closing connection", close=True)
# a new client needed the slot of a session that had sent nothing useful for longest
BUSY_CLOSING_IDLE = Reply(421, "4.7.0", "Server busy, closing idle connection", close=True)
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection", close=True)
LINE_FLOOD = Reply(500, "5.5.6", "Line too long, closing connection", close=True)
# RFC 2920 3.1 / RFC 5321 4.3.1: input before the greeting, or past a DATA before its 354, is
# a client that does not wait for replies (a spam bot): the session ends, nothing is queued.
# 554 as Postfix 3.9 answers it (503 would invite the client to carry on in the session).
PROTOCOL_SYNC = Reply(554, "5.5.0", "SMTP protocol synchronization error, closing connection", close=True)

# -- generic ------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = OK
RESET_OK = Reply(250, "2.0.0", "Reset ok")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
VRFY_CANNOT = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BARE_NEWLINE_IN_COMMAND = Reply(500, "5.5.2", "Command line must end with CRLF")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL byte in command")
NOT_UTF8 = Reply(500, "5.5.2", "Command is not valid UTF-8")
NO_ARGUMENTS_ALLOWED = Reply(501, "5.5.4", "Syntax error, no parameters allowed")
EHLO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NEED_EHLO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
INTERNAL_ERROR = Reply(421, "4.3.0", "Local error in processing, closing connection", close=True)
# Postfix smtpd_forbidden_commands: a web client or proxy probe, not a mail client
NOT_SMTP = Reply(521, "5.5.1", "This is an SMTP server, closing connection", close=True)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")

# -- STARTTLS (RFC 3207) and AUTH (RFC 4954) ----------------------------------------------
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "AUTH not available")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection", close=True)
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
RATE_LIMITED = Reply(451, "4.7.1", "Too many messages, slow down and try again later")


def challenge(text: str) -> Reply:
    """A SASL challenge (334), base64 text; an intermediate reply like 354."""
    return Reply(334, None, text)


# -- MAIL / RCPT --------------------------------------------------------------------------
def bad_address(reason: str, enhanced: str = "5.1.3", code: int = 501) -> Reply:
    return Reply(code, enhanced, f"Bad address syntax: {reason}")


def unknown_parameter(name: str) -> Reply:
    # RFC 5321 4.1.1.11 / 3.3: unrecognised MAIL or RCPT parameters get 555
    return Reply(555, "5.5.4", f"Unsupported parameter {name}")


def bad_parameter(name: str, why: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad {name} parameter: {why}")


SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")
MESSAGE_TOO_BIG_DECLARED = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
# the directory (its database) did not answer: never "user unknown" for what we could not look up
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")

# -- DATA ---------------------------------------------------------------------------------
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BARE_NEWLINE = Reply(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
NUL_IN_MESSAGE = Reply(550, "5.6.0", "Message contains a NUL character")  # RFC 5322 2.3
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
MESSAGE_LINE_TOO_LONG = Reply(552, "5.3.4", "Message line too long")
# the body fell behind the minimum data rate: the client is mid-DATA, so the session closes
DATA_TOO_SLOW = Reply(451, "4.4.2", "Message data arriving too slowly, closing connection", close=True)
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
STORAGE_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")
