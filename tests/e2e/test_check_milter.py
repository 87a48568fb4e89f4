"""End to end: the milter check in a real server against real milters: scripted ones written
with Debian's python3-milter (libmilter underneath) for every reply and modification,
Debian's OpenDKIM signing on the submission listener, Debian's OpenDMARC adding its
Authentication-Results, two milters in a row, and milters that misbehave (hang, reset,
garbage, too late, a 100 MB reply)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.checks import checks_server, client_from
from tests.support.e2e import queue_entry, queue_id, send_message, start_data, wait_delivered
from tests.support.fake_milter import FakeMilter
from tests.support.fakedns import FakeDNS
from tests.support.server import free_port

ALICE, BOB = "alice@example.test", "bob@example.test"
DEBIAN_PYTHON = "/usr/bin/python3"
SCRIPTED = Path(__file__).resolve().parents[1] / "support" / "scripted_milter.py"
MESSAGE = (b"From: Sender <someone@sender.test>\r\nTo: <alice@example.test>\r\nSubject: hello\r\n"
           b"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <milter@test>\r\n\r\nthe body\r\nline two\r\n")


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not listen on {port} in {timeout:g}s"
            time.sleep(0.05)


class Scripted:
    """A python3-milter milter started by the test with its script."""

    def __init__(self, root: Path, **script):
        assert os.path.exists(DEBIAN_PYTHON), "Debian's python3 is missing"
        check = subprocess.run([DEBIAN_PYTHON, "-c", "import Milter"], capture_output=True)
        assert check.returncode == 0, "python3-milter is missing: apt-get install python3-milter"
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = root / "steps.jsonl"
        self.log_path.write_text("")
        path = root / "script.json"
        path.write_text(json.dumps({"port": self.port, "log": str(self.log_path), **script}))
        self.proc = subprocess.Popen([DEBIAN_PYTHON, "-I", str(SCRIPTED), str(path)], stdout=subprocess.DEVNULL,
                                     stderr=open(root / "stderr", "wb"))
        wait_listening(self.port, self.proc, "the scripted milter")

    @property
    def address(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def steps(self, name: str | None = None) -> list[dict]:
        out = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [s for s in out if name is None or s["step"] == name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def dns():
    d = FakeDNS().start()
    yield d
    d.stop()


@pytest.fixture
def started(tmp_path, dns):
    """start(checks, **overrides) -> server; milters and servers are stopped after the test."""
    servers, milters = [], []

    def milter(name="m", **script) -> Scripted:
        m = Scripted(tmp_path / f"milter-{name}-{len(milters)}", **script)
        milters.append(m)
        return m

    def server(checks, **overrides):
        srv = checks_server(tmp_path / f"srv{len(servers)}", dns, checks, overrides).start()
        servers.append(srv)
        return srv

    yield milter, server
    for srv in servers:
        srv.stop()
    for m in milters:
        m.stop()


def one_check(address: str, **options) -> list[dict]:
    return [{"type": "milter", "name": "m1", "address": address, "timeout": 20, "listeners": ["mx"], **options}]


def delivered_head(srv, rcpt: str, qid: str) -> bytes:
    return wait_delivered(srv, rcpt, qid).split(b"\n\n", 1)[0]


def test_a_pass_through_milter_sees_every_step_with_postfix_macros(started):
    milter, server = started
    m = milter()
    srv = server(one_check(m.address))
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")
    qid = queue_id(send_message(c, "someone@sender.test", [ALICE, BOB], MESSAGE))
    c.cmd("QUIT")
    got = wait_delivered(srv, ALICE, qid)
    assert got.endswith(b"the body\nline two\n\n")  # delivered to a Maildir: LF lines
    steps = m.steps()
    names = [s["step"] for s in steps]
    assert names[:4] == ["connect", "helo", "envfrom", "envrcpt"], names
    connect = steps[0]
    assert connect["addr"] == "192.0.2.10"
    assert connect["macros"]["j"] == "mx.example.test"
    assert connect["macros"]["{daemon_name}"] == "mx"
    assert connect["macros"]["{client_addr}"] == "192.0.2.10"
    assert steps[1]["name"] == "mail.sender.test"
    assert m.steps("envfrom")[0]["sender"] == "<someone@sender.test>"
    assert m.steps("envfrom")[0]["macros"]["{mail_addr}"] == "someone@sender.test"
    assert [s["rcpt"] for s in m.steps("envrcpt")] == [f"<{ALICE}>", f"<{BOB}>"]
    headers = [(s["name"], s["value"]) for s in m.steps("header")]
    assert headers[0] == ("From", "Sender <someone@sender.test>")  # our Received: is not shown
    assert ("Subject", "hello") in headers
    assert "".join(s["text"] for s in m.steps("body")) == "the body\r\nline two\r\n\r\n"
    assert m.steps("eom")[0]["macros"]["i"] == qid
    deadline = time.monotonic() + 5
    while "close" not in [s["step"] for s in m.steps()] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.steps()[-1]["step"] == "close"  # SMFIC_QUIT at the session's end


def test_one_connection_per_session_reused_and_aborted_transactions(started):
    milter, server = started
    m = milter(rcpt_reply={"bob@example.test": "reject"})
    srv = server(one_check(m.address))
    c = client_from(srv, "192.0.2.11")
    start = c.cmd("MAIL FROM:<a@sender.test>")
    assert start[0] == 250
    assert c.cmd(f"RCPT TO:<{BOB}>") == (550, ["5.7.1 Command rejected"])
    assert c.cmd("RSET")[0] == 250  # the transaction ends unfinished: the milter hears abort
    start_data(c, "a@sender.test", [ALICE])
    c.send(MESSAGE + b".\r\n")
    code, lines = c.reply()
    assert code == 250, lines
    qid = lines[-1].split()[-1]
    c.cmd("QUIT")
    wait_delivered(srv, ALICE, qid)
    names = [s["step"] for s in m.steps()]
    assert names.count("connect") == 1  # one milter connection for the session
    assert names.count("envfrom") == 2
    assert "abort" in names[names.index("envfrom"):names.index("envfrom", names.index("envfrom") + 1)]


@pytest.mark.parametrize("step, answer, want", [
    ("envfrom", "reject", (550, ["5.7.1 Command rejected"])),
    ("envfrom", "tempfail", (451, ["4.7.1 Service unavailable - try again later"])),
    ("eom", "reject", (550, ["5.7.1 Command rejected"])),
    ("eom", ["reply", "554", "5.7.0", "first line", "second line"], (554, ["5.7.0 first line; second line"])),
    ("eom", ["reply", "550", "5.7.1", ""], (550, ["5.7.1 Command rejected"])),  # a code with no text
    ("eom", ["reply", "451", "4.7.1", "100%% busy"], (451, ["4.7.1 100% busy"])),
    ("header", "tempfail", (451, ["4.7.1 Service unavailable - try again later"])),
])
def test_refusals_reach_the_client_and_nothing_is_queued(started, step, answer, want):
    milter, server = started
    m = milter(reply={step: answer})
    srv = server(one_check(m.address))
    before = {s: srv.queue_files(s) for s in ("incoming", "active", "deferred", "hold")}
    c = client_from(srv, "192.0.2.12")
    if step == "envfrom":
        assert c.cmd("MAIL FROM:<a@sender.test>") == want
    else:
        start_data(c, "a@sender.test", [ALICE])
        c.send(MESSAGE + b".\r\n")
        assert c.reply() == want
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.cmd("QUIT")
    assert {s: srv.queue_files(s) for s in before} == before


@pytest.mark.parametrize("how", ["discard", "quarantine"])
def test_discard_and_quarantine_go_to_hold_never_dropped(started, how):
    milter, server = started
    m = milter(reply={"eom": "discard"}) if how == "discard" else milter(eom=[["quarantine", "looks bad"]])
    srv = server(one_check(m.address))
    c = client_from(srv, "192.0.2.13")
    qid = queue_id(send_message(c, "a@sender.test", [ALICE], MESSAGE))
    c.cmd("QUIT")
    state, envelope = queue_entry(srv, qid)
    assert state == "hold"
    reason = envelope["extra"]["quarantine"]
    assert ("discard" in reason) if how == "discard" else ("looks bad" in reason), reason


def test_modifications_are_applied_to_the_stored_message_and_envelope(started):
    milter, server = started
    m = milter(eom=[["addheader", "X-Added", "at the end"], ["insheader", 0, "X-Top", "first"],
                    ["chgheader", "Subject", 1, "changed"], ["chgheader", "Message-ID", 1, ""],
                    ["addheader", "X-Folded", "one\n\ttwo"],
                    ["chgfrom", "<new-sender@sender.test>"], ["addrcpt", "<bob@example.test>"],
                    ["delrcpt", "<alice@example.test>"], ["replacebody", "a new body\nwith LF only\n"]])
    srv = server(one_check(m.address), listeners={"mx": {"hold": True}})
    c = client_from(srv, "192.0.2.14")
    qid = queue_id(send_message(c, "a@sender.test", [ALICE], MESSAGE))
    c.cmd("QUIT")
    state, envelope = queue_entry(srv, qid)
    assert envelope["sender"] == "new-sender@sender.test"
    assert [r["address"] for r in envelope["recipients"]] == [BOB]
    stored = (srv.spool / "msg" / qid).read_bytes() if (srv.spool / "msg" / qid).exists() else None
    if stored is None:  # the layout of msg/ is the spool's: find the file by its id
        stored = next(p for p in srv.spool.rglob(f"*{qid}*") if p.is_file() and b"X-Top" in p.read_bytes()).read_bytes()
    message = stored.split(b"\n", 1)[1]
    head, body = message.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"X-Top: first"
    assert lines[1].startswith(b"Received: from client.test")
    assert b"Subject: changed" in lines and b"Subject: hello" not in lines
    assert not any(line.startswith(b"Message-ID") for line in lines)
    assert lines[-3:] == [b"X-Added: at the end", b"X-Folded: one", b"\ttwo"]
    assert body == b"a new body\r\nwith LF only\r\n"


def test_an_added_remote_recipient_is_refused_for_an_untrusted_client(started):
    milter, server = started
    m = milter(eom=[["addrcpt", "<someone@elsewhere.test>"]])
    srv = server(one_check(m.address))
    before = {s: srv.queue_files(s) for s in ("incoming", "active", "deferred", "hold")}
    c = client_from(srv, "192.0.2.15")
    start_data(c, "a@sender.test", [ALICE])
    c.send(MESSAGE + b".\r\n")
    assert c.reply() == (451, ["4.3.0 Temporary local problem, try again later"])
    c.cmd("QUIT")
    assert {s: srv.queue_files(s) for s in before} == before
    assert "added recipient <someone@elsewhere.test>" in srv.log()


def test_two_milters_in_config_order(started):
    milter, server = started
    first = milter("a", eom=[["addheader", "X-Order", "first"]])
    second = milter("b", eom=[["addheader", "X-Order", "second"]])
    srv = server([*one_check(first.address), {**one_check(second.address)[0], "name": "m2"}])
    c = client_from(srv, "192.0.2.16")
    qid = queue_id(send_message(c, "a@sender.test", [ALICE], MESSAGE))
    c.cmd("QUIT")
    head = delivered_head(srv, ALICE, qid)
    assert head.split(b"\n")[-2:] == [b"X-Order: first", b"X-Order: second"]
    assert first.steps("eom") and second.steps("eom")


BEHAVIOURS = ["hang", "reset", "garbage", "late", "huge"]


def fast(port: int, default_action: str) -> list[dict]:
    return one_check(f"inet:127.0.0.1:{port}", default_action=default_action,
                     connect_timeout=1, command_timeout=1, content_timeout=1)


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_bad_milter_at_mail_gets_tempfail_in_time_and_the_session_goes_on(started, behaviour):
    _milter, server = started
    bad = FakeMilter(behaviour, late_by=2.5, at=b"M").start()
    try:
        srv = server(fast(bad.port, "tempfail"))
        c = client_from(srv, "192.0.2.17", timeout=15)
        began = time.monotonic()
        assert c.cmd("MAIL FROM:<a@sender.test>") == (451, ["4.7.1 Service unavailable - try again later"])
        assert time.monotonic() - began < 2.5  # within its timeout (1 s), not the milter's pace
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 451  # for the rest of the session
        c.cmd("QUIT")
        assert f"milter inet:127.0.0.1:{bad.port}: mail" in srv.log()
    finally:
        bad.stop()


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_bad_milter_with_default_accept_is_left_out_and_mail_flows(started, behaviour):
    _milter, server = started
    bad = FakeMilter(behaviour, late_by=2.5).start()
    try:
        srv = server(fast(bad.port, "accept"))
        began = time.monotonic()
        c = client_from(srv, "192.0.2.17", timeout=15)  # its connect step is the one that fails
        assert time.monotonic() - began < 2.5
        qid = queue_id(send_message(c, "a@sender.test", [ALICE], MESSAGE))
        c.cmd("QUIT")
        wait_delivered(srv, ALICE, qid)
        assert f"milter inet:127.0.0.1:{bad.port}: connect" in srv.log()
    finally:
        bad.stop()


def test_a_bad_milter_at_connect_with_tempfail_gets_421(started):
    _milter, server = started
    bad = FakeMilter("hang").start()
    try:
        srv = server(fast(bad.port, "tempfail"))
        c = client_from(srv, "192.0.2.17", timeout=15, expect_greeting=False)
        began = time.monotonic()
        assert c.reply() == (421, ["4.7.1 Service unavailable - try again later"])
        assert time.monotonic() - began < 2.5
    finally:
        bad.stop()


def test_garbage_at_the_option_negotiation(started):
    _milter, server = started
    bad = FakeMilter("pass", garbage_at_optneg=True).start()
    try:
        srv = server(fast(bad.port, "accept"))
        c = client_from(srv, "192.0.2.17", timeout=15)
        qid = queue_id(send_message(c, "a@sender.test", [ALICE], MESSAGE))
        wait_delivered(srv, ALICE, qid)
        assert f"milter inet:127.0.0.1:{bad.port}: connect garbage" in srv.log()
    finally:
        bad.stop()


def test_the_milter_is_unreachable(started):
    _milter, server = started
    port = free_port()
    srv = server(one_check(f"inet:127.0.0.1:{port}", default_action="reject", connect_timeout=1))
    c = client_from(srv, "192.0.2.18", expect_greeting=False)
    code, lines = c.reply()
    assert code == 554 and "Service unavailable" in lines[-1]
    assert f"milter inet:127.0.0.1:{port}: connect unavailable" in srv.log()


def test_hostile_values_never_break_a_packet(started):
    milter, server = started
    m = milter()
    srv = server(one_check(m.address))
    c = client_from(srv, "192.0.2.19")
    assert c.cmd("EHLO odd\x00name.test")[0] == 500  # the server refuses a NUL in a command itself
    assert c.cmd("EHLO client.test")[0] == 250
    hostile = MESSAGE.replace(b"Subject: hello", b"Subject: a\x7fb\tc")
    qid = queue_id(send_message(c, "a@sender.test", [ALICE], hostile))
    c.cmd("QUIT")
    wait_delivered(srv, ALICE, qid)
    assert [s["name"] for s in m.steps("helo")] == ["client.test", "client.test"]
    assert ("Subject", "a\x7fb\tc") in [(s["name"], s["value"]) for s in m.steps("header")]


# -- real milters: OpenDKIM signing on submission, OpenDMARC ------------------------------------
def start_daemon(argv: list[str], port_or_path, what: str, root: Path, netns: bool = False) -> subprocess.Popen:
    """A milter daemon started by the test; waits until it listens (a port, or a unix path)."""
    if netns:  # its own network namespace: loopback only, so its DNS lookups go nowhere
        argv = ["unshare", "--net", *argv]
    proc = subprocess.Popen(argv, stdout=open(root / f"{what}.out", "wb"), stderr=subprocess.STDOUT)
    if isinstance(port_or_path, int):
        wait_listening(port_or_path, proc, what)
    else:
        deadline = time.monotonic() + 10
        while not os.path.exists(port_or_path):
            assert proc.poll() is None, f"{what} exited: {(root / f'{what}.out').read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"{what} did not make {port_or_path} in 10s"
            time.sleep(0.05)
    return proc


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_opendkim_signs_on_submission_and_the_signature_verifies(started, tmp_path):
    import base64

    import dkim

    from tests.support.dkimkeys import RSAKey
    from tests.support.server import PASSWORDS
    _milter, server = started
    binary = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert binary, "opendkim is missing: apt-get install opendkim"
    key = RSAKey(2048)
    key_file = tmp_path / "example.pem"
    key_file.write_bytes(key.private)
    key_file.chmod(0o600)
    port = free_port()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode s\nDomain example.test\nSelector sub\nKeyFile {key_file}\n"
                    f"Socket inet:{port}@127.0.0.1\nSignatureAlgorithm rsa-sha256\n"
                    "Canonicalization relaxed/relaxed\nSyslog no\nRequireSafeKeys no\n"
                    # not 127.0.0.1: it signs because the client authenticated ({auth_type})
                    "InternalHosts 192.0.2.254/32\n"
                    f"PidFile {tmp_path / 'opendkim.pid'}\nBackground no\nUMask 077\n")
    proc = start_daemon([binary, "-f", "-x", str(conf)], port, "opendkim", tmp_path)
    try:
        srv = server([{"type": "milter", "name": "opendkim", "address": f"inet:127.0.0.1:{port}",
                       "listeners": ["submission"], "skip_trusted": False, "timeout": 30}],
                     listeners={"submission": {"allow_plaintext_auth": True}})
        from tests.support.e2e import connect
        c = connect(srv.submission_port)
        plain = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {plain}")[0] == 235
        submitted = MESSAGE.replace(b"From: Sender <someone@sender.test>", b"From: Alice <alice@example.test>")
        qid = queue_id(send_message(c, ALICE, [BOB], submitted))
        c.cmd("QUIT")
        got = wait_delivered(srv, BOB, qid).replace(b"\n", b"\r\n")
        assert b"DKIM-Signature:" in got, got[:800]
        message = got.split(b"\r\n", 2)[2]  # the local delivery's Return-Path and Delivered-To: not signed
        record = key.record.encode()
        assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record if name == b"sub._domainkey.example.test." else None)
        assert our_dkim_check(message, "sub._domainkey.example.test", key.record) == [
            {"result": "pass", "domain": "example.test", "selector": "sub"}]
    finally:
        stop_daemon(proc)


def our_dkim_check(message: bytes, name: str, record: str) -> list[dict]:
    """What geosmtp's own dkim check says of `message`, its key served by a fake DNS."""
    import io
    import ipaddress

    from geosmtp.checks import registry
    from geosmtp.checks.dkimverify import DKIMCheck
    from geosmtp.checks.dns import DNS
    from geosmtp.checks.interface import CheckContext, Facts
    from geosmtp.relay.mx import make_resolver
    from tests.support.fakedns import FakeDNS

    fake = FakeDNS().start()
    try:
        fake.txt(name, record)
        context = CheckContext("mx.example.test", DNS(make_resolver([("127.0.0.1", fake.port)], 2)))
        check = DKIMCheck(registry.validate_options(DKIMCheck, {}), context)
        facts = Facts(phase="data", listener="smtp", mode="smtp", ip=ipaddress.ip_address("192.0.2.1"),
                      trusted=False, hostname="mx.example.test", size=len(message),
                      open_message=lambda: io.BytesIO(message))
        return check.data(facts).results["dkim"]
    finally:
        fake.stop()


def test_opendmarc_adds_its_authentication_results(started, tmp_path):
    _milter, server = started
    binary = shutil.which("opendmarc", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert binary, "opendmarc is missing: apt-get install opendmarc"
    sock = tmp_path / "opendmarc.sock"
    conf = tmp_path / "opendmarc.conf"
    conf.write_text(f"Socket local:{sock}\nAuthservID mx.example.test\nSyslog false\nBackground false\n"
                    f"PidFile {tmp_path / 'opendmarc.pid'}\nDNSTimeout 1\nUMask 000\n"
                    "SPFSelfValidate false\nRequiredHeaders false\n")
    proc = start_daemon([binary, "-f", "-c", str(conf)], str(sock), "opendmarc", tmp_path, netns=True)
    try:
        srv = server(one_check(f"unix:{sock}"))
        c = client_from(srv, "192.0.2.20", ehlo="mail.sender.test")
        qid = queue_id(send_message(c, "someone@sender.test", [ALICE], MESSAGE))
        c.cmd("QUIT")
        head = delivered_head(srv, ALICE, qid).decode()
        results = [line for line in head.split("\n") if line.startswith("Authentication-Results:")]
        assert results, head
        assert results[0].startswith("Authentication-Results: mx.example.test;")
        assert "dmarc=" in head and "header.from=sender.test" in head, head
    finally:
        stop_daemon(proc)
