"""End to end: the inbound check seam through a real server started from its config file.
README's example check (geosmtp/checks/example.py, the same 20 lines) refuses a recipient,
tags a header and quarantines a subject; checks written for tests (tests/support/
custom_checks.py) refuse at every phase, fail, hang, and record Authentication-Results."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_metrics import get, value
from tests.support.e2e import connect, queue_id, send_message, wait_closed, wait_delivered
from tests.support.server import ServerProcess, free_port
from tests.support.smtp import RawClient

ROOT = Path(__file__).resolve().parents[2]
ALICE, BOB = "alice@example.test", "bob@example.test"
SENDER = "someone@sender.test"
PLAIN = b"From: <someone@sender.test>\r\nSubject: hello\r\n\r\nbody\r\n"


def server(tmp_path, checks: list[dict], **overrides) -> ServerProcess:
    mport = free_port()
    srv = ServerProcess(tmp_path, {"check": checks, "metrics": {"address": f"127.0.0.1:{mport}"}, **overrides})
    srv.metrics_port = mport
    srv.env = {**os.environ, "PYTHONPATH": str(ROOT)}  # tests.support.custom_checks
    return srv.start()


def example(**options) -> dict:
    return {"type": "python", "name": "example", "module": "geosmtp.checks.example:ExampleCheck",
            "options": {"refuse": BOB, "subject": "[hold me]", **options}}


@pytest.fixture
def srv(tmp_path):
    s = server(tmp_path, [example()])
    yield s
    s.stop()


def test_readme_shows_the_example_check_as_shipped():
    readme = (ROOT / "README.md").read_text()
    code = (ROOT / "geosmtp/checks/example.py").read_text()
    body = code[code.index("from geosmtp.checks import"):]
    assert body in readme, "README's example check differs from geosmtp/checks/example.py"
    assert len(body.strip().splitlines()) <= 20


def test_example_check_refuses_one_recipient_tags_and_quarantines(srv):
    c = connect(srv.port)
    assert c.code("MAIL FROM:<someone@sender.test>") == "250 2.1.0"
    assert c.cmd(f"RCPT TO:<{BOB}>") == (550, ["5.7.1 No mail for this recipient"])
    assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
    c.cmd("DATA")
    c.send(PLAIN + b".\r\n")
    qid = queue_id(c.reply())
    got = wait_delivered(srv, ALICE, qid)
    head = got.split(b"\r\n\r\n" if b"\r\n\r\n" in got else b"\n\n", 1)[0]
    assert b"X-Example-Check: checked for [127.0.0.1]" in head
    # the check's field comes before our Received: (it is put in front of the message)
    assert head.index(b"X-Example-Check:") < head.index(b"Received:")

    held = send_message(c, SENDER, [ALICE], b"From: <someone@sender.test>\r\nSubject: please [hold me]\r\n\r\nx\r\n")
    hid = queue_id(held)
    assert hid in srv.queue_files("hold")
    out = subprocess.run([sys.executable, str(ROOT / "bin" / "geosmtp-queue"), "-c", str(srv.config_path),
                          "show", hid], capture_output=True, text=True, timeout=30)
    assert "quarantined: example: subject matched" in out.stdout, out.stdout + out.stderr
    assert re.search(rf"queued {hid} .*\(quarantined: example: subject matched\)", srv.log())
    assert "check example: rcpt reject" in srv.log()
    _, text = get(srv.metrics_port, "/metrics")
    assert value(text, "geosmtp_check_verdicts_total", check="example", phase="rcpt", verdict="reject") == 1
    assert value(text, "geosmtp_check_verdicts_total", check="example", phase="data", verdict="quarantine") == 1
    assert value(text, "geosmtp_messages_quarantined_total", listener="smtp") == 1
    c.cmd("QUIT")


def test_checks_run_on_the_mx_listener_only_and_skip_trusted_clients(srv):
    # submission (AUTH) is not an MX listener: the check is not there
    c = connect(srv.submission_port)
    assert c.code("MAIL FROM:<someone@sender.test>") == "530 5.7.0"  # AUTH required, not the check
    c.close()
    trusted = connect(srv.port, source="127.0.0.2")  # [relay] trusted_networks in the test config
    assert trusted.code("MAIL FROM:<someone@sender.test>") == "250 2.1.0"
    assert trusted.code(f"RCPT TO:<{BOB}>") == "250 2.1.5"
    trusted.close()


def test_a_check_at_every_phase(tmp_path):
    gate = {"type": "python", "name": "gate", "module": "tests.support.custom_checks:Gatekeeper",
            "options": {"close_ip": "127.0.0.5", "defer_ip": "127.0.0.6", "bad_helo": "liar.test",
                        "defer_sender": "later@sender.test", "hold_rcpt": BOB}}
    srv = server(tmp_path, [gate])
    try:
        closed = RawClient(srv.port, source="127.0.0.5")  # close at connect: 554 (RFC 5321 3.1)
        assert closed.reply() == (554, ["5.7.0 You are not welcome here"])
        assert wait_closed(closed)
        deferred = RawClient(srv.port, source="127.0.0.6")
        assert deferred.reply() == (421, ["4.7.1 Come back later"])
        assert wait_closed(deferred)

        c = connect(srv.port, ehlo=None)
        assert c.cmd("EHLO liar.test") == (550, ["5.7.1 That is not your name"])
        assert c.code("MAIL FROM:<someone@sender.test>") == "503 5.5.1"  # not greeted
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<later@sender.test>") == (450, ["4.7.1 Sender deferred"])
        assert c.code("MAIL FROM:<someone@sender.test>") == "250 2.1.0"  # a new MAIL may come
        assert c.code(f"RCPT TO:<{ALICE}>") == "250 2.1.5"
        assert c.code(f"RCPT TO:<{BOB}>") == "250 2.1.5"
        c.cmd("DATA")
        c.send(PLAIN + b".\r\n")
        qid = queue_id(c.reply())
        assert srv.queue_files("hold") == [qid]
        envelope = json.loads((srv.spool / "queue" / "hold" / qid).read_bytes().split(b"\n", 1)[0])
        assert envelope["extra"]["quarantine"] == f"gate: held for {BOB}"
        # the MAIL check's result reached the RCPT check of the same transaction
        assert envelope["extra"]["headers"] == "X-Seen-Sender: someone@sender.test\r\n"
        c.cmd("QUIT")
        log = srv.log()
        for line in ("check gate: connect close: You are not welcome here", "check gate: helo reject",
                     "check gate: mail defer", f"check gate: rcpt quarantine: held for {BOB}"):
            assert line in log
    finally:
        srv.stop()


@pytest.mark.parametrize("on_error, want", [("defer", (451, ["4.3.0 Temporary local problem, try again later"])),
                                            ("reject", (550, ["5.7.1 Refused by policy"])),
                                            ("accept", (250, ["2.1.5 Recipient ok"]))])
def test_a_failing_or_hanging_check_gets_its_on_error(tmp_path, on_error, want):
    checks = [{"type": "python", "name": "broken", "module": "tests.support.custom_checks:Fails",
               "on_error": on_error},
              {"type": "python", "name": "hang", "module": "tests.support.custom_checks:Hangs", "timeout": "1s",
               "on_error": on_error},
              {"type": "python", "name": "wrong", "module": "tests.support.custom_checks:Returns",
               "on_error": "accept"}]
    srv = server(tmp_path, checks)
    try:
        c = connect(srv.port)
        assert c.code("MAIL FROM:<someone@sender.test>") == "250 2.1.0"  # "wrong" fails: accepted
        started = time.monotonic()
        assert c.cmd(f"RCPT TO:<{ALICE}>") == want
        if on_error == "accept":  # the broken one let it through, and the hanging one too, after 1s
            assert 0.9 < time.monotonic() - started < 5
        other = connect(srv.port)  # one session's broken check never touches another's
        assert other.code("NOOP") == "250 2.0.0"
        _, text = get(srv.metrics_port, "/metrics")
        assert value(text, "geosmtp_check_errors_total", check="broken", kind="error") == 1
        assert value(text, "geosmtp_check_errors_total", check="wrong", kind="error") == 1
        assert "check broken: rcpt error (RuntimeError: this check is broken); on_error=" + on_error in srv.log()
        assert "check wrong: mail error (TypeError: returned str, not a Verdict)" in srv.log()
        if on_error == "accept":
            assert value(text, "geosmtp_check_errors_total", check="hang", kind="timeout") == 1
    finally:
        srv.stop()


FORGED = (b"Authentication-Results: MX.example.test; dkim=pass header.d=bank.test\r\n"
          b"Authentication-Results: other.test; spf=pass smtp.mailfrom=bank.test\r\n"
          b"X-Remove-Me: yes\r\nFrom: <someone@sender.test>\r\nSubject: hi\r\n\r\nbody\r\n")


def test_our_authentication_results_and_no_forged_one(tmp_path):
    srv = server(tmp_path, [{"type": "python", "name": "signs", "module": "tests.support.custom_checks:Signs"}])
    try:
        with connect(srv.port) as c:
            qid = queue_id(send_message(c, SENDER, [ALICE], FORGED))
        got = wait_delivered(srv, ALICE, qid).replace(b"\r\n", b"\n")
        head = got.split(b"\n\n", 1)[0]
        assert b"Authentication-Results: mx.example.test;\n\tx-test=pass header.from=example.org\n" in head
        assert b"dkim=pass header.d=bank.test" not in got  # in our name: removed (RFC 8601 5)
        assert b"Authentication-Results: other.test; spf=pass" in head  # someone else's: kept
        assert b"X-Remove-Me" not in got  # the check's remove_headers
        assert got.endswith(b"\nSubject: hi\n\nbody\n\n")  # the body as sent (send_message ends it)
        assert "removed 1 Authentication-Results field(s) in our name" in srv.log()
        # a trusted client is not checked, but its forged field goes too
        with connect(srv.port, source="127.0.0.2") as c:
            tid = queue_id(send_message(c, SENDER, [ALICE], FORGED))
        trusted = wait_delivered(srv, ALICE, tid)
        assert b"bank.test; " not in trusted and b"dkim=pass" not in trusted
        assert b"x-test=pass" not in trusted and b"X-Remove-Me" in trusted
    finally:
        srv.stop()


def test_a_check_that_cannot_load_is_named_by_check_config(tmp_path):
    srv = ServerProcess(tmp_path, {"check": [{"type": "python", "module": "no_such_module:Check"}]})
    out = subprocess.run([sys.executable, "-m", "geosmtp", "check-config", "-c", str(srv.config_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "check[0]: module: cannot import no_such_module: ModuleNotFoundError" in out.stdout + out.stderr
