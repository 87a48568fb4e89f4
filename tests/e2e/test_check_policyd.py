"""End to end: real Postfix policy servers behind a real geosmtp server (type = "policy").

- Debian's postgrey (started here, on its own port and database): the first try is
  greylisted (450 4.7.1 from its DEFER_IF_PERMIT), after the delay the message is accepted
  and carries postgrey's X-Greylist header field.
- Debian's policyd-spf (postfix-policyd-spf-python) speaks the protocol on stdin/stdout
  under Postfix's spawn(8); here a bridge (tests/support/policyserver.StdioBridge) runs it
  once per connection. Its SPF library (pyspf on pydns) reads its name servers from
  /etc/resolv.conf and always asks port 53, with no setting or environment variable to
  change either; a sitecustomize module on the program's own PYTHONPATH sets pydns's
  defaults to the FakeDNS, so /usr/bin/policyd-spf runs unchanged and nothing on the
  system is touched. Its Received-SPF header (pass) and its 550 5.7.23 (fail) reach the client.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from tests.support.checks import checks_server, client_from
from tests.support.e2e import queue_id, wait_delivered
from tests.support.fakedns import FakeDNS
from tests.support.policyserver import FakePolicyServer, StdioBridge
from tests.support.server import free_port

POSTGREY = "/usr/sbin/postgrey"
POLICYD_SPF = "/usr/bin/policyd-spf"
SENDER = "someone@sender.test"
ALICE = "alice@example.test"
BODY = b"From: <someone@sender.test>\r\nSubject: policy\r\n\r\nhello\r\n"


def need(program: str, package: str) -> None:
    if not (os.path.isfile(program) and os.access(program, os.X_OK)):
        pytest.fail(f"{program} is missing: install the Debian package {package} (apt-get install -y {package})")


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout:g}s")


@pytest.fixture
def dns():
    with FakeDNS() as d:
        yield d


@pytest.fixture
def postgrey(tmp_path):
    """postgrey as this test's own process: its database, no whitelists, a 2 s delay."""
    need(POSTGREY, "postgrey")
    home = tmp_path / "postgrey"
    home.mkdir()
    (home / "whitelist_clients").write_text("")
    (home / "whitelist_recipients").write_text("")
    port = free_port()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    log = open(home / "postgrey.log", "wb")
    proc = subprocess.Popen([POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={home}", "--delay=2",
                             f"--user={user}", f"--group={group}", "--hostname=mx.example.test",
                             f"--whitelist-clients={home / 'whitelist_clients'}",
                             f"--whitelist-recipients={home / 'whitelist_recipients'}",
                             "--auto-whitelist-clients=0"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=home)
    log.close()
    try:
        wait_listening(port, proc, "postgrey")
        proc.address = f"127.0.0.1:{port}"
        proc.log = lambda: (home / "postgrey.log").read_text(errors="replace")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def policyd_spf(tmp_path, dns):
    """policyd-spf behind a stdin/stdout bridge, its resolver library pointed at the FakeDNS."""
    need(POLICYD_SPF, "postfix-policyd-spf-python")
    home = tmp_path / "policyd-spf"
    (home / "site").mkdir(parents=True)
    host, port = dns.address.rsplit(":", 1)
    # pydns reads /etc/resolv.conf when it is imported (DNS.Base._DiscoverNameServers) and
    # asks port 53: the defaults it then uses for every request are set here instead
    (home / "site" / "sitecustomize.py").write_text(
        "import DNS.Base\n"
        f"DNS.Base.defaults['server'][:] = [{host!r}]\n"
        f"DNS.Base.defaults['port'] = {int(port)}\n")
    conf = home / "policyd-spf.conf"
    conf.write_text("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\nMail_From_reject = Fail\n"
                    "PermError_reject = False\nTempError_Defer = False\nLookup_Time = 5\n"
                    "skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(home / "site"), "LANG": "C.UTF-8"}
    bridge = StdioBridge([POLICYD_SPF, str(conf)], cwd=home, env=env).start()
    yield bridge
    bridge.stop()


def policy(address: str, **more) -> dict:
    return {"type": "policy", "address": address, "read_timeout": 8, **more}


@pytest.fixture
def started(tmp_path):
    servers = []

    def start(dns, checks):
        srv = checks_server(tmp_path / "geosmtp", dns, checks).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def header_section(message: bytes) -> bytes:
    return re.split(rb"\r?\n\r?\n", message, maxsplit=1)[0]


# -- postgrey ---------------------------------------------------------------------------------
def test_postgrey_greylists_then_accepts_with_its_header(started, dns, postgrey):
    srv = started(dns, [policy(postgrey.address)])
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    code, lines = c.cmd(f"RCPT TO:<{ALICE}>")
    assert code == 450 and lines[0].startswith("4.7.1 Greylisted"), (code, lines)
    assert c.code("QUIT").startswith("221")
    seen = postgrey.log()
    assert "action=greylist, reason=new" in seen and "client_address=192.0.2.10" in seen, seen
    assert f"sender={SENDER}, recipient={ALICE}" in seen, seen

    time.sleep(3)  # past --delay=2
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    c.cmd("DATA")
    c.send(BODY + b".\r\n")
    qid = queue_id(c.reply())
    head = header_section(wait_delivered(srv, ALICE, qid))
    m = re.search(rb"^X-Greylist: delayed (\d+) seconds by postgrey-[\d.]+ at mx\.example\.test; .+$", head, re.M)
    assert m and int(m.group(1)) >= 2, head
    assert head.index(b"X-Greylist:") < head.index(b"Received:")
    assert "check policy: rcpt defer" in srv.log()


def test_postgrey_sees_one_instance_per_message(started, dns, postgrey):
    """The second RCPT of the message that passes gets DUNNO, not a second header field:
    postgrey prepends once per instance, so instance must hold across a transaction's RCPTs."""
    srv = started(dns, [policy(postgrey.address)])
    bob = "bob@example.test"
    c = client_from(srv, "192.0.2.20", ehlo="mail.sender.test")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 450
    assert c.cmd(f"RCPT TO:<{bob}>")[0] == 450
    time.sleep(3)
    assert c.code("RSET").startswith("250")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    assert c.code(f"RCPT TO:<{bob}>") == "250 2.1.5"
    c.cmd("DATA")
    c.send(BODY + b".\r\n")
    qid = queue_id(c.reply())
    head = header_section(wait_delivered(srv, ALICE, qid))
    assert head.count(b"X-Greylist:") == 1, head


# -- policyd-spf ------------------------------------------------------------------------------
def test_policyd_spf_pass_prepends_received_spf(started, dns, policyd_spf):
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.10 -all")
    srv = started(dns, [policy(policyd_spf.address)])
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    c.cmd("DATA")
    c.send(BODY + b".\r\n")
    qid = queue_id(c.reply())
    head = header_section(wait_delivered(srv, ALICE, qid))
    assert re.search(rb"^Received-SPF: Pass \(mailfrom\) identity=mailfrom; client-ip=192\.0\.2\.10; "
                     rb"helo=mail\.sender\.test; envelope-from=someone@sender\.test; receiver=", head, re.M), head
    assert ("sender.test", "TXT") in dns.queries  # it asked our fake DNS, nobody else


def test_policyd_spf_fail_rejects_with_its_550(started, dns, policyd_spf):
    dns.txt("sender.test", "v=spf1 ip4:192.0.2.10 -all")
    srv = started(dns, [policy(policyd_spf.address)])
    c = client_from(srv, "198.51.100.7", ehlo="mail.sender.test")
    assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
    code, lines = c.cmd(f"RCPT TO:<{ALICE}>")
    assert code == 550 and lines[0].startswith("5.7.23 Message rejected due to: SPF fail"), (code, lines)
    assert "ip=198.51.100.7" in lines[0]
    assert c.code("QUIT").startswith("221")
    assert srv.messages(ALICE) == []


# -- what a real session sends -----------------------------------------------------------------
def test_the_request_a_real_session_sends(started, dns):
    """A fake policy server shows the request as it leaves the server: the PROXY client
    address, one instance for a transaction's RCPTs, a new one for the next transaction, and
    a HELO with control characters (the session refuses CR, LF and NUL itself) as one value
    with "?" in their place."""
    answers = FakePolicyServer(lambda request: "action=DUNNO").start()
    try:
        srv = started(dns, [policy(answers.address)])
        c = client_from(srv, "192.0.2.30", ehlo=None)
        assert c.cmd(b"EHLO mail\x01.sender\x7f.test")[0] == 250
        for _ in range(2):
            assert c.code(f"MAIL FROM:<{SENDER}>") == "250 2.1.0"
            assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
            assert c.code("RCPT TO:<bob@example.test>") == "250 2.1.5"
            assert c.code("RSET").startswith("250")
        first, second, third, fourth = answers.requests
        assert first["client_address"] == "192.0.2.30" and first["protocol_state"] == "RCPT"
        assert first["helo_name"] == "mail?.sender?.test" and first["sender"] == SENDER
        assert first["client_name"] == "unknown" and first["protocol_name"] == "ESMTP"
        assert (first["recipient"], second["recipient"]) == (ALICE, "bob@example.test")
        assert first["instance"] == second["instance"] != third["instance"] == fourth["instance"]
        assert answers.connections == 1  # the connection was kept
    finally:
        answers.stop()
