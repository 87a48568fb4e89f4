"""Self-tests for the fake internet used by outbound-relay tests: FakeDNS and FakeMX.

DNS is checked with dnspython pointed at the fake only (Resolver(configure=False), never
/etc/resolv.conf); SMTP with smtplib and with a raw socket where the bytes matter.
"""
from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.certs import ServerCert, client_context
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import FakeMX, pick_port
from tests.support.smtp import RawClient

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 15  # > 512 bytes


# -- FakeDNS ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_dns():
    with FakeDNS() as d:
        d.mx("remote.test", [(10, "mx1.remote.test"), (20, "MX2.Remote.Test.")])
        d.a("mx1.remote.test", "127.0.0.10")
        d.a("mx2.remote.test", "127.0.0.11", "127.0.0.12")
        d.aaaa("mx1.remote.test", "::1")
        d.txt("remote.test", "v=spf1 -all")
        d.txt("sel._domainkey.remote.test", DKIM_KEY)
        d.cname("alias.remote.test", "mx1.remote.test")
        d.null_mx("nomail.test")
        d.servfail("broken.test")
        d.hang("slow.test")
        yield d


@pytest.fixture
def dns_(fake_dns):
    fake_dns.reset_queries()
    return fake_dns


def resolver(d: FakeDNS, cache: bool = False) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = d.port
    r.lifetime = 2.0
    r.timeout = 2.0
    if cache:
        r.cache = dns.resolver.Cache()
    return r


def query(d: FakeDNS, name: str, rdtype: str, tcp: bool, timeout: float = 2.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, "127.0.0.1", port=d.port, timeout=timeout)


def test_address_is_config_form(dns_):
    assert dns_.address == f"127.0.0.1:{dns_.port}"


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_positive_answers(dns_, tcp):
    r = resolver(dns_)
    mx = r.resolve("remote.test", "MX", tcp=tcp)
    assert sorted((x.preference, x.exchange.to_text()) for x in mx) == [
        (10, "mx1.remote.test."), (20, "MX2.Remote.Test.")]
    assert mx.rrset.ttl == 60
    assert sorted(x.address for x in r.resolve("MX2.remote.TEST.", "A", tcp=tcp)) == ["127.0.0.11", "127.0.0.12"]
    assert [x.address for x in r.resolve("mx1.remote.test", "AAAA", tcp=tcp)] == ["::1"]
    assert [x.strings for x in r.resolve("remote.test", "TXT", tcp=tcp)] == [(b"v=spf1 -all",)]
    alias = r.resolve("alias.remote.test", "A", tcp=tcp)
    assert [x.address for x in alias] == ["127.0.0.10"]
    assert alias.canonical_name.to_text() == "mx1.remote.test."
    null = list(r.resolve("nomail.test", "MX", tcp=tcp))
    assert [(x.preference, x.exchange.to_text()) for x in null] == [(0, ".")]
    assert ("mx2.remote.test", "A") in dns_.queries  # recorded lowercase, without the dot


def test_long_txt_is_split_and_udp_truncated(dns_):
    reply = query(dns_, "sel._domainkey.remote.test", "TXT", tcp=False)
    assert reply.flags & dns.flags.TC and not reply.answer
    answer = resolver(dns_).resolve("sel._domainkey.remote.test", "TXT")  # retries over TCP
    [rdata] = list(answer)
    assert [len(s) for s in rdata.strings][:-1] == [255] * (len(rdata.strings) - 1)
    assert b"".join(rdata.strings).decode() == DKIM_KEY
    assert dns_.queries.count(("sel._domainkey.remote.test", "TXT")) == 3  # UDP, UDP, TCP
    big = dns.message.make_query("sel._domainkey.remote.test", "TXT", use_edns=0, payload=4096)
    reply = dns.query.udp(big, "127.0.0.1", port=dns_.port, timeout=2)
    assert not reply.flags & dns.flags.TC and reply.answer and reply.edns == 0  # fits EDNS size


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_negative_answers_carry_soa(dns_, tcp):
    nx = query(dns_, "nowhere.test", "MX", tcp)
    assert nx.rcode() == dns.rcode.NXDOMAIN
    [soa] = nx.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == dns_.negative_ttl
    assert soa[0].minimum == dns_.negative_ttl
    assert nx.question[0].name.is_subdomain(soa.name)
    nodata = query(dns_, "mx1.remote.test", "MX", tcp)
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    ent = query(dns_, "_domainkey.remote.test", "TXT", tcp)  # exists only as a parent
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
    assert query(dns_, "broken.test", "A", tcp).rcode() == dns.rcode.SERVFAIL
    assert query(dns_, "broken.test", "MX", tcp).rcode() == dns.rcode.SERVFAIL


def test_resolver_errors(dns_):
    r = resolver(dns_)
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nowhere.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("mx1.remote.test", "MX")
    with pytest.raises(dns.resolver.NoNameservers):
        r.resolve("broken.test", "MX")


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_hang_never_answers(dns_, tcp):
    start = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        query(dns_, "Slow.Test.", "MX", tcp, timeout=0.3)
    assert time.monotonic() - start < 2
    assert ("slow.test", "MX") in dns_.queries


def test_caching_is_visible_in_queries(dns_):
    r = resolver(dns_, cache=True)
    for _ in range(3):
        r.resolve("remote.test", "MX")
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("nowhere.test", "MX")
    assert dns_.queries == [("remote.test", "MX"), ("nowhere.test", "MX")]
    dns_.reset_queries()
    assert dns_.queries == []


def test_remove_and_clear():
    with FakeDNS() as d:
        r = resolver(d)
        d.a("Host.Test.", "127.0.0.5")
        d.servfail("gone.test")
        assert [x.address for x in r.resolve("host.test", "A")] == ["127.0.0.5"]
        d.a("host.test", "127.0.0.6")  # replaces
        assert [x.address for x in r.resolve("host.test", "A")] == ["127.0.0.6"]
        d.a("host.test")  # no addresses: the name is gone again
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("host.test", "A")
        d.a("host.test", "127.0.0.7")
        d.remove("HOST.test")
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("host.test", "A")
        d.clear()
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("gone.test", "A")


# -- FakeMX -----------------------------------------------------------------------------------
@pytest.fixture
def mx():
    with FakeMX() as m:
        yield m


def smtp(m: FakeMX) -> smtplib.SMTP:
    return smtplib.SMTP(m.host, m.port, local_hostname="client.test", timeout=5)


def test_accepts_a_message_from_smtplib(mx):
    with smtp(mx) as c:
        refused = c.sendmail("Sender@Client.Test", ["a@remote.test", "b@remote.test"],
                             b"Subject: hi\r\n\r\n.starts with a dot\r\nend\r\n",
                             mail_options=["BODY=8BITMIME", "SMTPUTF8"])
    assert refused == {}
    [msg] = mx.wait_for_messages(1)
    assert msg.mail_from == "Sender@Client.Test"
    assert msg.rcpt_tos == ["a@remote.test", "b@remote.test"]
    assert msg.data == b"Subject: hi\r\n\r\n.starts with a dot\r\nend\r\n"
    assert msg.tls is None and msg.auth_user is None
    assert msg.helo == "client.test" and msg.connection == 1
    assert msg.peer[0] == "127.0.0.1"
    assert msg.mail_params == {"SIZE": str(len(msg.data)), "BODY": "8BITMIME", "SMTPUTF8": None}
    assert msg.reply == "250 2.0.0 Ok: queued"
    assert mx.connections == 1
    assert [line.split(" ")[0].upper() for _, line in mx.commands] == [
        "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def test_starttls_and_auth():
    cert = ServerCert(common_name="mx1.remote.test", identities=("mx1.remote.test", "127.0.0.10"))
    with FakeMX(cert=cert) as m:
        m.auth = {"relay-user": "s3cret"}
        with smtp(m) as c:
            c.ehlo()
            assert c.has_extn("starttls") and not c.has_extn("auth")  # AUTH only under TLS
            c.starttls(context=client_context(cert.ca))
            c.ehlo()
            assert not c.has_extn("starttls") and c.has_extn("auth")
            c.login("relay-user", "s3cret")
            c.sendmail("a@client.test", ["x@remote.test"], b"Subject: t\r\n\r\nbody\r\n")
        [msg] = m.wait_for_messages(1)
        assert msg.tls in ("TLSv1.2", "TLSv1.3")
        assert msg.auth_user == "relay-user"
        assert msg.helo == "client.test"
        verbs = [line.split(" ")[0].upper() for _, line in m.commands]
        assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]


def test_starttls_discards_pipelined_plaintext():
    cert = ServerCert(identities=("127.0.0.10",))
    with FakeMX(cert=cert) as m, RawClient(m.port, host=m.host, timeout=5) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        c.send("STARTTLS\r\nNOOP\r\n")  # the NOOP must not be executed (RFC 3207 section 5)
        assert c.reply()[0] == 220
        c.sock = client_context(cert.ca).wrap_socket(c.sock, server_hostname="127.0.0.10")
        assert c.cmd("MAIL FROM:<a@b.test>")[0] == 503  # EHLO state forgotten
        assert c.cmd("EHLO again.test")[0] == 250
        assert c.code("QUIT") == "221 2.0.0"
        assert [line for _, line in m.commands] == [
            "EHLO client.test", "STARTTLS", "MAIL FROM:<a@b.test>", "EHLO again.test", "QUIT"]


def test_auth_plain_continuation_and_failures(mx):
    mx.auth = {"u": "p"}
    mx.require_tls_for_auth = False
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        c.reply()
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.test")[1]
        assert c.code("AUTH PLAIN " + base64.b64encode(b"\0u\0wrong").decode()) == "535 5.7.8"
        assert c.cmd("AUTH PLAIN") == (334, [""])
        assert c.code("*") == "501 5.0.0"
        assert c.cmd("AUTH PLAIN")[0] == 334
        assert c.code(base64.b64encode(b"\0u\0p").decode()) == "235 2.7.0"
        assert c.code("AUTH PLAIN") == "503 5.5.1"
    mx.require_tls_for_auth = True
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        c.reply()
        assert "AUTH PLAIN LOGIN" not in c.cmd("EHLO client.test")[1]
        assert c.code("AUTH PLAIN AHUAcA==") == "538 5.7.11"


def test_per_recipient_replies(mx):
    mx.rcpt_replies = {"full@remote.test": "452 4.2.2 Mailbox full",
                       "gone@remote.test": "550 5.1.1 No such user"}
    mx.default_rcpt_reply = lambda address, conn: "250 2.1.5 Ok" if conn == 1 else "451 4.3.0 later"
    with smtp(mx) as c:
        refused = c.sendmail("a@client.test", ["Full@Remote.test", "ok@remote.test", "gone@remote.test"],
                             b"Subject: r\r\n\r\nx\r\n")
    assert refused == {"Full@Remote.test": (452, b"4.2.2 Mailbox full"),
                       "gone@remote.test": (550, b"5.1.1 No such user")}
    assert mx.wait_for_messages(1)[0].rcpt_tos == ["ok@remote.test"]
    with smtp(mx) as c, pytest.raises(smtplib.SMTPRecipientsRefused):
        c.sendmail("a@client.test", ["ok@remote.test"], b"x\r\n")  # second connection: 451


def test_final_reply_callable_and_transactions(mx):
    mx.final_reply = lambda msg: "451 4.3.0 try later" if msg.connection == 1 else "250 2.0.0 Ok: queued"
    for expect_ok in (False, True):
        with smtp(mx) as c:
            if expect_ok:
                c.sendmail("a@client.test", ["x@remote.test"], b"x\r\n")
            else:
                with pytest.raises(smtplib.SMTPDataError):
                    c.sendmail("a@client.test", ["x@remote.test"], b"x\r\n")
    assert [m.reply for m in mx.transactions] == ["451 4.3.0 try later", "250 2.0.0 Ok: queued"]
    assert [m.connection for m in mx.wait_for_messages(1)] == [2]
    mx.reset()
    assert (mx.messages, mx.transactions, mx.commands, mx.connections) == ([], [], [], 0)


def test_pipelining_and_connection_reuse(mx):
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        c.reply()
        c.send("EHLO client.test\r\nMAIL FROM:<> SIZE=20\r\nRCPT TO:<a@remote.test>\r\n"
               "RCPT TO:<b@remote.test> NOTIFY=NEVER\r\nDATA\r\n")
        code, lines = c.reply()
        assert code == 250 and "PIPELINING" in lines
        assert [c.reply()[0] for _ in range(4)] == [250, 250, 555, 354]  # DSN was not offered
        c.send(b"line 1\r\n..dot-stuffed\r\n.\r\nMAIL FROM:<c@client.test>\r\nRCPT TO:<d@remote.test>\r\n"
               b"RSET\r\nMAIL FROM:<e@client.test>\r\nRCPT TO:<f@remote.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(7)] == [250, 250, 250, 250, 250, 250, 354]
        c.send(b".\r\nNOOP\r\nQUIT\r\n")  # an empty message
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 221]
        assert c.closed(2)
    first, second = mx.wait_for_messages(2)
    assert (first.mail_from, first.rcpt_tos, first.data) == ("", ["a@remote.test"], b"line 1\r\n.dot-stuffed\r\n")
    assert first.mail_params == {"SIZE": "20"}
    assert (second.mail_from, second.rcpt_tos, second.data) == ("e@client.test", ["f@remote.test"], b"")
    assert first.connection == second.connection == 1
    assert [line for _, line in mx.commands][-6:] == [
        "RSET", "MAIL FROM:<e@client.test>", "RCPT TO:<f@remote.test>", "DATA", "NOOP", "QUIT"]


def test_helo_fallback_and_param_checks(mx):
    mx.ehlo_reply = "502 5.5.1 no EHLO"
    with smtp(mx) as c:
        c.sendmail("a@client.test", ["x@remote.test"], b"x\r\n")
    [msg] = mx.wait_for_messages(1)
    assert msg.helo == "client.test" and msg.mail_params == {}
    assert [line.split(" ")[0].upper() for _, line in mx.commands][:2] == ["EHLO", "HELO"]
    mx.ehlo_reply = None
    mx.extensions = ["SIZE 100", "8BITMIME"]
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.code("MAIL FROM:<a@client.test> SMTPUTF8") == "555 5.5.4"
        assert c.code("MAIL FROM:<a@client.test> SIZE=101") == "552 5.3.4"
        assert c.code("MAIL FROM:<a@client.test> BODY=BINARYMIME") == "555 5.5.4"
        assert c.code("RCPT TO:<x@remote.test>") == "503 5.5.1"
        assert c.code("MAIL FROM:<a@client.test> SIZE=100 BODY=8BITMIME") == "250 2.1.0"
        assert c.code("DATA") == "554 5.5.1"  # no recipients yet
        assert c.code("VRFY x") == "500 5.5.2"


def _session_until(c: RawClient, stage: str) -> None:
    """Drive a raw client through a transaction up to (and including) the step for `stage`."""
    steps = [("greeting", None), ("ehlo", "EHLO client.test\r\n"), ("mail", "MAIL FROM:<a@client.test>\r\n"),
             ("rcpt", "RCPT TO:<x@remote.test>\r\n"), ("data", "DATA\r\n"),
             ("body", "Subject: partial\r\n\r\nsome body\r\n"), ("dot", ".\r\n")]
    for name, line in steps:
        if line is not None:
            c.send(line)
        if name == stage:
            return
        if name != "body":
            c.reply()


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "body", "dot"])
def test_drop_at(mx, stage):
    mx.drop_at = stage
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        _session_until(c, stage)
        with pytest.raises((ConnectionError, OSError)):
            c.reply()
    mx.wait_idle()
    assert mx.messages == []
    assert [m.reply for m in mx.transactions] == ([None] if stage == "dot" else [])


@pytest.mark.parametrize("stage", ["greeting", "rcpt", "dot"])
def test_hang_at_until_stop(stage):
    m = FakeMX().start()
    try:
        m.hang_at = stage
        with RawClient(m.port, host=m.host, timeout=0.3) as c:
            _session_until(c, stage)
            with pytest.raises(socket.timeout):
                c.reply()
            start = time.monotonic()
            m.stop()
            assert time.monotonic() - start < 2
            assert c.closed(2)
    finally:
        m.stop()


def test_idle_client_times_out(mx):
    mx.timeout = 0.2
    with RawClient(mx.port, host=mx.host, timeout=5) as c:
        assert c.reply()[0] == 220
        assert c.code("NOOP") == "250 2.0.0"
        assert c.reply()[0] == 421
        assert c.closed(2)


def test_two_fakes_share_one_port():
    hosts = ["127.0.0.10", "127.0.0.11"]
    port = pick_port(hosts)
    with FakeMX(hosts[0], port) as mx1, FakeMX(hosts[1], port, name="mx2.remote.test") as mx2:
        assert mx1.port == mx2.port == port
        for m in (mx1, mx2):
            with smtp(m) as c:
                assert m.name in c.ehlo()[1].decode()
                c.sendmail("a@client.test", [f"to@{m.host}"], b"x\r\n")
        assert [msg.rcpt_tos for msg in mx1.wait_for_messages(1)] == [["to@127.0.0.10"]]
        assert [msg.rcpt_tos for msg in mx2.wait_for_messages(1)] == [["to@127.0.0.11"]]
        assert mx1.connections == mx2.connections == 1


def test_wait_for_messages_is_bounded(mx):
    start = time.monotonic()
    with pytest.raises(AssertionError):
        mx.wait_for_messages(1, timeout=0.2)
    assert time.monotonic() - start < 1


def test_tls_failure_is_recorded():
    cert = ServerCert(identities=("127.0.0.10",))
    with FakeMX(cert=cert) as m, RawClient(m.port, host=m.host, timeout=5) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("STARTTLS")[0] == 220
        with pytest.raises(ssl.SSLError):  # a client that does not trust our CA gives up
            client_context().wrap_socket(c.sock, server_hostname="127.0.0.10")
        m.wait_for(lambda: m.tls_failures)
        assert m.tls_failures[0][0] == 1
