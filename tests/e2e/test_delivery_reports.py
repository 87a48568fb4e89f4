"""End to end: what the delivery log and the DSNs say about a relayed message.

A failure decided after a host answered names that host: relay=name[ip] on the status line,
Remote-MTA and Diagnostic-Code (RFC 3464 2.3.5, 2.3.6) in the DSN. A failure decided here,
with no host talked to, has relay=none and neither field. The header copy in a DSN is the
header section that was sent, our DKIM-Signature first.

One server for the module, with a delay warning after one second, so a deferred recipient
gets its "delayed" DSN on its second attempt, and a DKIM key for signed.test.
"""
from __future__ import annotations

import email
import email.policy

import pytest
import trustme

from tests.e2e.test_outbound import World, dkim_key
from tests.support.e2e import (  # noqa: F401 (srv, net: fixtures)
    net, srv,
    dsn_fields, fresh_address, log_lines, notices, only, relay_config, remote_domain, submit, wait_gone,
    wait_notices,
)
from tests.support.certs import ServerCert
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import pick_port
from tests.support.server import ServerProcess

REQUIRED = "tls-required.test"  # [relay] tls_policy: "required"
SIGNED = "signed.test"  # a [[dkim.key]] domain


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    with FakeDNS() as dns:
        port = pick_port([fresh_address(), fresh_address()])
        overrides = relay_config(dns, port, tls_policy={REQUIRED: "required"})
        overrides["queue"]["delay_warning"] = "1s"
        txt = dkim_key(root / "dkim.pem")
        overrides["dkim"] = {"key": [{"domain": SIGNED, "selector": "sel", "key_file": str(root / "dkim.pem")}]}
        srv = ServerProcess(root / "srv", overrides).start()
        try:
            yield World(dns, port, srv, txt)
        finally:
            srv.stop()


def status_line(srv: ServerProcess, qid: str, rcpt: str, status: str) -> str:
    return srv.wait_for(lambda: next((line for line in log_lines(srv, qid)
                                      if f"to=<{rcpt}>" in line and f"status={status}" in line), None))


BIG = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 50  # 5 KB


@pytest.mark.parametrize("trouble", ["lost after RCPT", "TLS required, no STARTTLS", "over its SIZE"])
def test_a_failure_after_a_host_answered_names_it_in_the_log_and_the_dsn(srv, net, trouble):
    if trouble == "TLS required, no STARTTLS":
        domain, mx = REQUIRED, net.fake(f"mx1.{REQUIRED}")  # no certificate: no STARTTLS
        net.dns.mx(domain, [(10, mx.name)])
        want = "451 4.7.5 TLS is required, but"
    elif trouble == "lost after RCPT":
        domain, mx = remote_domain(net, drop_at="data")  # RCPT accepted, then the connection is gone
        want = "451 4.4.2 lost connection with"
    else:
        domain, mx = remote_domain(net, extensions=["PIPELINING", "SIZE 1000", "8BITMIME"])
        want = "552 5.3.4 message size"
    rcpt = f"bob@{domain}"
    qid = submit(srv, [rcpt], BIG if trouble == "over its SIZE" else b"Subject: hi\r\n\r\nhello\r\n")
    bounced = trouble == "over its SIZE"
    line = status_line(srv, qid, rcpt, "bounced" if bounced else "deferred")
    assert f"relay={mx.name}[{mx.host}] " in line and f"({want}" in line, line
    tls = {"lost after RCPT": "none", "over its SIZE": "none"}.get(trouble, "-")  # "-": no transaction
    assert f" tls={tls} " in line, line
    fields = only(dsn_fields(only(wait_notices(srv, qid))))  # the bounce, or the delay warning
    assert fields["Action"] == ("failed" if bounced else "delayed"), fields
    assert fields["Remote-MTA"] == f"dns; {mx.name}"
    assert fields["Diagnostic-Code"].startswith(f"smtp; {want}"), fields
    assert f"{mx.name}[{mx.host}]" in fields["Diagnostic-Code"]  # the text says which address
    if not bounced:  # mend the host, so the server does not keep retrying after the test
        mx.drop_at = None
        mx.cert = ServerCert(ca=trustme.CA(), common_name=mx.name, identities=(mx.name,))
        only(mx.wait_for_messages(1))
    wait_gone(srv, qid)


def test_a_failure_decided_here_names_no_host(srv, net):
    rcpt = f"bob@{net.domain()}"  # not in the DNS: NXDOMAIN, no host is ever talked to
    qid = submit(srv, [rcpt])
    line = status_line(srv, qid, rcpt, "bounced")
    assert " relay=none tls=- " in line and "(550 5.4.4 Host or domain name not found)" in line, line
    fields = only(dsn_fields(only(wait_notices(srv, qid))))
    assert fields["Status"] == "5.4.4"
    assert "Remote-MTA" not in fields and "Diagnostic-Code" not in fields, fields
    wait_gone(srv, qid)


def test_the_dsn_returns_the_header_section_that_was_sent_with_our_dkim_signature(srv, net):
    domain, mx = remote_domain(net, final_reply="554 5.7.1 not this one")
    body = (f"From: Writer <writer@{SIGNED}>\r\nTo: <bob@{domain}>\r\nSubject: signed\r\n"
            f"Message-ID: <reports-1@{SIGNED}>\r\n\r\nthe body\r\n").encode()
    qid = submit(srv, [f"bob@{domain}"], body)  # from alice@example.test: the DSN comes back here
    dsn = email.message_from_bytes(only(wait_notices(srv, qid)), policy=email.policy.default)
    sent = only(mx.transactions).data
    assert sent.startswith(b"DKIM-Signature: ")
    part = list(dsn.iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    returned = part.get_payload(decode=True) or part.get_payload().encode()
    sent_headers = sent.split(b"\r\n\r\n")[0] + b"\r\n"
    assert returned.replace(b"\r\n", b"\n") == sent_headers.replace(b"\r\n", b"\n")  # all of it, in order
    assert f"d={SIGNED}".encode() in returned and b"the body" not in returned
    wait_gone(srv, qid)
