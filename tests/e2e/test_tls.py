"""End to end: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) with real certificates made by
the tests (trustme), against a real server process over loopback (SPEC "STARTTLS (RFC 3207)
and implicit TLS (RFC 8314)").

The module server has four kinds of listener: "smtp" with STARTTLS, "submission" with implicit
TLS, "strict" (STARTTLS with require_tls) and "plain" (no TLS), plus "subplain", a submission
listener that allows AUTH in clear before STARTTLS. Its handshake timeout is 1 s. Tests whose
log lines must be told apart connect from their own loopback address (127.0.0.x).
"""
from __future__ import annotations

import base64
import os
import random
import re
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage

import pytest

from geosmtp import replies
from tests.support import toml
from tests.support.certs import ServerCert, client_context, replace_file
from tests.support.e2e import (
    HOSTNAME, abort, code, connect, expect, nothing_more, queue_id, wait_closed, wait_delivered,
)
from tests.support.server import PASSWORDS, ServerProcess, free_port
from tests.support.smtp import RawClient

HANDSHAKE_TIMEOUT = 1.0
ALICE = "alice@example.test"


# -- fixtures and helpers ---------------------------------------------------------------------
def tls_section(cert_file, key_file, **extra) -> dict:
    return {"tls": {"cert_file": str(cert_file), "key_file": str(key_file), **extra}}


@pytest.fixture(scope="module")
def cert():
    """The module server's certificate (a CA of its own; names mx.example.test, 127.0.0.1)."""
    return ServerCert()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert):
    pki = tmp_path_factory.mktemp("pki")
    cert.write(pki / "cert.pem", pki / "key.pem")
    overrides = {
        **tls_section(pki / "cert.pem", pki / "key.pem", handshake_timeout=HANDSHAKE_TIMEOUT),
        "listeners": {"smtp": {"tls": "starttls"}, "submission": {"tls": "implicit"}},
    }
    s = ServerProcess(tmp_path_factory.mktemp("geosmtp-tls"), overrides)
    s.ports = {}
    extra = {
        "strict": {"tls": "starttls", "require_tls": True, "auth": True},
        "plain": {"tls": "none"},
        "subplain": {"mode": "submission", "tls": "starttls", "allow_plaintext_auth": True},
    }
    for name, fields in extra.items():
        s.ports[name] = free_port()
        s.config["listener"].append({"name": name, "address": f"127.0.0.1:{s.ports[name]}", **fields})
    s.config_path.write_text(toml.dumps(s.config))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ctx(cert):
    """Trusts the test CA only, checks the host name."""
    return client_context(cert.ca)


def starttls(c: RawClient, context: ssl.SSLContext, hostname: str = HOSTNAME) -> RawClient:
    """STARTTLS on a greeted client, then the handshake on the same socket."""
    assert c.code("STARTTLS") == "220 2.0.0"
    assert c.buf == b"", c.buf  # nothing but the 220 came in clear
    c.sock = context.wrap_socket(c.sock, server_hostname=hostname)
    return c


def tls_client(port: int, context: ssl.SSLContext, *, source: str | None = None, ehlo: bool = True) -> RawClient:
    """Greeted, EHLO, STARTTLS done and (unless ehlo=False) EHLO again inside TLS."""
    c = starttls(connect(port, source=source, timeout=5), context)
    if ehlo:
        code_, lines = c.cmd("EHLO client.test")
        assert code_ == 250, lines
    return c


def implicit_client(port: int, context: ssl.SSLContext, *, source: str | None = None) -> RawClient:
    c = RawClient(port, timeout=5, source=source)
    c.sock = context.wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.reply() == (220, [f"{HOSTNAME} ESMTP"])
    return c


def smtp_starttls(port: int, context: ssl.SSLContext, source: str | None = None) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5,
                     source_address=(source, 0) if source else None)
    s.ehlo()
    assert s.has_extn("starttls")
    assert s.starttls(context=context)[0] == 220
    s.ehlo()
    return s


def message(sender: str, rcpt: str, subject: str) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, rcpt, subject
    m.set_content(f"body of {subject}\n")
    return m.as_bytes().replace(b"\n", b"\r\n")


def smtplib_send(s: smtplib.SMTP, sender: str, rcpt: str, subject: str) -> str:
    """One message through smtplib; its queue id from the reply to DATA."""
    assert s.mail(sender)[0] == 250
    assert s.rcpt(rcpt)[0] == 250
    code_, text = s.data(message(sender, rcpt, subject))
    assert code_ == 250, text
    return queue_id((code_, [text.decode()]))


def raw_send(c: RawClient, sender: str, rcpt: str, subject: str) -> str:
    assert c.code(f"MAIL FROM:<{sender}>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{rcpt}>") == "250 2.1.5"
    assert c.cmd("DATA")[0] == 354
    c.send(message(sender, rcpt, subject) + b".\r\n")
    return queue_id(c.reply())


def received(msg: bytes) -> str:
    """Our Received: header from a delivered message, unfolded to one line."""
    unfolded = re.sub(rb"\r?\n[ \t]+", b" ", msg)
    for line in unfolded.splitlines():
        if line.startswith(b"Received:"):
            return line.decode()
    raise AssertionError(f"no Received: header in {msg[:500]!r}")


def handshake_failures(server: ServerProcess, ip: str) -> list[str]:
    """Reasons logged for sessions from `ip` that ended in a failed TLS handshake."""
    pat = re.compile(rf"disconnect from \[{re.escape(ip)}\] .*\(TLS handshake failed \((.*)\)\)$", re.M)
    return pat.findall(server.log())


def wait_handshake_failure(server: ServerProcess, ip: str) -> str:
    return server.wait_for(lambda: handshake_failures(server, ip), timeout=5)[-1]


def readable(sock: socket.socket, wait: float) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def assert_served(server: ServerProcess, context: ssl.SSLContext) -> None:
    """A fresh client gets the full service: STARTTLS, EHLO, NOOP."""
    with tls_client(server.port, context) as c:
        assert c.code("NOOP") == "250 2.0.0"
        assert c.cmd("QUIT")[0] == 221


def exactly(reply: tuple[int, list[str]], want: replies.Reply) -> None:
    """The reply is this very one, text included (503 5.5.1 alone has several meanings)."""
    assert reply == (want.code, [f"{want.enhanced} {want.text}"]), f"expected {want}, got {reply}"


def ehlo_keywords(lines: list[str]) -> set[str]:
    return {line.split(" ")[0].upper() for line in lines[1:]}


# -- advertisement and the STARTTLS command ---------------------------------------------------
def test_starttls_advertised_only_before_tls(srv, ctx):
    c = connect(srv.port, ehlo=None)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "STARTTLS" in ehlo_keywords(lines)
    starttls(c, ctx)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250
    assert "STARTTLS" not in ehlo_keywords(lines)
    assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= ehlo_keywords(lines)
    c.close()


def test_no_starttls_on_a_plain_listener(srv):
    c = connect(srv.ports["plain"], ehlo=None)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "STARTTLS" not in ehlo_keywords(lines)
    expect(c.cmd("STARTTLS"), replies.TLS_NOT_AVAILABLE)  # 502 5.5.1
    assert c.code("NOOP") == "250 2.0.0"  # still plain text, still served
    c.close()


def test_smtplib_starttls_verifies_certificate_and_delivers(srv, ctx, cert):
    s = smtp_starttls(srv.port, ctx)  # verifies the chain and the name (IP SAN 127.0.0.1)
    try:
        assert not s.has_extn("starttls")
        assert s.sock.getpeercert(binary_form=True) == cert.der
        version, cipher = s.sock.version(), s.sock.cipher()[0]
        assert version in ("TLSv1.3", "TLSv1.2")
        qid = smtplib_send(s, "sender@remote.test", ALICE, "starttls smtplib")
    finally:
        s.quit()
    got = received(wait_delivered(srv, ALICE, qid))
    assert f"(using {version} with cipher {cipher})" in got, got
    assert f"with ESMTPS id {qid}" in got, got
    assert got.startswith("Received: from client.test ([127.0.0.1])"), got


def test_client_verifies_host_name_and_chain(srv, ctx):
    """The certificate is for mx.example.test; another name or another CA fails on the client,
    and the server shrugs it off."""
    c = connect(srv.port, timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        starttls(c, ctx, hostname="wrong.example.test")
    c.close()
    c = connect(srv.port, timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        starttls(c, client_context(ServerCert().ca))
    c.close()
    assert_served(srv, ctx)


def test_received_header_records_tls12(srv, cert):
    ctx12 = client_context(cert.ca, maximum=ssl.TLSVersion.TLSv1_2)
    c = tls_client(srv.port, ctx12)
    assert c.sock.version() == "TLSv1.2"
    cipher = c.sock.cipher()[0]
    qid = raw_send(c, "sender@remote.test", ALICE, "starttls tls12")
    c.close()
    got = received(wait_delivered(srv, ALICE, qid))
    assert f"(using TLSv1.2 with cipher {cipher})" in got, got
    assert f"with ESMTPS id {qid}" in got, got


def test_starttls_with_argument(srv):
    c = connect(srv.port)
    expect(c.cmd("STARTTLS now"), replies.NO_ARGUMENTS_ALLOWED)  # 501 5.5.4
    code_, lines = c.cmd("EHLO client.test")  # still plain text: nothing was started
    assert code_ == 250 and "STARTTLS" in ehlo_keywords(lines)
    c.close()


def test_starttls_before_ehlo(srv, ctx):
    c = connect(srv.port, ehlo=None)
    exactly(c.cmd("STARTTLS"), replies.NEED_EHLO)  # 503 5.5.1
    assert c.cmd("EHLO client.test")[0] == 250
    starttls(c, ctx)  # and then it works
    assert c.cmd("EHLO client.test")[0] == 250
    c.close()


def test_starttls_twice(srv, ctx):
    c = tls_client(srv.port, ctx)
    exactly(c.cmd("STARTTLS"), replies.ALREADY_TLS)  # 503 5.5.1
    assert c.code("NOOP") == "250 2.0.0"  # the session is still usable, still in TLS
    assert c.sock.version() is not None
    c.close()


def test_starttls_on_implicit_tls(srv, ctx):
    c = implicit_client(srv.submission_port, ctx)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "STARTTLS" not in ehlo_keywords(lines)
    exactly(c.cmd("STARTTLS"), replies.ALREADY_TLS)
    assert c.code("NOOP") == "250 2.0.0"
    c.close()


def test_pipelined_ehlo_and_starttls(srv, ctx):
    """RFC 2920: STARTTLS may end a pipelined group; the EHLO before it counts."""
    c = RawClient(srv.port, timeout=5)
    assert c.reply()[0] == 220
    c.send(b"EHLO client.test\r\nSTARTTLS\r\n")
    assert c.reply()[0] == 250
    assert code(c.reply()) == "220 2.0.0"
    assert c.buf == b""
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.cmd("EHLO client.test")[0] == 250
    c.close()


def test_input_after_data_inside_tls_is_refused(srv, ctx):
    """Inside TLS the same rule as in clear (RFC 2920 3.1): a message sent before its 354 in
    the same write is refused and the session closed; DATA last in its write gets the 354."""
    c = tls_client(srv.port, ctx)
    c.send(f"MAIL FROM:<bot@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
           "Subject: early\r\n\r\nbody\r\n.\r\n".encode())
    assert [code(c.reply()) for _ in range(2)] == ["250 2.1.0", "250 2.1.5"]
    exactly(c.reply(), replies.PROTOCOL_SYNC)
    assert c.closed()
    c.close()
    c = tls_client(srv.port, ctx)
    c.send(f"MAIL FROM:<p@remote.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode())
    assert [code(c.reply()) for _ in range(2)] == ["250 2.1.0", "250 2.1.5"]
    assert c.reply()[0] == replies.START_DATA.code
    c.send(b"Subject: waited\r\n\r\nbody\r\n.\r\n")
    qid = queue_id(c.reply())
    c.close()
    wait_delivered(srv, ALICE, qid)


# -- RFC 3207 4.2: everything learnt before TLS is forgotten -----------------------------------
def test_tls_forgets_greeting_and_transaction(srv, ctx):
    c = connect(srv.port)
    assert c.code("MAIL FROM:<before@remote.test>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    starttls(c, ctx)
    exactly(c.cmd(f"RCPT TO:<{ALICE}>"), replies.NEED_MAIL)  # the transaction is gone
    exactly(c.cmd("DATA"), replies.NEED_MAIL)
    exactly(c.cmd("MAIL FROM:<after@remote.test>"), replies.NEED_EHLO)  # greeting forgotten
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "STARTTLS" not in ehlo_keywords(lines)
    # a new transaction works, with only what was said inside TLS
    qid = raw_send(c, "after@remote.test", ALICE, "after tls")
    c.close()
    msg = wait_delivered(srv, ALICE, qid)
    assert b"Return-Path: <after@remote.test>" in msg
    assert b"before@remote.test" not in msg


def test_auth_forgotten_after_starttls(srv, ctx):
    """AUTH in clear (allowed on that listener) does not survive STARTTLS."""
    c = connect(srv.ports["subplain"])
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    expect(c.cmd(f"AUTH PLAIN {creds}"), replies.AUTH_OK)
    assert c.code(f"MAIL FROM:<{ALICE}>") == "250 2.1.0"
    starttls(c, ctx)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "AUTH" in ehlo_keywords(lines)  # offered again: not authenticated
    expect(c.cmd(f"MAIL FROM:<{ALICE}>"), replies.AUTH_REQUIRED)  # 530 5.7.0 on submission
    expect(c.cmd(f"AUTH PLAIN {creds}"), replies.AUTH_OK)
    qid = raw_send(c, ALICE, "bob@example.test", "auth after tls")
    c.close()
    got = received(wait_delivered(srv, "bob@example.test", qid))
    assert "with ESMTPSA id" in got, got


# -- CVE-2011-0411: plaintext injected after STARTTLS never runs inside TLS ---------------------
def test_injected_rset_after_starttls_is_discarded(srv, ctx):
    c = connect(srv.port, source="127.0.0.21")
    c.send(b"STARTTLS\r\nRSET\r\n")  # one write: the RSET is the attacker's
    assert code(c.reply()) == "220 2.0.0"
    assert c.buf == b"" and not readable(c.sock, 0.2)  # no reply to RSET in clear either
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    # the first reply inside TLS answers our NOOP ("Ok"), not the RSET ("Reset ok")
    assert c.cmd("NOOP") == (250, ["2.0.0 Ok"])
    # and a reply-code difference too: MAIL without EHLO is 503, a queued RSET reply would be 250
    exactly(c.cmd("MAIL FROM:<x@remote.test>"), replies.NEED_EHLO)
    assert nothing_more(c)
    c.close()
    srv.wait_for(lambda: re.search(r"discarded 6 bytes sent after STARTTLS", srv.log()), timeout=5)


def test_injected_mail_after_starttls_is_discarded(srv, ctx):
    c = connect(srv.port)
    c.send(b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<x@y.test>\r\n")
    assert code(c.reply()) == "220 2.0.0"
    assert c.buf == b"" and not readable(c.sock, 0.2)
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    code_, lines = c.cmd("EHLO client.test")  # the first reply in TLS is to our own EHLO
    assert code_ == 250 and lines[0].startswith(f"{HOSTNAME} greets")
    exactly(c.cmd(f"RCPT TO:<{ALICE}>"), replies.NEED_MAIL)  # the injected MAIL never ran
    qid = raw_send(c, "real@remote.test", ALICE, "after injection")
    c.close()
    msg = wait_delivered(srv, ALICE, qid)
    assert b"x@y.test" not in msg and b"evil.test" not in msg


def test_injection_in_a_separate_write_never_runs(srv, ctx):
    """Bytes that arrive after the server read STARTTLS but before the handshake reach the TLS
    layer as garbage: the handshake fails. Either way the RSET is never run."""
    c = connect(srv.port, source="127.0.0.22")
    c.send(b"STARTTLS\r\n")
    c.send(b"RSET\r\n")
    assert code(c.reply()) == "220 2.0.0"
    try:
        c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    except (ssl.SSLError, OSError):
        assert wait_handshake_failure(srv, "127.0.0.22")
    else:
        assert c.cmd("NOOP") == (250, ["2.0.0 Ok"])
    c.close()
    assert_served(srv, ctx)


# -- failed handshakes: that connection closes, is logged, nobody else notices -----------------
GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: mx.example.test\r\n\r\n",
    "smtp": b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\n",
    "bad-record": b"\x16\x03\x01\x00\x10" + b"\xff" * 16,
    "random": random.Random(3207).randbytes(64 * 1024),
}


@pytest.mark.parametrize("listener", ["starttls", "implicit"])
@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_instead_of_client_hello(srv, ctx, listener, kind):
    ip = {"starttls": "127.0.0.31", "implicit": "127.0.0.32"}[listener]
    before = len(handshake_failures(srv, ip))
    other = smtp_starttls(srv.port, ctx)  # an established session, mid-transaction
    assert other.mail("sender@remote.test")[0] == 250
    if listener == "starttls":
        c = connect(srv.port, source=ip, timeout=5)
        assert c.code("STARTTLS") == "220 2.0.0"
    else:
        c = RawClient(srv.submission_port, timeout=5, source=ip)
    t0 = time.monotonic()
    try:
        c.send(GARBAGE[kind])
    except OSError:
        pass  # the server may close before it has read it all
    assert wait_closed(c, 5), "connection not closed after a failed handshake"
    assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 2
    assert b"250" not in c.buf and b"ESMTP" not in c.buf  # no SMTP reply, at most a TLS alert
    c.close()
    srv.wait_for(lambda: len(handshake_failures(srv, ip)) > before, timeout=5)
    # the established session goes on as if nothing happened
    assert other.rcpt(ALICE)[0] == 250
    code_, text = other.data(message("sender@remote.test", ALICE, f"survivor {listener} {kind}"))
    assert code_ == 250, text
    other.quit()
    wait_delivered(srv, ALICE, queue_id((code_, [text.decode()])))
    assert_served(srv, ctx)  # and a fresh client is served


def test_silence_after_starttls_times_out(srv, ctx):
    ip = "127.0.0.33"
    c = connect(srv.port, source=ip, timeout=5)
    assert c.code("STARTTLS") == "220 2.0.0"
    t0 = time.monotonic()
    assert wait_closed(c, HANDSHAKE_TIMEOUT + 3)
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < HANDSHAKE_TIMEOUT + 2, elapsed
    assert c.buf == b""
    c.close()
    assert "timeout" in wait_handshake_failure(srv, ip)
    assert_served(srv, ctx)


def test_silence_on_implicit_tls_times_out(srv, ctx):
    ip = "127.0.0.34"
    c = RawClient(srv.submission_port, timeout=5, source=ip)
    t0 = time.monotonic()
    assert wait_closed(c, HANDSHAKE_TIMEOUT + 3)
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < HANDSHAKE_TIMEOUT + 2, elapsed
    assert c.buf == b""  # no greeting in clear, ever
    c.close()
    assert "timeout" in wait_handshake_failure(srv, ip)
    implicit_client(srv.submission_port, ctx).close()


def test_slow_drip_handshake_bounded_by_overall_timeout(srv, ctx):
    """A ClientHello trickling in a byte at a time never completes; the timeout bounds the
    whole handshake, not each read."""
    ip = "127.0.0.35"
    c = connect(srv.port, source=ip, timeout=5)
    assert c.code("STARTTLS") == "220 2.0.0"
    t0 = time.monotonic()
    c.send(b"\x16\x03\x01\x02\x00")  # a handshake record header announcing 512 bytes
    closed = False
    while time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 3 and not closed:
        try:
            c.send(b"\x01")
        except OSError:
            closed = True
            break
        if readable(c.sock, 0.2):
            try:
                closed = c.sock.recv(4096) == b""
            except OSError:
                closed = True
    elapsed = time.monotonic() - t0
    assert closed, "the dripping handshake was never cut off"
    assert elapsed < HANDSHAKE_TIMEOUT + 2, elapsed
    c.close()
    assert "timeout" in wait_handshake_failure(srv, ip)


def test_pending_handshake_does_not_block_others(srv, ctx):
    silent = connect(srv.port, source="127.0.0.36", timeout=5)
    assert silent.code("STARTTLS") == "220 2.0.0"
    t0 = time.monotonic()
    s = smtp_starttls(srv.port, ctx)
    assert s.noop()[0] == 250
    s.quit()
    with implicit_client(srv.submission_port, ctx) as c:
        assert c.code("NOOP") == "250 2.0.0"
    assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT * 0.8
    assert not readable(silent.sock, 0)  # the silent one is still waiting: served alongside
    silent.close()


# -- implicit TLS (RFC 8314) --------------------------------------------------------------------
def test_implicit_tls_with_smtp_ssl(srv, ctx, cert):
    s = smtplib.SMTP_SSL("127.0.0.1", srv.submission_port, local_hostname="client.test",
                         context=ctx, timeout=5)
    try:
        assert s.sock.getpeercert(binary_form=True) == cert.der
        s.ehlo()
        assert not s.has_extn("starttls")
        assert "PLAIN" in s.esmtp_features.get("auth", "").split()
        assert s.login(ALICE, PASSWORDS[ALICE])[0] == 235
        version, cipher = s.sock.version(), s.sock.cipher()[0]
        qid = smtplib_send(s, ALICE, "bob@example.test", "implicit tls")
    finally:
        s.quit()
    got = received(wait_delivered(srv, "bob@example.test", qid))
    assert f"(using {version} with cipher {cipher})" in got, got
    assert f"with ESMTPSA id {qid}" in got, got


def test_implicit_greeting_only_after_handshake(srv, ctx):
    c = RawClient(srv.submission_port, timeout=5)
    assert not readable(c.sock, 0.3)  # no 220 in clear
    c.sock = ctx.wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.reply() == (220, [f"{HOSTNAME} ESMTP"])
    assert c.cmd("EHLO client.test")[0] == 250
    c.close()


def test_plaintext_client_on_implicit_tls_gets_nothing(srv, ctx):
    ip = "127.0.0.37"
    c = RawClient(srv.submission_port, timeout=5, source=ip)
    assert not readable(c.sock, 0.3)
    c.send(b"EHLO client.test\r\n")
    assert wait_closed(c, 3)
    assert not c.buf.startswith(b"2") and b"ESMTP" not in c.buf and b"250" not in c.buf, c.buf
    c.close()
    wait_handshake_failure(srv, ip)
    implicit_client(srv.submission_port, ctx).close()


# -- require_tls ----------------------------------------------------------------------------------
def test_require_tls_refuses_mail_commands_before_starttls(srv, ctx):
    c = connect(srv.ports["strict"], ehlo=None)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250 and "STARTTLS" in ehlo_keywords(lines)
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    for line in ("MAIL FROM:<a@remote.test>", f"RCPT TO:<{ALICE}>", "DATA", f"AUTH PLAIN {creds}",
                 "AUTH LOGIN"):
        expect(c.cmd(line), replies.TLS_REQUIRED)  # 530 5.7.0
    # the connection-level commands are allowed
    assert c.code("NOOP") == "250 2.0.0"
    assert c.code("RSET") == "250 2.0.0"
    assert c.cmd("HELO client.test")[0] == 250
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    assert wait_closed(c)
    c.close()


def test_require_tls_serves_after_starttls(srv, ctx):
    c = connect(srv.ports["strict"])
    starttls(c, ctx)
    code_, lines = c.cmd("EHLO client.test")
    assert code_ == 250
    assert "STARTTLS" not in ehlo_keywords(lines) and "AUTH" in ehlo_keywords(lines)
    qid = raw_send(c, "sender@remote.test", ALICE, "require tls")
    creds = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    expect(c.cmd(f"AUTH PLAIN {creds}"), replies.AUTH_OK)
    qid2 = raw_send(c, ALICE, "bob@example.test", "require tls auth")
    c.close()
    assert "with ESMTPS id" in received(wait_delivered(srv, ALICE, qid))
    assert "with ESMTPSA id" in received(wait_delivered(srv, "bob@example.test", qid2))


# -- versions and ciphers -----------------------------------------------------------------------
def test_server_chooses_the_cipher(srv, cert):
    """OP_CIPHER_SERVER_PREFERENCE (TLS 1.2): the client's order does not decide."""
    suites = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES256-GCM-SHA384"]
    chosen = []
    for order in (suites, suites[::-1]):
        c12 = client_context(cert.ca, maximum=ssl.TLSVersion.TLSv1_2)
        c12.set_ciphers(":".join(order))
        c = tls_client(srv.port, c12, ehlo=False)
        assert c.sock.version() == "TLSv1.2"
        chosen.append(c.sock.cipher()[0])
        c.close()
    assert chosen[0] == chosen[1], chosen


def test_tls11_client_refused_by_default(srv, ctx, cert):
    """The default minimum is TLS 1.2: a client that offers at most TLS 1.1 is refused by the
    server (a protocol_version alert), and that is logged."""
    ip = "127.0.0.38"
    old = client_context(cert.ca, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.0/1.1
    c = connect(srv.port, source=ip, timeout=5)
    with pytest.raises(ssl.SSLError) as refused:
        starttls(c, old)
    c.close()
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value  # the server's alert
    assert "timeout" not in wait_handshake_failure(srv, ip)
    assert_served(srv, ctx)


def test_min_version_tls13_refuses_a_tls12_client(make_server, tmp_path):
    cert = ServerCert()
    cert.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv = make_server({**tls_section(tmp_path / "cert.pem", tmp_path / "key.pem", min_version="TLSv1.3",
                                     handshake_timeout=2),
                       "listeners": {"smtp": {"tls": "starttls"}}})
    ip = "127.0.0.41"
    c = connect(srv.port, source=ip, timeout=5)
    with pytest.raises(ssl.SSLError):
        starttls(c, client_context(cert.ca, maximum=ssl.TLSVersion.TLSv1_2))
    c.close()
    reason = wait_handshake_failure(srv, ip)
    assert "timeout" not in reason, reason
    ctx = client_context(cert.ca)
    with tls_client(srv.port, ctx) as c:
        assert c.sock.version() == "TLSv1.3"
        assert c.code("NOOP") == "250 2.0.0"


# -- SIGHUP: a new certificate for new handshakes, open sessions untouched ----------------------
def presented(port: int, context: ssl.SSLContext, implicit: bool = False) -> bytes | None:
    """The certificate a new handshake sees now (None if the handshake fails)."""
    try:
        if implicit:
            c = implicit_client(port, context)
        else:
            c = tls_client(port, context, ehlo=False)
    except (ssl.SSLError, OSError):
        return None
    with c:
        der = c.sock.getpeercert(binary_form=True)
        c.cmd("QUIT")
    return der


def reload_errors(srv: ServerProcess) -> int:
    return srv.log().count("TLS certificate not reloaded")


def test_sighup_reloads_certificate_without_dropping_sessions(make_server, tmp_path):
    a = ServerCert(common_name="cert-a.example.test")
    b = ServerCert(common_name="cert-b.example.test")  # another CA, another subject
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    a.write(cert_file, key_file)
    srv = make_server({**tls_section(cert_file, key_file),
                       "listeners": {"smtp": {"tls": "starttls"}, "submission": {"tls": "implicit"}}})
    both = client_context(a.ca, b.ca)
    assert presented(srv.port, both) == a.der

    old = tls_client(srv.port, client_context(a.ca))  # an open session, in the middle of DATA
    assert old.code("MAIL FROM:<old@remote.test>") == "250 2.1.0"
    assert old.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    assert old.cmd("DATA")[0] == 354
    old.send(b"Subject: across the reload\r\n\r\nfirst half\r\n")

    b.write(cert_file, key_file)
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for(lambda: presented(srv.port, both) == b.der, timeout=5)
    assert presented(srv.submission_port, both, implicit=True) == b.der  # implicit TLS too
    assert presented(srv.port, client_context(a.ca)) is None  # A's CA no longer fits
    assert f"reload: TLS certificates loaded from {cert_file}" in srv.log()

    old.send(b"second half\r\n.\r\n")
    qid = queue_id(old.reply())
    assert old.code("NOOP") == "250 2.0.0"
    assert old.sock.getpeercert(binary_form=True) == a.der
    qid2 = raw_send(old, "old@remote.test", ALICE, "second message on the old session")
    assert old.cmd("QUIT")[0] == 221
    old.close()
    assert wait_delivered(srv, ALICE, qid).endswith(b"first half\nsecond half\n")
    wait_delivered(srv, ALICE, qid2)
    assert srv.proc.poll() is None


def test_sighup_with_a_broken_certificate_keeps_the_old_one(make_server, tmp_path):
    a = ServerCert(common_name="cert-a.example.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    a.write(cert_file, key_file)
    srv = make_server({**tls_section(cert_file, key_file),
                       "listeners": {"smtp": {"tls": "starttls"}, "submission": {"tls": "implicit"}}})
    ctx = client_context(a.ca)
    old = tls_client(srv.port, ctx)
    other = ServerCert(a.ca, common_name="other.example.test")

    def garbage():
        replace_file(cert_file, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")

    def mismatched_key():
        replace_file(cert_file, other.cert_pem)  # the key is still A's
        replace_file(key_file, a.key_pem)

    def empty_key():
        other.write(cert_file, key_file)
        replace_file(key_file, b"")

    def missing():
        cert_file.unlink()

    for breakage in (garbage, mismatched_key, empty_key, missing):
        errors = reload_errors(srv)
        breakage()
        srv.proc.send_signal(signal.SIGHUP)
        srv.wait_for(lambda: reload_errors(srv) > errors, timeout=5)
        assert srv.proc.poll() is None, breakage.__name__
        assert presented(srv.port, ctx) == a.der, breakage.__name__
        assert presented(srv.submission_port, ctx, implicit=True) == a.der, breakage.__name__
        assert old.code("NOOP") == "250 2.0.0"
    log = srv.log()
    assert "Traceback" not in log

    # a good certificate afterwards is taken
    fixed = ServerCert(a.ca, common_name="fixed.example.test")
    fixed.write(cert_file, key_file)
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_for(lambda: presented(srv.port, ctx) == fixed.der, timeout=5)
    qid = raw_send(old, "old@remote.test", ALICE, "old session after four bad reloads")
    old.close()
    wait_delivered(srv, ALICE, qid)


# -- odds and ends ------------------------------------------------------------------------------
class _Raw(RawClient):
    """A RawClient around an existing socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""


def test_failed_handshakes_leak_no_descriptors(srv, ctx):
    """Garbage, resets mid-handshake, clients that refuse our certificate: every socket is
    closed again."""
    fds = lambda: len(os.listdir(f"/proc/{srv.proc.pid}/fd"))  # noqa: E731
    base = fds()
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", srv.submission_port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        wait_closed(_Raw(s), 3)
        s = socket.create_connection(("127.0.0.1", srv.submission_port), timeout=5)
        s.sendall(b"\x16\x03\x01\x02\x00\x01")
        abort(_Raw(s))
        c = connect(srv.port, timeout=5)
        assert c.code("STARTTLS") == "220 2.0.0"
        with pytest.raises(ssl.SSLCertVerificationError):
            c.sock = ctx.wrap_socket(c.sock, server_hostname="wrong.example.test")
        c.close()
        c = tls_client(srv.port, ctx)
        abort(c)
    srv.wait_for(lambda: fds() <= base, timeout=5)
    assert_served(srv, ctx)


def test_connection_limit_on_implicit_tls_is_refused_inside_tls(make_server, tmp_path):
    cert = ServerCert()
    cert.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv = make_server({**tls_section(tmp_path / "cert.pem", tmp_path / "key.pem", handshake_timeout=2),
                       "limits": {"max_connections_per_ip": 1},
                       "listeners": {"submission": {"tls": "implicit"}}})
    ip = "127.0.0.51"
    ctx = client_context(cert.ca)
    first = smtplib.SMTP_SSL("127.0.0.1", srv.submission_port, context=ctx, timeout=5, source_address=(ip, 0))
    try:
        assert first.noop()[0] == 250
        # nothing in clear on a TLS port, not even a refusal
        raw = RawClient(srv.submission_port, timeout=5, source=ip)
        wait_closed(raw, 3)
        assert b"421" not in raw.buf, raw.buf
        raw.close()
        # RFC 8314: everything after the TCP connect is TLS, the 421 4.7.0 included
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP_SSL("127.0.0.1", srv.submission_port, context=ctx, timeout=5, source_address=(ip, 0))
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error.startswith(b"4.7.0")
    finally:
        first.quit()


def test_unusable_certificate_at_start_is_a_clean_error(tmp_path):
    srv = ServerProcess(tmp_path / "srv", {**tls_section(tmp_path / "missing.pem", tmp_path / "missing.key"),
                                           "listeners": {"smtp": {"tls": "starttls"}}})
    with pytest.raises(RuntimeError, match="server exited with 2"):  # as for a bad config
        srv.start(timeout=10)
    log = srv.log()
    assert "cannot start" in log and "Traceback" not in log, log
    assert f"tls.cert_file: {tmp_path / 'missing.pem'}: No such file or directory" in log
    assert f"tls.key_file: {tmp_path / 'missing.key'}: No such file or directory" in log


def test_sighup_with_an_encrypted_key_does_not_freeze_the_server(tmp_path):
    from cryptography.hazmat.primitives import serialization

    a = ServerCert()
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    a.write(cert_file, key_file)
    srv = ServerProcess(tmp_path / "srv", {**tls_section(cert_file, key_file),
                                           "listeners": {"smtp": {"tls": "starttls"}}})
    master, slave = os.openpty()  # the server runs in a terminal, as when started by hand

    def own_terminal():
        import fcntl
        import termios
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen([sys.executable, "-m", "geosmtp", "start", "-c", str(srv.config_path)],
                                stdin=slave, stdout=log, stderr=subprocess.STDOUT, cwd=srv.root,
                                start_new_session=True, preexec_fn=own_terminal)
    log.close()
    try:
        srv.wait_for(lambda: "listening on" in srv.log() and presented(srv.port, client_context(a.ca)), timeout=10)
        key = serialization.load_pem_private_key(a.key_pem, None)
        replace_file(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(b"secret")))
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as s:
            assert s.recv(100).startswith(b"220")  # still serving
        assert presented(srv.port, client_context(a.ca)) == a.der  # the old certificate stays
        srv.wait_for(lambda: reload_errors(srv) == 1, timeout=3)
    finally:
        srv.kill()
        os.close(master)
        os.close(slave)
