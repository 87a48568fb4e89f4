"""End to end: the rspamd check in a real server against a REAL rspamd (Debian's package,
started by the test: tests/support/rspamd.py), the fake DNS as the resolver of both. A GTUBE
message is refused with 550 5.7.1 at the end of DATA and nothing is queued; a plain one is
delivered with its score header, and rspamd hears the envelope (its log names our queue id
and the client's confirmed name). If rspamd cannot start, the tests fail saying why."""
from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import pytest

from tests.support.checks import checks_server, client_from
from tests.support.e2e import queue_id, send_message, start_data, wait_delivered
from tests.support.fakedns import FakeDNS
from tests.support.rspamd import Rspamd, RspamdFailed
from tests.support.server import free_port

ALICE = "alice@example.test"
# rspamd's GTUBE pattern (rspamd.com/doc: "GTUBE"): the reject action, whatever the score
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
CLIENT, CLIENT_NAME = "192.0.2.10", "mail.sender.test"


def message(subject: str, body: str) -> bytes:
    return (f"From: Bob <bob@sender.test>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Date: Wed, 02 Dec 2026 03:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n").encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rspamd")
    dns = FakeDNS().start()
    dns.ptr(CLIENT, CLIENT_NAME)  # the fcrdns check confirms it: rspamd gets it as Hostname
    dns.a(CLIENT_NAME, CLIENT)
    dns.a("sender.test", CLIENT)
    rspamd = Rspamd(root / "rspamd", dns.address)
    try:
        rspamd.start()
    except RspamdFailed as exc:
        dns.stop()
        pytest.fail(f"rspamd could not start: {exc}", pytrace=False)
    checks = [{"type": "fcrdns"},
              {"type": "rspamd", "url": rspamd.url, "read_timeout": "10s", "mta_name": "mx.example.test",
               "required": True}]
    srv = checks_server(root / "geosmtp", dns, checks, {"metrics": {"address": f"127.0.0.1:{free_port()}"}})
    srv.start()
    yield srv, rspamd, dns
    srv.stop()
    rspamd.stop()
    dns.stop()


def test_gtube_is_rejected_at_end_of_data_and_nothing_queued(world):
    srv, rspamd, _dns = world
    before = {s: srv.queue_files(s) for s in ("incoming", "active", "deferred", "hold")}
    c = client_from(srv, CLIENT, ehlo=CLIENT_NAME)
    start_data(c, "bob@sender.test", [ALICE])
    c.send(message("gtube test", f"Hello.\r\n{GTUBE}") + b".\r\n")
    assert c.reply() == (550, ["5.7.1 Gtube pattern"])  # rspamd's smtp_message, our codes
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.cmd("QUIT")
    assert {s: srv.queue_files(s) for s in before} == before
    assert "check rspamd: data reject: rspamd reject" in srv.log()


def test_plain_message_is_delivered_with_its_score_and_rspamd_saw_the_envelope(world):
    srv, rspamd, _dns = world
    c = client_from(srv, CLIENT, ehlo=CLIENT_NAME)
    started = time.monotonic()
    qid = queue_id(send_message(c, "bob@sender.test", [ALICE],
                                message("lunch", "Hello Alice,\r\n\r\nlunch tomorrow at noon?\r\n\r\nBob")))
    took = time.monotonic() - started
    c.cmd("QUIT")
    got = wait_delivered(srv, ALICE, qid)
    head = got.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    score = re.search(r"^X-Spam-Score: (-?\d+\.\d\d)$", head, re.M)
    assert score, head
    assert float(score.group(1)) < 4  # under Debian's greylist threshold (4): "no action"
    assert "X-Spam-Flag" not in head
    assert head.index("X-Spam-Score:") < head.index("Received: from")  # in front, as every check's fields
    # rspamd heard the envelope from our request headers: queue id, sender, recipient, IP
    line = next((ln for ln in rspamd.log().splitlines() if f"qid: <{qid}>" in ln), None)
    assert line is not None, rspamd.tail()
    assert f"ip: {CLIENT}" in line and "from: <bob@sender.test>" in line
    assert f"rcpts: <{ALICE}>" in line
    assert "HFILTER_HOSTNAME_UNKNOWN" not in line  # the confirmed name went as Hostname
    assert took < 10


def test_a_big_message_is_streamed_from_its_file_and_delivered_with_its_score(world):
    srv, rspamd, _dns = world
    text = "\r\n".join(f"Line {i} of the minutes of the meeting, nothing to see here." for i in range(4000))
    body = message("minutes", f"Hello Alice,\r\n\r\n{text}\r\n\r\nBob")  # about 250 KB: spooled on disk
    assert len(body) > 200_000
    c = client_from(srv, CLIENT, ehlo=CLIENT_NAME)
    qid = queue_id(send_message(c, "bob@sender.test", [ALICE], body))
    c.cmd("QUIT")
    got = wait_delivered(srv, ALICE, qid)
    assert re.search(rb"^X-Spam-Score: -?\d+\.\d\d\r?$", got, re.M)
    assert got.rstrip().endswith(b"\nBob")  # all of it (the mailbox has LF line ends)
    line = next((ln for ln in rspamd.log().splitlines() if f"qid: <{qid}>" in ln), None)
    assert line is not None and "(no action)" in line, rspamd.tail()
    length = int(re.search(r"len: (\d+)", line).group(1))
    assert length > len(body)  # the whole message reached rspamd (our Received: in front)


def readyz(srv) -> tuple[int, str]:
    address = srv.config["metrics"]["address"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_readyz_is_ready_while_required_rspamd_answers(world):
    srv, _rspamd, _dns = world
    assert readyz(srv) == (200, "ready\n")


def test_rspamd_down_means_on_error_defer_and_unready_when_required(world, tmp_path):
    """Nothing listening at the url: the start logs it, the message gets the check's
    on_error (defer: 451 4.3.0), nothing is queued, the log says which check and why;
    required, /readyz says 503 and why."""
    _srv, _rspamd, dns = world
    url = f"http://127.0.0.1:{free_port()}"
    dead = checks_server(tmp_path, dns, [{"type": "rspamd", "url": url, "connect_timeout": "1s", "required": True}],
                         {"metrics": {"address": f"127.0.0.1:{free_port()}"}}).start()
    try:
        status, text = dead.wait_for(lambda: (r := readyz(dead))[0] == 503 and r, timeout=10)
        assert text == f"not ready: check rspamd: rspamd at {url} is not answering (cannot connect to {url}: " \
                       "Connection refused)\n"
        c = client_from(dead, CLIENT, ehlo=CLIENT_NAME)
        start_data(c, "bob@sender.test", [ALICE])
        c.send(message("down", "rspamd is down") + b".\r\n")
        assert c.reply() == (451, ["4.3.0 Temporary local problem, try again later"])
        c.cmd("QUIT")
        assert dead.queue_files("incoming") == [] and dead.queue_files("hold") == []
        log = dead.log()
        assert "is not answering" in log  # the /ping at start
        assert "check rspamd: data error (RspamdUnavailable: cannot connect" in log
    finally:
        dead.stop()
