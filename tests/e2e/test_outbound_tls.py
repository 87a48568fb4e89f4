"""End to end: STARTTLS on the way out (RFC 3207) by policy: "opportunistic" (RFC 7435: TLS
when offered, any certificate, plaintext if the handshake fails), "required" (TLS or nothing,
any certificate) and "verify" (the certificate must name the MX host and chain to ca_file);
globally or per destination domain. Then the smarthost, with AUTH PLAIN only ever over TLS.

Certificates come from trustme: `ca` is the CA the server is told to trust ([relay] ca_file).
"""
from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass

import pytest
import trustme

from tests.support.certs import ServerCert
from tests.support.e2e import (  # noqa: F401 (srv, net: fixtures)
    net, srv,
    HOSTNAME, Remotes, dsn_fields, fresh_address, log_lines, notices, only, relay_config, remote_domain,
    sent_line, submit, verbs, wait_deferred, wait_gone, wait_notices,
)
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import FakeMX, pick_port
from tests.support.server import ServerProcess

POLICY = {  # [relay] tls_policy of the shared server; its default stays "opportunistic"
    "remote.test": "verify",
    "tls-verify.test": "verify",
    "tls-wrongname.test": "verify",
    "tls-untrusted.test": "verify",
    "tls-required.test": "required",
}


def cert_for(ca: trustme.CA, *names: str) -> ServerCert:
    return ServerCert(ca=ca, common_name=names[0], identities=names)


@dataclass
class World:
    dns: FakeDNS
    port: int
    server: ServerProcess


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, ca_file):
    with FakeDNS() as dns:
        port = pick_port([fresh_address(), fresh_address()])
        srv = ServerProcess(tmp_path_factory.mktemp("outbound-tls"),
                            relay_config(dns, port, ca_file=str(ca_file), tls_policy=POLICY)).start()
        try:
            yield World(dns, port, srv)
        finally:
            srv.stop()



@pytest.fixture
def dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def own_net(dns):
    """Fakes for a test that starts its own server (make_server) on their port."""
    remotes = Remotes(dns, pick_port([fresh_address(), fresh_address()]))
    yield remotes
    remotes.close()


def mx_for(net: Remotes, domain: str, **behaviour) -> FakeMX:
    mx = net.fake(f"mx1.{domain}", **behaviour)
    net.dns.mx(domain, [(10, mx.name)])
    return mx


def assert_kept_back(srv: ServerProcess, qid: str, mx: FakeMX, reply_start: str) -> dict:
    """The message waits in deferred/ (two attempts made), was never offered to `mx`, and
    nobody was told anything yet."""
    envelope = wait_deferred(srv, qid, attempts=2)
    [rcpt] = envelope["recipients"]
    assert rcpt["status"] == "pending" and rcpt["last_reply"].startswith(reply_start), rcpt
    assert "MAIL" not in verbs(mx) and mx.transactions == []
    assert not any("sender notice" in line for line in log_lines(srv, qid))
    return rcpt


# -- opportunistic ----------------------------------------------------------------------------
@pytest.mark.parametrize("certificate", ["trusted", "self-made, other name"])
def test_opportunistic_tls_is_used_when_offered_whatever_the_certificate(srv, net, ca, certificate):
    domain = net.domain()
    name = f"mx1.{domain}"
    cert = cert_for(ca, name) if certificate == "trusted" else cert_for(trustme.CA(), "someone.else.test")
    mx = mx_for(net, domain, cert=cert)
    qid = submit(srv, [f"bob@{domain}"])
    msg = only(mx.wait_for_messages(1))
    assert msg.tls and msg.tls.startswith("TLSv1."), msg.tls
    assert verbs(mx) == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"]  # EHLO again after TLS
    assert msg.helo == HOSTNAME
    wait_gone(srv, qid)
    assert re.search(r" tls=TLSv1\.[23]/unverified ", sent_line(srv, qid, f"bob@{domain}"))  # nothing checked


def test_failed_handshake_falls_back_to_plaintext_on_a_new_connection(srv, net, ca):
    domain = net.domain()
    mx = mx_for(net, domain, cert=cert_for(ca, f"mx1.{domain}"), tls_maximum=ssl.TLSVersion.TLSv1_1)
    qid = submit(srv, [f"bob@{domain}"])
    msg = only(mx.wait_for_messages(1))
    assert msg.tls is None
    mx.wait_for(lambda: mx.tls_failures)  # recorded by the fake's thread for connection 1
    assert len(mx.tls_failures) == 1 and mx.connections == 2
    assert verbs(mx, 1) == ["EHLO", "STARTTLS"]
    assert verbs(mx, 2) == ["EHLO", "MAIL", "RCPT", "DATA"]  # no second try at STARTTLS
    wait_gone(srv, qid)
    assert "attempt=1 " in sent_line(srv, qid, f"bob@{domain}")
    assert " tls=none " in sent_line(srv, qid, f"bob@{domain}")


# -- required -----------------------------------------------------------------------------------
def test_required_tls_defers_when_the_mx_offers_no_starttls(make_server, own_net):
    srv = make_server(relay_config(own_net.dns, own_net.port, tls="required"))
    domain, mx = remote_domain(own_net)  # no certificate: no STARTTLS
    qid = submit(srv, [f"bob@{domain}"])
    rcpt = assert_kept_back(srv, qid, mx, "451 4.7.5")
    assert "does not offer STARTTLS" in rcpt["last_reply"]
    assert mx.connections >= 2 and not mx.messages


def test_required_tls_takes_any_certificate(srv, net):
    mx = mx_for(net, "tls-required.test", cert=cert_for(trustme.CA(), "someone.else.test"))
    qid = submit(srv, ["bob@tls-required.test"])
    msg = only(mx.wait_for_messages(1))
    assert msg.tls
    wait_gone(srv, qid)


# -- verify -------------------------------------------------------------------------------------
def test_verify_delivers_to_an_mx_with_a_certificate_for_its_name(srv, net, ca):
    mx = mx_for(net, "tls-verify.test", cert=cert_for(ca, "mx1.tls-verify.test"))  # not for the domain
    qid = submit(srv, ["bob@tls-verify.test"])
    msg = only(mx.wait_for_messages(1))
    assert msg.tls
    wait_gone(srv, qid)
    assert f" tls={msg.tls}/verified " in sent_line(srv, qid, "bob@tls-verify.test")


@pytest.mark.parametrize("domain, problem", [("tls-wrongname.test", "name"), ("tls-untrusted.test", "issuer")])
def test_verify_defers_on_a_bad_certificate_and_sends_nothing(srv, net, ca, domain, problem):
    if problem == "name":
        cert = cert_for(ca, "mx1.elsewhere.test")
    else:
        cert = cert_for(trustme.CA(), f"mx1.{domain}")
    mx = mx_for(net, domain, cert=cert)
    qid = submit(srv, [f"bob@{domain}"])
    rcpt = assert_kept_back(srv, qid, mx, "451 4.7.5")
    assert "TLS handshake" in rcpt["last_reply"] and "failed" in rcpt["last_reply"]
    assert verbs(mx, 1) == ["EHLO", "STARTTLS"]  # and no plaintext retry on a new connection
    assert all(v in ("EHLO", "STARTTLS") for v in verbs(mx))
    assert not mx.messages


def test_per_domain_verify_overrides_the_opportunistic_default(srv, net):
    untrusted = cert_for(trustme.CA(), "mx1.remote.test")
    strict = mx_for(net, "remote.test", cert=untrusted)  # tls_policy: remote.test = "verify"
    relaxed_domain = net.domain()  # no tls_policy entry: opportunistic
    relaxed = mx_for(net, relaxed_domain, cert=untrusted)
    strict_qid = submit(srv, ["bob@remote.test"])
    relaxed_qid = submit(srv, [f"bob@{relaxed_domain}"])
    assert only(relaxed.wait_for_messages(1)).tls
    wait_gone(srv, relaxed_qid)
    assert_kept_back(srv, strict_qid, strict, "451 4.7.5")


def test_global_verify_policy_with_ca_file(make_server, own_net, ca, ca_file):
    srv = make_server(relay_config(own_net.dns, own_net.port, tls="verify", ca_file=str(ca_file)))
    good_domain, bad_domain = own_net.domain(), own_net.domain()
    good = mx_for(own_net, good_domain, cert=cert_for(ca, f"mx1.{good_domain}"))
    bad = mx_for(own_net, bad_domain, cert=cert_for(ca, f"mx1.{good_domain}"))  # the other one's name
    good_qid = submit(srv, [f"bob@{good_domain}"])
    bad_qid = submit(srv, [f"bob@{bad_domain}"])
    assert only(good.wait_for_messages(1)).tls
    wait_gone(srv, good_qid)
    assert_kept_back(srv, bad_qid, bad, "451 4.7.5")


# -- smarthost ----------------------------------------------------------------------------------
SMART_USER, SMART_PASSWORD = "relayuser", "Sm4rtHost-pw-never-logged"


def smarthost_config(own_net: Remotes, tmp_path, smarthost: str, auth: bool = True, **relay) -> dict:
    if auth:
        pw = tmp_path / "smarthost.pw"
        pw.write_text(SMART_PASSWORD + "\n")
        pw.chmod(0o600)
        relay.update(smarthost_user=SMART_USER, smarthost_password_file=str(pw))
    return relay_config(own_net.dns, own_net.port, smarthost=smarthost, **relay)


def secrets_in(text: str) -> list[str]:
    token = base64.b64encode(f"\0{SMART_USER}\0{SMART_PASSWORD}".encode()).decode()
    return [s for s in (SMART_PASSWORD, token) if s in text]


def test_smarthost_takes_mail_for_every_remote_domain_without_dns(make_server, own_net, tmp_path):
    # the smarthost listens on [relay] port, see the next test for why
    smart = own_net.fake("smarthost.invalid", a=False)
    srv = make_server(smarthost_config(own_net, tmp_path, f"{smart.host}:{own_net.port}", auth=False))
    own_net.dns.reset_queries()
    rcpts = [f"bob@{own_net.domain()}", f"carl@{own_net.domain()}"]  # neither is in the DNS
    qid = submit(srv, rcpts)
    msg = only(smart.wait_for_messages(1))  # one transaction for both domains
    assert msg.rcpt_tos == rcpts
    wait_gone(srv, qid)
    assert own_net.dns.queries == []
    assert not notices(srv, qid)


def test_smarthost_port_is_used(make_server, own_net, tmp_path):
    address = fresh_address()
    smart = FakeMX(address, pick_port([address]), name="smarthost.invalid").start()
    decoy = FakeMX(address, own_net.port, name="decoy.invalid").start()  # [relay] port, same address
    own_net.fakes += [smart, decoy]
    srv = make_server(smarthost_config(own_net, tmp_path, f"{address}:{smart.port}", auth=False))
    submit(srv, [f"bob@{own_net.domain()}"])
    srv.wait_for(lambda: smart.messages or decoy.messages)
    assert smart.messages and not decoy.messages, f"went to the decoy on port {decoy.port}"


def test_smarthost_auth_plain_after_starttls(make_server, own_net, tmp_path, ca):
    smart = own_net.fake("smarthost.invalid", a=False, cert=cert_for(ca, "smarthost.invalid"),
                         auth={SMART_USER: SMART_PASSWORD}, require_auth=True)
    srv = make_server(smarthost_config(own_net, tmp_path, f"{smart.host}:{own_net.port}"))
    qid = submit(srv, [f"bob@{own_net.domain()}"])
    msg = only(smart.wait_for_messages(1))
    assert msg.auth_user == SMART_USER and msg.tls
    assert verbs(smart) == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA"]
    wait_gone(srv, qid)
    assert secrets_in(srv.log()) == []


def test_smarthost_without_starttls_never_gets_the_password(make_server, own_net, tmp_path):
    # AUTH is offered in plaintext: the temptation is there
    smart = own_net.fake("smarthost.invalid", a=False, auth={SMART_USER: SMART_PASSWORD},
                         require_tls_for_auth=False)
    srv = make_server(smarthost_config(own_net, tmp_path, f"{smart.host}:{own_net.port}"))
    qid = submit(srv, [f"bob@{own_net.domain()}"])
    rcpt = assert_kept_back(srv, qid, smart, "451 4.7.5")
    assert "without TLS" in rcpt["last_reply"]
    assert "AUTH" not in verbs(smart)
    assert secrets_in(srv.log()) == []


def test_smarthost_refusing_the_login_defers_and_a_fixed_login_delivers(make_server, own_net, tmp_path, ca):
    smart = own_net.fake("smarthost.invalid", a=False, cert=cert_for(ca, "smarthost.invalid"),
                         auth={SMART_USER: "something else"}, require_auth=True)
    srv = make_server(smarthost_config(own_net, tmp_path, f"{smart.host}:{own_net.port}"))
    qid = submit(srv, [f"bob@{own_net.domain()}"])
    rcpt = assert_kept_back(srv, qid, smart, "451 4.7.0")  # the operator's problem: never a bounce
    assert "authentication" in rcpt["last_reply"] and "535" in rcpt["last_reply"]
    smart.auth = {SMART_USER: SMART_PASSWORD}
    assert only(smart.wait_for_messages(1)).auth_user == SMART_USER
    wait_gone(srv, qid)
    assert not notices(srv, qid)
    assert secrets_in(srv.log()) == []


def test_smarthost_gets_every_domain_in_one_transaction_after_one_login(make_server, own_net, tmp_path, ca):
    smart = own_net.fake("smarthost.invalid", a=False, cert=cert_for(ca, "smarthost.invalid"),
                         auth={SMART_USER: SMART_PASSWORD}, require_auth=True)
    srv = make_server(smarthost_config(own_net, tmp_path, f"{smart.host}:{own_net.port}"))
    ok1, refused, ok2 = (f"{user}@{own_net.domain()}" for user in ("ann", "gone", "carl"))
    smart.rcpt_replies = {refused: "550 5.1.1 <gone> unknown here"}
    qid = submit(srv, [ok1, refused, ok2])
    msg = only(smart.wait_for_messages(1))
    assert (msg.rcpt_tos, msg.auth_user) == ([ok1, ok2], SMART_USER)
    assert smart.connections == 1
    assert verbs(smart) == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
    fields = only(dsn_fields(only(wait_notices(srv, qid))))  # the refused one, and only it
    assert (fields["Final-Recipient"], fields["Status"]) == (f"rfc822; {refused}", "5.1.1")
    assert fields["Remote-MTA"] == f"dns; {smart.host}"  # [relay] smarthost names it by its address
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone> unknown here"
    wait_gone(srv, qid)
    for rcpt in (ok1, ok2):
        assert f"relay={smart.host}[{smart.host}] tls={msg.tls}/unverified " in sent_line(srv, qid, rcpt)
    assert secrets_in(srv.log()) == []
