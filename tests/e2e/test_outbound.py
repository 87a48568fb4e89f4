"""End to end: mail for other domains leaves through the relay to fake MX servers found in a
fake DNS, with retries, bounces (RFC 3464) and DKIM. Everything runs on 127.0.0.0/8.

Most tests share one server (`world`, one per module) and get their own remote domains and
fake MX servers from `net` (new domain names, new loopback addresses), so nothing one test
leaves in the server's DNS cache or connection pool reaches another. Tests that need their
own [relay] or [queue] settings start their own server.
"""
from __future__ import annotations

import base64
import email
import email.policy
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import toml
from tests.support.e2e import (  # noqa: F401 (srv, net: fixtures)
    net, srv,
    SENDER, Remotes, connect, dot_stuff, dsn_fields, fresh_address, log_lines, notices, only, queue_id,
    relay_config, remote_domain, send_message, sent_line, submit, verbs, wait_deferred, wait_gone,
    wait_notices,
)
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import DEFAULT_EXTENSIONS, FakeMX, _Closed, pick_port
from tests.support.server import PASSWORDS, ServerProcess

MX1, MX2 = "127.0.0.10", "127.0.0.11"
HELO = "mx.example.test"  # server.hostname of the test server: our EHLO name and the DSNs' MTA


@pytest.fixture
def dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def mx_port():
    return pick_port([MX1, MX2])


@pytest.fixture
def mx1(mx_port):
    with FakeMX(MX1, mx_port, name="mx1.remote.test") as m:
        yield m


@pytest.fixture
def mx2(mx_port):
    with FakeMX(MX2, mx_port, name="mx2.remote.test") as m:
        yield m


@pytest.fixture
def relay_server(tmp_path, dns, mx_port, mx1):
    dns.mx("remote.test", [(10, "mx1.remote.test")])
    dns.a("mx1.remote.test", MX1)
    srv = ServerProcess(tmp_path, relay_config(dns, mx_port)).start()
    yield srv
    srv.stop()


def test_message_for_a_remote_domain_reaches_its_mx(relay_server, mx1):
    qid = submit(relay_server, ["bob@remote.test"])
    [msg] = mx1.wait_for_messages(1)
    assert msg.mail_from == SENDER
    assert msg.rcpt_tos == ["bob@remote.test"]
    assert b"hello" in msg.data
    assert msg.data.startswith(b"Received: ")
    relay_server.wait_for(lambda: not (relay_server.spool / "msg" / qid).exists())
    assert "status=sent" in relay_server.log()


# -- a server shared by most tests --------------------------------------------------------
DKIM_DOMAIN, DKIM_SELECTOR = "signed.test", "sel"


@dataclass
class World:
    dns: FakeDNS
    port: int  # [relay] port: every fake MX of the module listens on it
    server: ServerProcess
    dkim_txt: bytes  # the DKIM key record of DKIM_DOMAIN


def dkim_key(path: Path) -> bytes:
    """Write a new RSA private key (PEM) to `path`; the TXT record that publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outbound")
    with FakeDNS() as dns:
        port = pick_port([fresh_address(), fresh_address()])
        overrides = relay_config(dns, port)
        overrides["listeners"] = {"submission": {"allow_plaintext_auth": True}}
        txt = dkim_key(root / "dkim.pem")
        overrides["dkim"] = {"key": [{"domain": DKIM_DOMAIN, "selector": DKIM_SELECTOR,
                                      "key_file": str(root / "dkim.pem")}]}
        srv = ServerProcess(root / "srv", overrides)
        srv.start()
        try:
            yield World(dns, port, srv, txt)
        finally:
            srv.stop()



# -- which host ---------------------------------------------------------------------------
def test_lower_preference_mx_gets_the_mail(srv, net):
    domain = net.domain()
    primary, backup = net.fake(f"mx1.{domain}"), net.fake(f"mx2.{domain}")
    net.dns.mx(domain, [(20, backup.name), (10, primary.name)])
    body = b"Subject: hi\r\nFrom: <alice@example.test>\r\n\r\nhello\r\n"
    qid = submit(srv, [f"bob@{domain}"], body)
    msg = only(primary.wait_for_messages(1))
    assert (msg.mail_from, msg.rcpt_tos, msg.helo) == (SENDER, [f"bob@{domain}"], HELO)
    assert msg.data.startswith(b"Received: ") and msg.data.endswith(body + b"\r\n")  # + the CRLF before "."
    assert msg.mail_params["SIZE"] == str(len(msg.data))  # what we stored is what we sent
    assert "BODY" not in msg.mail_params and "SMTPUTF8" not in msg.mail_params  # a 7-bit ASCII message
    wait_gone(srv, qid)
    assert backup.connections == 0
    assert f"relay={primary.name}[{primary.host}]" in sent_line(srv, qid, f"bob@{domain}")


@pytest.mark.parametrize("trouble", ["stopped", "421 greeting", "554 greeting", "hangs at greeting"])
def test_next_mx_takes_the_mail_in_the_same_attempt(srv, net, trouble):
    domain = net.domain()
    primary, backup = net.fake(f"mx1.{domain}"), net.fake(f"mx2.{domain}")
    if trouble == "stopped":
        primary.stop()
    elif trouble == "hangs at greeting":
        primary.hang_at = "greeting"  # our command_timeout is 2 s
    else:
        primary.greeting = trouble[:3] + " {name} not now"
    net.dns.mx(domain, [(10, primary.name), (20, backup.name)])
    qid = submit(srv, [f"bob@{domain}"])
    only(backup.wait_for_messages(1))
    wait_gone(srv, qid)
    line = sent_line(srv, qid, f"bob@{domain}")
    assert "attempt=1 " in line and f"relay={backup.name}[{backup.host}]" in line
    assert primary.connections == (0 if trouble == "stopped" else 1)
    assert "MAIL" not in verbs(primary)
    assert not notices(srv, qid)


def test_every_address_of_every_mx_is_tried_in_one_attempt(srv, net):
    domain = net.domain()
    dead1, dead2 = fresh_address(), fresh_address()  # nothing listens there: connection refused
    busy = net.fake(f"mx1.{domain}", a=False, greeting="421 4.3.2 {name} busy")
    good = net.fake(f"mx2.{domain}", a=False)
    net.dns.a(busy.name, dead1, busy.host)
    net.dns.a(good.name, dead2, good.host)
    net.dns.mx(domain, [(10, busy.name), (20, good.name)])
    qid = submit(srv, [f"bob@{domain}"])
    only(good.wait_for_messages(1))
    wait_gone(srv, qid)
    assert "attempt=1 " in sent_line(srv, qid, f"bob@{domain}")
    assert busy.connections == 1
    log = srv.log()
    for label in (f"{busy.name}[{dead1}]", f"{busy.name}[{busy.host}]", f"{good.name}[{dead2}]"):
        assert label in log, label


def test_address_literal_goes_to_that_address_without_dns(srv, net):
    mx = net.fake("literal.invalid", a=False)
    net.dns.reset_queries()
    qid = submit(srv, [f"postmaster@[{mx.host}]"])
    msg = only(mx.wait_for_messages(1))
    assert msg.rcpt_tos == [f"postmaster@[{mx.host}]"]
    wait_gone(srv, qid)
    assert net.dns.queries == []


# -- DNS ------------------------------------------------------------------------------------
def test_domain_without_mx_gets_the_mail_at_its_own_address(srv, net):
    domain = net.domain()
    mx = net.fake(domain)  # an A record for the domain itself, and no MX (RFC 5321 5.1)
    qid = submit(srv, [f"bob@{domain}"])
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert (domain, "MX") in net.dns.queries and (domain, "A") in net.dns.queries


def test_domain_that_does_not_exist_bounces_5_4_4(srv, net):
    domain = net.domain()  # never put in the DNS: NXDOMAIN
    qid = submit(srv, [f"bob@{domain}"])
    fields = only(dsn_fields(only(wait_notices(srv, qid))))
    assert fields["Final-Recipient"] == f"rfc822; bob@{domain}"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.4.4")
    assert "Remote-MTA" not in fields  # nobody was talked to
    wait_gone(srv, qid)
    assert any("status=bounced" in line and "5.4.4" in line for line in log_lines(srv, qid))


def test_null_mx_bounces_5_1_10_and_no_host_is_contacted(srv, net):
    domain = net.domain()
    trap = net.fake(domain)  # the domain's own address: must not be taken as an implicit MX
    net.dns.null_mx(domain)
    qid = submit(srv, [f"bob@{domain}"])
    fields = only(dsn_fields(only(wait_notices(srv, qid))))
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.10")
    wait_gone(srv, qid)
    assert trap.connections == 0
    assert (domain, "A") not in net.dns.queries


@pytest.mark.parametrize("trouble", ["servfail", "hang"])
def test_dns_failure_defers_then_delivers_when_dns_is_fixed(srv, net, trouble):
    domain = net.domain()
    mx = net.fake(f"mx1.{domain}")
    getattr(net.dns, trouble)(domain)  # SERVFAIL, or no answer at all (dns_timeout is 1 s)
    qid = submit(srv, [f"bob@{domain}"])
    envelope = wait_deferred(srv, qid)
    [rcpt] = envelope["recipients"]
    assert rcpt["status"] == "pending" and rcpt["last_reply"].startswith("451 4.4.3"), rcpt
    assert not any("sender notice" in line for line in log_lines(srv, qid))  # no DSN, no warning
    net.dns.remove(domain)
    net.dns.mx(domain, [(10, mx.name)])
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert not notices(srv, qid)
    assert mx.connections == 1


# -- what the remote says, per recipient ---------------------------------------------------
def test_each_recipient_gets_its_own_fate(srv, net):
    domain, mx = remote_domain(net)
    ok, gone, later = f"ok@{domain}", f"gone@{domain}", f"later@{domain}"
    mx.rcpt_replies = {gone: "550 5.1.1 <gone> no such user here", later: "451 4.2.1 mailbox busy"}
    qid = submit(srv, [gone, later, ok])
    first = only(mx.wait_for_messages(1))
    assert first.rcpt_tos == [ok]
    envelope = wait_deferred(srv, qid)
    assert {r["address"]: r["status"] for r in envelope["recipients"]} == {
        gone: "failed", later: "pending", ok: "delivered"}
    mx.rcpt_replies = {gone: "550 5.1.1 <gone> no such user here"}  # `later` is accepted now
    second = mx.wait_for_messages(2)[1]
    assert second.rcpt_tos == [later]  # only the one still pending: `ok` is not sent again
    wait_gone(srv, qid)
    assert len(mx.transactions) == 2
    assert [line for _, line in mx.commands if line.startswith("RCPT")] == [
        f"RCPT TO:<{gone}>", f"RCPT TO:<{later}>", f"RCPT TO:<{ok}>", f"RCPT TO:<{later}>"]
    dsn = only(notices(srv, qid))  # one DSN, for `gone` only
    fields = only(dsn_fields(dsn))
    assert fields["Final-Recipient"] == f"rfc822; {gone}"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
    assert fields["Remote-MTA"] == f"dns; {mx.name}"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone> no such user here"
    assert later.encode() not in dsn and ok.encode() not in dsn


def test_5xx_at_the_final_dot_bounces_every_accepted_recipient(srv, net):
    domain, mx = remote_domain(net, final_reply="554 5.7.1 looks like spam to us")
    rcpts = [f"a@{domain}", f"b@{domain}"]
    qid = submit(srv, rcpts)
    dsn = only(wait_notices(srv, qid))
    fields = dsn_fields(dsn)
    assert [f["Final-Recipient"] for f in fields] == [f"rfc822; {r}" for r in rcpts]
    assert {f["Status"] for f in fields} == {"5.7.1"}
    assert {f["Diagnostic-Code"] for f in fields} == {"smtp; 554 5.7.1 looks like spam to us"}
    wait_gone(srv, qid)
    assert len(mx.transactions) == 1


def test_4xx_at_the_final_dot_is_retried_and_accepted_once(srv, net):
    answers = iter(["451 4.3.0 try later"])
    domain, mx = remote_domain(net, final_reply=lambda msg: next(answers, "250 2.0.0 Ok: queued"))
    qid = submit(srv, [f"bob@{domain}"])
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert [t.reply for t in mx.transactions] == ["451 4.3.0 try later", "250 2.0.0 Ok: queued"]
    assert mx.transactions[0].data == mx.transactions[1].data
    lines = log_lines(srv, qid)
    assert any("attempt=1 status=deferred (451 4.3.0 try later)" in line for line in lines), lines
    assert "attempt=2 " in sent_line(srv, qid, f"bob@{domain}")
    # one line per attempt: the envelope and the client that gave it to us
    for n in (1, 2):
        assert any(re.search(rf"from=<{re.escape(SENDER)}> size=\d+ nrcpt=1 attempt={n} "
                             r"client=\[127\.0\.0\.2\] helo=client\.test tls=- user=-", line) for line in lines), lines
    assert not notices(srv, qid)


@pytest.mark.parametrize("misbehaviour", [("hang_at", "dot"), ("hang_at", "rcpt"), ("drop_at", "body")],
                         ids=lambda m: "-".join(m))
def test_hang_or_drop_defers_without_a_bounce_and_delivers_later(srv, net, misbehaviour):
    attr, stage = misbehaviour
    domain, mx = remote_domain(net, **{attr: stage})
    qid = submit(srv, [f"bob@{domain}"])
    envelope = wait_deferred(srv, qid)  # a hang costs command_timeout / data_timeout: 2 s
    [rcpt] = envelope["recipients"]
    assert rcpt["status"] == "pending" and rcpt["last_reply"].startswith("451 4.4.2"), rcpt
    assert not any("sender notice" in line for line in log_lines(srv, qid))
    with connect(srv.port) as c:  # the server is fine meanwhile
        assert c.cmd("NOOP")[0] == 250
    setattr(mx, attr, None)
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert not notices(srv, qid)
    if stage == "dot":  # the classic duplicate: the first copy was all there, never answered
        assert [t.reply for t in mx.transactions] == [None, "250 2.0.0 Ok: queued"]
    else:
        assert len(mx.transactions) == 1


def test_a_bounce_is_never_bounced(srv, net):
    domain, mx = remote_domain(net, default_rcpt_reply="550 5.1.1 no such user")
    qid = submit(srv, [f"bob@{domain}"], sender="")
    wait_gone(srv, qid)
    lines = log_lines(srv, qid)
    assert any("status=bounced" in line for line in lines), lines
    assert any("no failed notice: the message has the null sender" in line for line in lines), lines
    assert not any("sender notice" in line for line in lines)
    assert ("MAIL FROM:<>" + f" SIZE=") in next(line for _, line in mx.commands if line.startswith("MAIL"))


# -- the DSN itself ---------------------------------------------------------------------------
def test_dsn_is_a_multipart_report_from_mailer_daemon_sent_with_the_null_sender(srv, net):
    domain, mx = remote_domain(net, default_rcpt_reply="550 5.1.1 no such user")
    original = (b"Subject: the original subject\r\nFrom: <alice@example.test>\r\nTo: <bob@" + domain.encode()
                + b">\r\nMessage-ID: <orig-1@example.test>\r\n\r\nthe secret body\r\n")
    qid = submit(srv, [f"bob@{domain}"], original)
    raw = only(wait_notices(srv, qid))
    assert raw.startswith(b"Return-Path: <>\n")  # local delivery's record of the null reverse-path
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HELO}"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                     "text/rfc822-headers"]
    assert f"Queue ID: {qid}" in parts[0].get_content()
    assert f"bob@{domain}" in parts[0].get_content()
    headers = parts[2].get_payload(decode=True) or parts[2].get_payload().encode()
    assert b"Subject: the original subject" in headers and b"Message-ID: <orig-1@example.test>" in headers
    assert f"by {HELO} (geosmtp)".encode() in headers  # our Received: belongs to the header section
    assert b"the secret body" not in raw
    assert f"Reporting-MTA: dns; {HELO}".encode() in raw


def test_dsn_to_a_remote_sender_leaves_with_mail_from_null(srv, net):
    home, home_mx = remote_domain(net)
    far, far_mx = remote_domain(net, default_rcpt_reply="550 5.1.1 no such user")
    qid = submit(srv, [f"bob@{far}"], sender=f"writer@{home}")
    dsn = only(home_mx.wait_for_messages(1))
    assert dsn.mail_from == "" and dsn.rcpt_tos == [f"writer@{home}"]
    assert f"Queue ID: {qid}".encode() in dsn.data
    assert b"report-type=delivery-status" in dsn.data and b"Status: 5.1.1" in dsn.data
    wait_gone(srv, qid)
    assert len(far_mx.transactions) == 0


# -- connections ------------------------------------------------------------------------------
def test_two_messages_share_one_connection(srv, net):
    domain, mx = remote_domain(net)
    submit(srv, [f"a@{domain}"])
    mx.wait_for_messages(1)
    qid = submit(srv, [f"b@{domain}"])
    mx.wait_for_messages(2)
    wait_gone(srv, qid)
    assert mx.connections == 1
    assert verbs(mx) == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"]  # no RSET, no second EHLO


def test_connection_is_reset_and_reused_after_a_refused_transaction(srv, net):
    domain, mx = remote_domain(net)
    mx.rcpt_replies = {f"gone@{domain}": "550 5.1.1 no such user"}
    first = submit(srv, [f"gone@{domain}"])
    wait_notices(srv, first)
    submit(srv, [f"b@{domain}"])
    only(mx.wait_for_messages(1))
    assert mx.connections == 1
    # PIPELINING: MAIL, RCPT and DATA went together; DATA was refused (554), then RSET
    assert verbs(mx) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]


def test_kept_connection_dropped_by_the_server_is_replaced_in_the_same_attempt(srv, net):
    domain, mx = remote_domain(net)
    submit(srv, [f"a@{domain}"])
    mx.wait_for_messages(1)

    def drop_kept_connection(address, connection):
        if connection == 1:
            raise _Closed  # the fake closes the connection without a word
        return "250 2.1.0 Ok"

    mx.mail_reply = drop_kept_connection
    qid = submit(srv, [f"b@{domain}"])
    msg = only(mx.wait_for_messages(2)[1:])
    assert msg.connection == 2
    wait_gone(srv, qid)
    assert "attempt=1 " in sent_line(srv, qid, f"b@{domain}")


def test_kept_connection_closed_with_421_is_replaced_in_the_same_attempt(srv, net):
    domain, mx = remote_domain(net, timeout=1.0)  # the fake says 421 and closes after 1 s of silence
    submit(srv, [f"a@{domain}"])
    mx.wait_for_messages(1)
    mx.wait_idle(timeout=5)  # it has said "421 4.4.2 Timeout, closing" on the connection we keep
    qid = submit(srv, [f"b@{domain}"])
    mx.wait_for_messages(2)
    wait_gone(srv, qid)
    deferred = [line.partition("] ")[2] for line in log_lines(srv, qid) if "status=deferred" in line]
    assert not deferred, deferred


def pending_input(mx: FakeMX, connection: int, until: bytes, wait: float) -> bytes:
    """What the client has sent on `connection` that the fake has not read yet (waits up to
    `wait` seconds for `until` to show up). Peeks at the fake's buffer and socket."""
    with mx._cond:
        conn = next(c for c in mx._open if c.number == connection)
    deadline = time.monotonic() + wait
    while True:
        data = bytes(conn.buf)
        if select.select([conn.sock], [], [], 0.05)[0]:
            data += conn.sock.recv(65536, socket.MSG_PEEK)
        if until in data or time.monotonic() > deadline:
            return data


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_pipelining_is_used_only_when_offered(srv, net, pipelining):
    extensions = [e for e in DEFAULT_EXTENSIONS if pipelining or e != "PIPELINING"]
    domain, mx = remote_domain(net, extensions=extensions)
    unread = []

    def mail_reply(address, connection):  # what else had arrived when MAIL was read
        unread.append(pending_input(mx, connection, b"DATA\r\n", 1.0 if pipelining else 0.3))
        return "250 2.1.0 Ok"

    mx.mail_reply = mail_reply
    rcpts = [f"a@{domain}", f"b@{domain}"]
    qid = submit(srv, rcpts)
    msg = only(mx.wait_for_messages(1))
    assert msg.rcpt_tos == rcpts
    assert verbs(mx) == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    if pipelining:  # RFC 2920: the RCPTs and DATA were sent without waiting for MAIL's reply
        assert unread == [f"RCPT TO:<{rcpts[0]}>\r\nRCPT TO:<{rcpts[1]}>\r\nDATA\r\n".encode()]
    else:
        assert unread == [b""]
    wait_gone(srv, qid)


def test_helo_when_the_server_refuses_ehlo(srv, net):
    domain, mx = remote_domain(net, ehlo_reply="502 5.5.1 no")
    qid = submit(srv, [f"bob@{domain}"])
    msg = only(mx.wait_for_messages(1))
    assert msg.helo == HELO
    assert verbs(mx) == ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]
    assert msg.mail_params == {}  # no ESMTP: no SIZE=
    wait_gone(srv, qid)


# -- extensions -------------------------------------------------------------------------------
def test_message_over_the_remote_size_limit_bounces_5_3_4_without_a_transaction(srv, net):
    domain, mx = remote_domain(net, extensions=["PIPELINING", "SIZE 1000", "8BITMIME"])
    body = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 50  # 5 KB
    qid = submit(srv, [f"bob@{domain}"], body)
    fields = only(dsn_fields(only(wait_notices(srv, qid))))
    assert (fields["Action"], fields["Status"]) == ("failed", "5.3.4")
    wait_gone(srv, qid)
    assert "MAIL" not in verbs(mx) and "DATA" not in verbs(mx)
    assert mx.transactions == []


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "not-offered"])
def test_smtputf8_address(srv, net, offered):
    extensions = [e for e in DEFAULT_EXTENSIONS if offered or e != "SMTPUTF8"]
    domain, mx = remote_domain(net, extensions=extensions)
    rcpt = f"jöran@{domain}"
    qid = submit(srv, [rcpt], mail_params="SMTPUTF8")
    if offered:
        msg = only(mx.wait_for_messages(1))
        assert msg.rcpt_tos == [rcpt]
        assert "SMTPUTF8" in msg.mail_params
    else:  # RFC 6531 3.2: it cannot be sent without SMTPUTF8
        dsn = only(wait_notices(srv, qid))
        fields = only(dsn_fields(dsn))
        assert (fields["Action"], fields["Status"]) == ("failed", "5.6.7")
        assert fields["Final-Recipient"] == f"utf-8; {rcpt}"
        assert "MAIL" not in verbs(mx)
    wait_gone(srv, qid)


def test_smtputf8_session_with_ascii_addresses_and_headers_needs_no_smtputf8(srv, net):
    extensions = [e for e in DEFAULT_EXTENSIONS if e != "SMTPUTF8"]
    domain, mx = remote_domain(net, extensions=extensions)
    qid = submit(srv, [f"bob@{domain}"], mail_params="SMTPUTF8")
    msg = only(mx.wait_for_messages(1))
    assert "SMTPUTF8" not in msg.mail_params
    wait_gone(srv, qid)


def test_smtputf8_is_needed_only_where_the_envelope_is_not_ascii(srv, net):
    utf8_domain, utf8_mx = remote_domain(net)
    ascii_domain, ascii_mx = remote_domain(net, extensions=[e for e in DEFAULT_EXTENSIONS if e != "SMTPUTF8"])
    # ASCII headers; the non-ASCII recipient is only in the envelope (a Bcc)
    qid = submit(srv, [f"jöran@{utf8_domain}", f"bob@{ascii_domain}"], mail_params="SMTPUTF8")
    only(utf8_mx.wait_for_messages(1))
    srv.wait_for(lambda: ascii_mx.messages or notices(srv, qid))
    assert ascii_mx.messages, [(f["Final-Recipient"], f["Status"], f["Diagnostic-Code"])
                               for dsn in notices(srv, qid) for f in dsn_fields(dsn)]
    msg = only(ascii_mx.messages)
    assert msg.rcpt_tos == [f"bob@{ascii_domain}"] and "SMTPUTF8" not in msg.mail_params


def test_8bitmime_body_is_announced_when_offered(srv, net):
    domain, mx = remote_domain(net)
    body = "Subject: café\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nVoilà, ünïcödé\r\n".encode()
    qid = submit(srv, [f"bob@{domain}"], body, mail_params="BODY=8BITMIME")
    msg = only(mx.wait_for_messages(1))
    assert msg.mail_params.get("BODY") == "8BITMIME"
    assert msg.data.endswith(body + b"\r\n")
    wait_gone(srv, qid)


# -- the bytes ----------------------------------------------------------------------------------
RECEIVED = re.compile(rb"Received: [^\r\n]*(?:\r\n\t[^\r\n]*)*\r\n")


def arrived_intact(msg, content: bytes) -> None:
    """msg.data is our Received: header, then exactly `content`."""
    assert msg.data.endswith(content), (msg.data[-200:], content[-200:])
    assert RECEIVED.fullmatch(msg.data[:len(msg.data) - len(content)]), msg.data[:300]


def send_raw(srv: ServerProcess, rcpt: str, content: bytes) -> str:
    """Send `content` (whole CRLF lines) as the message, dot-stuffed by us; its queue id."""
    assert content.endswith(b"\r\n")
    with connect(srv.port, source="127.0.0.2") as c:
        assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
        assert c.code(f"RCPT TO:<{rcpt}>") == "250 2.1.5"
        assert c.cmd("DATA")[0] == 354
        c.send(dot_stuff(content) + b".\r\n")
        return queue_id(c.reply())


def test_dots_and_line_ends_arrive_byte_for_byte(srv, net):
    domain, mx = remote_domain(net)
    cases = [
        b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\nx.\r\n .\r\n.\r\n\r\n..\r\n",  # ends with a ".." line
        b"Subject: ends with a dot line\r\n\r\nlast line is a dot\r\n.\r\n",
        b"Subject: ends with empty lines\r\n\r\nbody\r\n\r\n\r\n",
        b"Subject: only a header section\r\n",
        b"Subject: empty body\r\n\r\n",
        b".Subject-like: the very first line starts with a dot\r\n\r\n.\r\n",
    ]
    qids = [send_raw(srv, f"bob@{domain}", content) for content in cases]
    msgs = mx.wait_for_messages(len(cases))
    by_subject = {}
    for msg in msgs:
        by_subject[re.search(rb"\r\n([^\r\n]*)\r\n", msg.data[msg.data.find(b"; "):]).group(1)] = msg
    for content in cases:
        arrived_intact(by_subject[content.split(b"\r\n")[0]], content)
    for qid in qids:
        wait_gone(srv, qid)


def test_a_body_sent_without_a_final_line_end_gets_one(srv, net):
    domain, mx = remote_domain(net)
    body = b"Subject: no final CRLF\r\n\r\nlast line"
    qid = submit(srv, [f"bob@{domain}"], body)  # send_message adds CRLF . CRLF: that CRLF ends the line
    arrived_intact(only(mx.wait_for_messages(1)), body + b"\r\n")
    wait_gone(srv, qid)


def test_dot_lines_across_the_64k_read_boundary_arrive_intact(srv, net):
    """The relay reads the spooled message 64 KiB at a time; a line starting with "." right
    at a block boundary must still be stuffed. Lines of ".", 3 octets each, and three header
    lengths: in one of the three messages a line starts exactly at the boundary."""
    domain, mx = remote_domain(net)
    contents = [b"Subject: boundary\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n" + b".\r\n" * 30000 for pad in range(3)]
    qids = [send_raw(srv, f"bob@{domain}", content) for content in contents]
    msgs = mx.wait_for_messages(3)
    for content in contents:
        pad = content.split(b"\r\n")[1]
        arrived_intact(next(m for m in msgs if pad + b"\r\n\r\n" in m.data), content)
    for qid in qids:
        wait_gone(srv, qid)


# -- DKIM ---------------------------------------------------------------------------------------
def test_dkim_signature_is_made_once_and_verifies(world, srv, net):
    answers = iter(["451 4.3.0 try later"])
    domain, mx = remote_domain(net, final_reply=lambda msg: next(answers, "250 2.0.0 Ok: queued"))
    body = (b"From: Writer <writer@" + DKIM_DOMAIN.encode() + b">\r\nTo: <bob@" + domain.encode()
            + b">\r\nSubject: signed\r\nMessage-ID: <dkim-1@signed.test>\r\n\r\nsigned body\r\n")
    qid = submit(srv, [f"bob@{domain}"], body, sender=f"writer@{DKIM_DOMAIN}")
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    first, second = mx.transactions
    assert first.data == second.data  # the retry sends the same signature
    assert second.data.startswith(b"DKIM-Signature: ") and second.data.endswith(body + b"\r\n")

    def txt(name, timeout=5):
        return world.dkim_txt if name.rstrip(b".") == f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}".encode() else None

    assert dkim.verify(second.data, dnsfunc=txt)
    assert f"d={DKIM_DOMAIN}".encode() in second.data.split(b"\r\n\r\n")[0]


# -- submission ---------------------------------------------------------------------------------
def test_mail_from_an_authenticated_submission_client_is_relayed(srv, net):
    domain, mx = remote_domain(net)
    token = base64.b64encode(f"\0{SENDER}\0{PASSWORDS[SENDER]}".encode()).decode()
    with connect(srv.submission_port) as c:
        assert c.code(f"AUTH PLAIN {token}") == "235 2.7.0"
        qid = queue_id(send_message(c, SENDER, [f"friend@{domain}"],
                                    b"Subject: from submission\r\nFrom: <alice@example.test>\r\n\r\nhi\r\n"))
    msg = only(mx.wait_for_messages(1))
    assert (msg.mail_from, msg.rcpt_tos) == (SENDER, [f"friend@{domain}"])
    assert f"with ESMTPA id {qid}".encode() in msg.data
    wait_gone(srv, qid)


# -- giving up and warning: servers of their own ---------------------------------------------------
@pytest.fixture
def own_net(dns):
    remotes = Remotes(dns, pick_port([fresh_address(), fresh_address()]))
    yield remotes
    remotes.close()


def test_message_expires_after_max_lifetime(make_server, own_net):
    cfg = relay_config(own_net.dns, own_net.port)
    cfg["queue"].update(max_lifetime="3s", delay_warning="1s")
    srv = make_server(cfg)
    domain, mx = remote_domain(own_net, default_rcpt_reply="451 4.2.0 come back later")
    qid = submit(srv, [f"bob@{domain}"])
    wait_gone(srv, qid, timeout=15)
    found = wait_notices(srv, qid, 2)
    by_action = {}
    for dsn in found:
        fields = only(dsn_fields(dsn))
        by_action.setdefault(fields["Action"], []).append(fields)
    delayed, failed = only(by_action.pop("delayed")), only(by_action.pop("failed"))
    assert not by_action
    assert delayed["Status"] == "4.2.0" and "Will-Retry-Until" in delayed
    assert failed["Status"] == "5.4.7"
    assert "Delivery time expired" in failed["Diagnostic-Code"] and "451 4.2.0 come back later" in failed["Diagnostic-Code"]
    assert verbs(mx).count("RCPT") >= 3  # retried until it expired
    assert any("status=expired" in line for line in log_lines(srv, qid))


def test_delay_warning_is_sent_once_and_the_message_is_still_retried(make_server, own_net):
    cfg = relay_config(own_net.dns, own_net.port)
    cfg["queue"]["delay_warning"] = "1s"
    srv = make_server(cfg)
    accept = threading.Event()
    domain, mx = remote_domain(own_net, default_rcpt_reply=lambda address, connection: (
        "250 2.1.5 Ok" if accept.is_set() else "451 4.2.0 come back later"))
    qid = submit(srv, [f"bob@{domain}"])
    warning = only(wait_notices(srv, qid))
    fields = only(dsn_fields(warning))
    assert (fields["Action"], fields["Status"]) == ("delayed", "4.2.0")
    assert b"Subject: Delayed Mail (still being retried)" in warning
    tries = verbs(mx).count("RCPT")
    mx.wait_for(lambda: verbs(mx).count("RCPT") > tries)  # one more refused attempt after the warning
    accept.set()
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert len(notices(srv, qid)) == 1  # no second warning, and no bounce


# -- more routes ---------------------------------------------------------------------------------
def test_local_copy_is_not_delivered_again_when_the_remote_one_is_retried(srv, net):
    answers = iter(["451 4.3.0 try later"])
    domain, mx = remote_domain(net, final_reply=lambda msg: next(answers, "250 2.0.0 Ok: queued"))
    qid = submit(srv, ["bob@example.test", f"bob@{domain}"])
    only(mx.wait_for_messages(1))
    wait_gone(srv, qid)
    assert len(mx.transactions) == 2
    assert len([m for m in srv.messages("bob@example.test") if f" id {qid}".encode() in m]) == 1


def test_alias_forwarding_to_a_remote_address_and_its_bounce(srv, net):
    """fwd@example.test is an alias for someone@remote.test (tests/support/server.py)."""
    mx = net.fake("mx1.remote.test", default_rcpt_reply="550 5.1.1 someone left")
    net.dns.mx("remote.test", [(10, mx.name)])
    with connect(srv.port) as c:  # an ordinary Internet client: mail for a local address
        qid = queue_id(send_message(c, SENDER, ["fwd@example.test"], b"Subject: fwd\r\n\r\nforward me"))
    fields = only(dsn_fields(only(wait_notices(srv, qid))))
    assert fields["Original-Recipient"] == "rfc822; fwd@example.test"
    assert fields["Final-Recipient"] == "rfc822; someone@remote.test"
    assert fields["Status"] == "5.1.1"
    mail = only([line for _, line in mx.commands if line.startswith("MAIL")])
    assert mail.startswith(f"MAIL FROM:<{SENDER}> ")  # forwarded with the original reverse-path
    wait_gone(srv, qid)


def test_international_domain_name_is_looked_up_as_a_label(srv, net):
    suffix = net.domain()
    unicode_form, ascii_form = f"bücher.{suffix}", f"xn--bcher-kva.{suffix}"  # the DNS knows the IDNA form
    mx = net.fake(f"mx1.{ascii_form}")
    net.dns.mx(ascii_form, [(10, mx.name)])
    rcpt = f"bob@{unicode_form}"
    qid = submit(srv, [rcpt], mail_params="SMTPUTF8")
    msg = only(mx.wait_for_messages(1))
    assert msg.rcpt_tos == [rcpt] and "SMTPUTF8" in msg.mail_params
    wait_gone(srv, qid)


# -- mail loops ------------------------------------------------------------------------------------
def test_mx_pointing_back_at_us_is_a_bounce_not_a_loop(tmp_path, dns, own_net):
    # the shipped conf trusts 127.0.0.0/8; this server also listens where its MX name points
    srv = ServerProcess(tmp_path / "loop", {**relay_config(dns, own_net.port), "relay": {
        **relay_config(dns, own_net.port)["relay"], "trusted_networks": ["127.0.0.0/8"]}})
    me = fresh_address()
    srv.config["listener"].append({"name": "mx", "address": f"{me}:{own_net.port}", "mode": "smtp"})
    srv.config_path.write_text(toml.dumps(srv.config))
    domain = own_net.domain()
    dns.mx(domain, [(10, HELO)])  # mx.example.test: our own server.hostname
    dns.a(HELO, me)
    srv.start()
    try:
        qid = submit(srv, [f"bob@{domain}"])

        def copies():
            return len(re.findall(rf"queued \w+ from=<{SENDER}> to=<bob@{domain}>", srv.log()))

        srv.wait_for(lambda: notices(srv, qid) or copies() > 3)
        assert copies() == 1, f"{copies()} copies so far: the message loops"
        assert only(dsn_fields(only(notices(srv, qid))))["Status"].startswith("5.")
    finally:
        srv.stop()


def test_message_with_too_many_received_fields_is_not_relayed(srv, net):
    domain, mx = remote_domain(net)
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i + 1)
                    for i in range(150))
    with connect(srv.port, source="127.0.0.2") as c:
        reply = send_message(c, SENDER, [f"bob@{domain}"], hops + b"Subject: looping\r\n\r\nround and round")
    if reply[0] == 250:  # accepted: then it must bounce rather than go on
        qid = queue_id(reply)
        srv.wait_for(lambda: mx.messages or notices(srv, qid))
    assert not mx.messages, "relayed with 151 Received: fields"
