"""End to end: `bin/geosmtp-queue` against a live server (list, show, summary, flush, hold,
release, requeue, delete, bounce), its exit codes, and use while the server delivers.

The module's server holds what arrives on its smtp listener (`hold = true`), delivers what
arrives on submission (AUTH as alice), and looks at the queue only when told: scan_interval is
60 s and the retry interval an hour, so anything that happens quickly after a command happened
because the command woke the server (SIGUSR1 to the pid in spool_dir/lock). Remote mail
defers: the test DNS server (127.0.0.1:9) never answers, after dns_timeout (2 s);
and mail to an address literal goes to a port that never answers (`stall`), so that an entry
stays in active/ for as long as a test needs.

Entries of a given age or state are also made directly with the Spool API, as a second process
would (the server never touches hold/, nor deferred/ entries due in an hour).
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.spool import STATES, Spool
from tests.support.e2e import maildir_files
from tests.support.fakemx import FakeMX, pick_port
from tests.support.server import PASSWORDS, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "bin" / "geosmtp-queue")]
ALICE = "alice@example.test"
NOSUCH = "NOSUCHID00000000000000"
MX = "127.0.0.10"
OVERRIDES = {
    "listeners": {"smtp": {"hold": True}, "submission": {"allow_plaintext_auth": True}},
    "queue": {"scan_interval": 60, "retry_schedule": ["1h"]},
}
_QUEUED = re.compile(rb"queued as (\S+)")


# -- helpers --------------------------------------------------------------------------------
def q(srv: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, "-c", str(srv.config_path), *args], capture_output=True, text=True,
                          timeout=30, input=stdin)


def q_parallel(srv: ServerProcess, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: q(srv, *args), commands))


def rows(result: subprocess.CompletedProcess) -> list[dict]:
    assert "Traceback" not in result.stderr, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def send(port: int, sender: str, rcpts: list[str], subject: str, login: bool = False,
         source: str | None = None) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0) if source else None) as c:
        if login:
            c.login(ALICE, PASSWORDS[ALICE])
        c.ehlo_or_helo_if_needed()
        assert c.mail(sender)[0] == 250
        for r in rcpts:
            assert c.rcpt(r)[0] == 250, r
        code, msg = c.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
        assert code == 250, msg
        return _QUEUED.search(msg).group(1).decode()


def held(srv: ServerProcess, sender: str, rcpts: list[str], subject: str) -> str:
    """Through the holding smtp listener, from a trusted address (so remote rcpts are fine)."""
    return send(srv.port, sender, rcpts, subject, source="127.0.0.2")


def submitted(srv: ServerProcess, rcpts: list[str], subject: str) -> str:
    return send(srv.submission_port, ALICE, rcpts, subject, login=True)


def park(srv: ServerProcess, *, sender: str, rcpts: list[str], age: float = 0.0, state: str = "hold",
         subject: str = "parked") -> str:
    """An entry made with the Spool API: in hold/, or in deferred/ due in an hour."""
    spool = Spool(srv.spool)
    data = f"Received: by test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()
    writer = spool.open_message()
    writer.write(data)
    env = Envelope(id=writer.id, created=time.time() - age, sender=sender,
                   recipients=[Recipient(a, a) for a in rcpts],
                   client=ClientInfo("192.0.2.1", helo="test", listener="test"), size=len(data))
    spool.commit(writer, env, hold=True)
    if state != "hold":
        assert spool.move(env.id, "hold", state, when=time.time() + 3600)
    return env.id


def state_of(srv: ServerProcess, qid: str) -> str | None:
    found = [s for s in STATES if (srv.spool / "queue" / s / qid).exists()]
    return found[0] if found else None


def gone(srv: ServerProcess, qid: str) -> bool:
    return state_of(srv, qid) is None and not (srv.spool / "msg" / qid).exists()


def envelope(srv: ServerProcess, qid: str) -> dict | None:
    for s in STATES:
        try:
            with open(srv.spool / "queue" / s / qid, "rb") as fh:
                return json.loads(fh.readline())
        except (FileNotFoundError, ValueError):
            continue
    return None


def delivered(srv: ServerProcess, address: str, marker: bytes) -> list[bytes]:
    return [m for m in srv.messages(address) if marker in m]


@pytest.fixture(scope="module")
def stall():
    """A "remote MX" at 127.0.0.3 that never answers: the kernel completes the handshake, nobody
    accepts, so mail to x@[127.0.0.3] stays in active/ waiting for a greeting until the socket
    is closed (the attempt then ends at once)."""
    sock = socket.socket()
    sock.bind(("127.0.0.3", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, stall):
    relay = {"port": stall.getsockname()[1], "command_timeout": 60}
    s = ServerProcess(tmp_path_factory.mktemp("queuectl"), {**OVERRIDES, "relay": relay}).start()
    yield s
    stall.close()
    s.stop()


@pytest.fixture(scope="module")
def deferred(srv):
    """Five messages from alice, delivered to bob and deferred for farN@remoteN.test (DNS
    fails; next attempt in an hour); each test that changes one has its own."""
    names = ["list", "state", "flush", "delete", "bounce"]
    ids = [submitted(srv, [f"far{i}@remote{i}.test", "bob@example.test"], f"deferred {i}") for i in range(len(names))]
    srv.wait_for(lambda: all(state_of(srv, qid) == "deferred" for qid in ids), timeout=15)
    return dict(zip(names, ids))


# -- reading --------------------------------------------------------------------------------
def test_list_shows_every_field_and_filters(srv, deferred):
    qid = deferred["list"]
    old = park(srv, sender="old@list.test", rcpts=["carol@other.test"], age=3 * 3600)
    young = park(srv, sender="", rcpts=[ALICE, "far@listdomain.test"])

    entries = {e["id"]: e for e in rows(q(srv, "list", "--json"))}
    e = entries[qid]
    assert e["state"] == "deferred" and e["sender"] == ALICE and e["size"] > 0
    assert e["arrival"] <= time.time() and 0 <= e["age"] < 60
    assert time.time() + 3000 < e["next_attempt"] <= time.time() + 3600  # retry_schedule 1h
    assert e["attempts"] == 1 and e["last_error"].startswith("451 4.4.3") and "DNS" in e["last_error"]
    assert {r["address"]: r["status"] for r in e["recipients"]} == {
        "far0@remote0.test": "pending", "bob@example.test": "delivered"}
    assert entries[old]["state"] == "hold" and entries[old]["age"] >= 3 * 3600
    assert entries[old]["next_attempt"] is None and entries[young]["sender"] == ""

    filters = {
        "deferred": ("--state", "deferred"),
        "two states": ("--state", "hold", "--state", "deferred"),
        "two domains": ("--domain", "REMOTE0.test", "--domain", "listdomain.test"),
        "example": ("--domain", "example.test"),
        "address": ("--sender", "<OLD@list.test>"),
        "null sender": ("--sender", "<>"),
        "older": ("--older-than", "2h"),
        "younger": ("--younger-than", "1h"),
        "all of them": ("--state", "hold", "--sender", "list.test", "--older-than", "1h"),  # a substring
    }
    results = q_parallel(srv, *(("list", "--json", *f) for f in filters.values()))
    for result in results:
        assert result.returncode == 0, result.stderr
    ids = {name: {row["id"] for row in rows(r)} for name, r in zip(filters, results)}
    assert qid in ids["deferred"] and old not in ids["deferred"] and young not in ids["deferred"]
    assert {old, young} <= ids["two states"]
    assert ids["two domains"] == {qid, young}
    assert young in ids["example"] and qid not in ids["example"]  # bob is delivered: qid waits for none there
    assert ids["address"] == {old}
    assert young in ids["null sender"] and old not in ids["null sender"]
    assert old in ids["older"] and young not in ids["older"] and qid not in ids["older"]
    assert {young, qid} <= ids["younger"] and old not in ids["younger"]
    assert ids["all of them"] == {old}

    text = q(srv, "list")
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(qid))
    block = "\n".join([lines[first], *itertools.takewhile(lambda line: line.startswith("    "), lines[first + 1:])])
    assert re.match(rf"{qid}\s+deferred\s+\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ\s+\d+s\s+\d+\s+<alice@example.test>$",
                    lines[first])
    assert "pending   <far0@remote0.test>  (451 4.4.3 DNS" in block
    assert "delivered <bob@example.test>" in block
    assert re.search(r"next attempt \S+ \S+ \(in (59m|1h)\); 1 attempt", block)
    assert re.search(rf"{old}  hold .* 3h .*<old@list.test>", text.stdout)
    assert re.search(rf"{young}  hold .*<>", text.stdout)
    assert re.search(r"-- \d+ entries\n$", text.stdout)


def test_show_prints_the_envelope_and_headers_or_the_whole_message(srv, deferred):
    qid = deferred["list"]
    text = q(srv, "show", qid)
    assert text.returncode == 0, text.stderr
    for want in (f"id:          {qid}", "state:       deferred", f"sender:      <{ALICE}>",
                 "listener=submission", "user=alice@example.test", "pending   <far0@remote0.test>",
                 "451 4.4.3", "delivered <bob@example.test>", "--- headers", "Subject: deferred 0",
                 f"with ESMTPA id {qid}"):
        assert want in text.stdout, want
    assert "body of deferred 0" not in text.stdout

    whole = q(srv, "show", "--body", qid)
    assert whole.returncode == 0 and "--- message" in whole.stdout
    assert whole.stdout.rstrip().endswith("body of deferred 0")

    [obj] = rows(q(srv, "show", "--json", qid))
    assert obj["id"] == qid and obj["state"] == "deferred" and obj["next_attempt"] > time.time()
    assert obj["envelope"]["id"] == qid and obj["envelope"]["client"]["auth_user"] == ALICE
    assert [h["name"] for h in obj["headers"]] == ["Received", "Subject"]
    assert obj["headers"][1]["value"] == "deferred 0" and "message" not in obj

    both = q(srv, "show", "--json", "--body", NOSUCH, qid)
    assert both.returncode == 1
    assert f"{NOSUCH}: no such message in the queue" in both.stderr
    [obj] = rows(both)  # the known id is still shown
    assert obj["message"].endswith("body of deferred 0\r\n") and obj["headers"][1]["value"] == "deferred 0"


def test_summary_counts_states_and_destinations_by_age(srv, deferred):
    for minutes in (1, 15, 50, 70, 300):
        park(srv, sender="s@shape.test", rcpts=["a@shape.test", "b@shape.test", "c@shape2.test"],
             age=minutes * 60, state="deferred")
    result, listing, text, held_only = q_parallel(
        srv, ("summary", "--json"), ("list", "--json"), ("summary",), ("summary", "--json", "--state", "hold"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["buckets"] == ["0-5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160m+"]
    row = summary["domains"]["shape.test"]
    assert row["messages"] == 5 and row["recipients"] == 10
    assert row["buckets"] == {"0-5m": 1, "5-10m": 0, "10-20m": 1, "20-40m": 0, "40-80m": 2, "80-160m": 0, "160m+": 1}
    assert summary["domains"]["shape2.test"]["messages"] == 5
    assert summary["domains"]["remote0.test"]["messages"] == 1
    listed = Counter(e["state"] for e in rows(listing))
    assert summary["states"] == {s: listed.get(s, 0) for s in STATES}
    assert summary["total"] == sum(listed.values())
    assert summary["all"]["messages"] >= 5 + len(deferred)

    assert text.returncode == 0
    assert re.search(r"^deferred\s+\d+$", text.stdout, re.M)
    header = next(line for line in text.stdout.splitlines() if line.startswith("domain"))
    assert header.split() == ["domain", "T", *summary["buckets"]]
    line = next(line for line in text.stdout.splitlines() if line.startswith("shape.test "))
    assert line.split()[1:] == ["5", "1", "0", "1", "0", "2", "0", "1"]
    assert next(line for line in text.stdout.splitlines() if line.split()[:1] == ["TOTAL"])

    held_only = json.loads(held_only.stdout)
    assert "shape.test" not in held_only["domains"] and held_only["states"] == summary["states"]


# -- changing -------------------------------------------------------------------------------
def test_hold_release_and_requeue_move_entries(srv, deferred):
    qid = deferred["state"]
    result = q(srv, "hold", qid, NOSUCH, "bad/../id")
    assert result.returncode == 1
    assert f"{qid}: held" in result.stdout
    assert f"{NOSUCH}: no such message in the queue" in result.stderr and "bad/../id: not a queue id" in result.stderr
    assert state_of(srv, qid) == "hold"
    again, flush = q_parallel(srv, ("hold", qid), ("flush", qid))
    assert again.returncode == 0 and "already held" in again.stdout
    assert flush.returncode == 1 and f"{qid}: cannot flush it: it is held (use release)" in flush.stderr

    parked = park(srv, sender="s@state.test", rcpts=["x@state.test"], state="deferred")
    parked_held = park(srv, sender="s@state.test", rcpts=["y@state.test"])
    not_held = q(srv, "release", parked, qid)
    assert not_held.returncode == 1 and f"{parked}: not held (it is in deferred/)" in not_held.stderr
    assert f"{qid}: released" in not_held.stdout and state_of(srv, qid) != "hold"
    # ids from stdin, as from `list --json | jq -r .id`
    requeued = q(srv, "requeue", "-", stdin=f"{parked}\n{parked_held}\n")
    assert requeued.returncode == 0, requeued.stderr
    assert f"{parked}: requeued" in requeued.stdout and f"{parked_held}: requeued" in requeued.stdout
    assert state_of(srv, parked) != "deferred" and state_of(srv, parked_held) != "hold"
    # the released entry goes through an attempt (woken) and is deferred again
    srv.wait_for(lambda: state_of(srv, qid) == "deferred", timeout=15)


def test_flush_retries_deferred_mail_at_once(srv, deferred):
    qid = deferred["flush"]
    assert envelope(srv, qid)["attempts"] == 1
    result = q(srv, "flush", qid, NOSUCH)
    assert result.returncode == 1 and f"{qid}: queued for delivery now" in result.stdout
    assert NOSUCH in result.stderr
    # the next scan is a minute away and the retry an hour: only the wake-up explains this
    srv.wait_for(lambda: (envelope(srv, qid) or {}).get("attempts") == 2 and state_of(srv, qid) == "deferred",
                 timeout=12)


def test_release_delivers_held_mail_at_once(srv):
    qid = held(srv, "x@remote.test", ["carol@other.test"], "release-now")
    assert state_of(srv, qid) == "hold"
    result = q(srv, "release", qid)
    assert result.returncode == 0 and f"{qid}: released" in result.stdout
    srv.wait_for(lambda: delivered(srv, "carol@other.test", b"release-now"), timeout=5)
    srv.wait_for(lambda: gone(srv, qid), timeout=5)


def test_requeue_takes_back_a_corrupt_entry_only_once_it_reads(srv):
    qid = held(srv, "x@remote.test", ["bob@example.test"], "was corrupt")
    hold, corrupt = srv.spool / "queue" / "hold" / qid, srv.spool / "queue" / "corrupt" / qid
    good = hold.read_bytes().partition(b"\n")[0] + b"\n"

    def replace(data: bytes) -> None:  # a new file: the entry is a second name of msg/<id>
        tmp = srv.root / "entry.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, corrupt)

    replace(json.dumps({"id": qid, "recipients": 5}).encode() + b"\n")
    hold.unlink()
    nomsg = park(srv, sender="s@corrupt.test", rcpts=["bob@example.test"])
    os.rename(srv.spool / "queue" / "hold" / nomsg, srv.spool / "queue" / "corrupt" / nomsg)
    (srv.spool / "msg" / nomsg).unlink()

    listed, shown, refused, *others = q_parallel(
        srv, ("list", "--json", "--state", "corrupt"), ("show", qid), ("requeue", qid, nomsg),
        ("flush", qid), ("bounce", qid), ("hold", qid), ("release", qid))
    [row] = [r for r in rows(listed) if r["id"] == qid]
    assert row["state"] == "corrupt" and "unreadable envelope" in row["error"]
    assert shown.returncode == 0 and "error:" in shown.stdout and '"recipients": 5' in shown.stdout
    assert "Subject: was corrupt" in shown.stdout  # msg/ is intact
    assert refused.returncode == 1
    assert f"{qid}: still corrupt: unreadable envelope" in refused.stderr
    assert f"{nomsg}: still corrupt: the message file is missing" in refused.stderr
    for other in others:
        assert other.returncode == 1 and qid in other.stderr, other.args
    assert state_of(srv, qid) == "corrupt" and state_of(srv, nomsg) == "corrupt"

    replace(good)
    fixed = q(srv, "requeue", qid)
    assert fixed.returncode == 0 and f"{qid}: requeued" in fixed.stdout
    srv.wait_for(lambda: delivered(srv, "bob@example.test", b"was corrupt"), timeout=5)
    assert q(srv, "delete", nomsg).returncode == 0 and gone(srv, nomsg)


def test_delete_in_any_state_also_while_being_delivered(srv, deferred, stall):
    h = held(srv, "x@remote.test", [ALICE], "to be deleted")
    d = deferred["delete"]
    result = q(srv, "delete", h, NOSUCH, d)
    assert result.returncode == 1
    assert f"{h}: deleted from hold/" in result.stdout and f"{d}: deleted from deferred/" in result.stdout
    assert f"{NOSUCH}: no such message in the queue" in result.stderr
    assert gone(srv, h) and gone(srv, d)
    assert q(srv, "delete", h).returncode == 1  # twice: unknown now

    # in active/ until the stalled MX is closed: everything but delete and flush answers busy
    a = submitted(srv, ["x@[127.0.0.3]"], "deleted while active")
    srv.wait_for(lambda: state_of(srv, a) == "active", timeout=5, interval=0.01)
    flushed, *busy = q_parallel(srv, ("flush", a), ("hold", a), ("bounce", a), ("requeue", a))
    assert state_of(srv, a) == "active"
    for r in busy:
        assert r.returncode == 1 and f"{a}: busy: being delivered now" in r.stderr, r.stderr
    assert flushed.returncode == 0 and flushed.stdout == f"{a}: being delivered now\n", flushed.stderr
    deleted = q(srv, "delete", a)
    assert deleted.returncode == 0 and f"{a}: deleted from active/ (it was being delivered" in deleted.stdout
    assert gone(srv, a)
    stall.close()  # the attempt ends: the queue manager finds its entry gone
    srv.wait_for(lambda: "entry removed during delivery" in srv.log(), timeout=10)
    time.sleep(0.2)
    assert gone(srv, a), "the end of the attempt brought the entry back"
    assert srv.proc.poll() is None
    assert a not in q(srv, "list").stdout


def test_bounce_returns_mail_to_its_sender(srv, deferred):
    h = held(srv, ALICE, ["far@bounced.test", "carol@other.test"], "bounce held")
    d = deferred["bounce"]
    result = q(srv, "bounce", "--reason", "spam\nrun", h, NOSUCH, d)
    assert result.returncode == 1
    assert f"{h}: returned to sender" in result.stdout and f"{d}: returned to sender" in result.stdout
    assert f"{NOSUCH}: no such message in the queue" in result.stderr

    def notices():
        found = {}
        for m in srv.messages(ALICE):
            for qid in (h, d):
                if b"Undelivered Mail Returned to Sender" in m and f"Queue ID: {qid}".encode() in m:
                    found[qid] = m
        return found if len(found) == 2 else None

    dsn = srv.wait_for(notices, timeout=10)
    for qid in (h, d):
        assert b"Status: 5.0.0" in dsn[qid] and b"spam run" in dsn[qid]
    assert b"Final-Recipient: rfc822; far@bounced.test" in dsn[h]
    assert b"Final-Recipient: rfc822; carol@other.test" in dsn[h]
    assert b"far4@remote4.test" in dsn[d] and b"Final-Recipient: rfc822; bob@example.test" not in dsn[d]
    srv.wait_for(lambda: gone(srv, h) and gone(srv, d), timeout=5)
    assert not delivered(srv, "carol@other.test", b"bounce held")


def test_flush_of_a_message_in_flight_answers_that_it_is_being_delivered(make_server):
    """The MX holds its reply to the final dot until the test opens the gate: the message is
    in active/, its data sent. flush is what the operator wants and is under way: exit 0,
    nothing moved; the attempt then ends with one delivery."""
    gate = threading.Event()
    with FakeMX(MX, pick_port([MX])) as mx:
        mx.final_reply = lambda msg: "250 2.0.0 Ok: queued" if gate.wait(15) else "451 4.3.0 gate shut"
        srv = make_server({"relay": {"port": mx.port, "command_timeout": 20, "data_timeout": 20},
                           "queue": {"retry_schedule": ["1h"]}})
        qid = send(srv.port, ALICE, [f"far@[{MX}]"], "in flight", source="127.0.0.2")
        mx.wait_for(lambda: mx.transactions, timeout=10)  # the dot is in; no reply yet
        try:
            assert state_of(srv, qid) == "active"
            result = q(srv, "flush", qid)
            hold = q(srv, "hold", qid)
            assert state_of(srv, qid) == "active"
        finally:
            gate.set()
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{qid}: being delivered now\n" and result.stderr == ""
        assert hold.returncode == 1 and f"{qid}: busy: being delivered now; try again to hold it" in hold.stderr
        [msg] = mx.wait_for_messages(1)
        assert b"Subject: in flight" in msg.data
        srv.wait_for(lambda: gone(srv, qid), timeout=10)
        assert len(mx.transactions) == 1


# -- without a server -----------------------------------------------------------------------
def _process(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_without_a_server_changes_apply_and_nothing_is_signalled(tmp_path):
    srv = ServerProcess(tmp_path)  # its configuration only: never started
    Spool(srv.spool).setup()
    lock = srv.spool / "lock"
    h1, h2, h3 = (park(srv, sender="s@x.test", rcpts=[f"r{i}@y.test"]) for i in range(3))
    d1, d2 = (park(srv, sender="s@x.test", rcpts=[f"d{i}@y.test"], state="deferred") for i in range(2))
    victim = subprocess.Popen(["sleep", "30"])  # SIGUSR1 would kill it
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    catcher = _process(  # stands in for the server; its command line names geosmtp
        "import signal, time, pathlib  # geosmtp\n"
        f"signal.signal(signal.SIGUSR1, lambda *a: pathlib.Path({str(caught)!r}).touch())\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(30)\n")
    try:
        # no lock file at all
        assert q(srv, "release", h1).returncode == 0 and state_of(srv, h1) == "incoming"
        # a stale pid in a lock nobody holds: not signalled
        lock.write_text(f"{victim.pid}\n")
        result = q(srv, "requeue", h2)
        assert result.returncode == 0 and result.stderr == ""
        # the lock is held, but the pid is not a geosmtp: not signalled
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert q(srv, "release", "--all").returncode == 0 and state_of(srv, h3) == "incoming"
        time.sleep(0.2)
        assert victim.poll() is None
        # garbage in the lock file: quietly nothing
        os.pwrite(fd, b"not a pid\n", 0)
        garbage = q(srv, "flush", d1)
        assert garbage.returncode == 0 and garbage.stderr == "" and state_of(srv, d1) == "incoming"
        # held, with a geosmtp's pid: flush (all deferred) signals it
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.025)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{catcher.pid}\n".encode(), 0)
        flushed = q(srv, "flush")
        assert flushed.returncode == 0 and f"{d2}: queued for delivery now" in flushed.stdout
        assert state_of(srv, d2) == "incoming"
        for _ in range(200):
            if caught.exists():
                break
            time.sleep(0.025)
        assert caught.exists(), "flush did not signal the lock's holder"
        assert q(srv, "flush").stdout == "nothing deferred\n"
        os.close(fd)
        assert victim.poll() is None
    finally:
        victim.kill()
        catcher.kill()
        victim.wait(5)
        catcher.wait(5)

    # bounce only marks the entry and puts it in incoming/: the queue manager sends the notice
    h4 = park(srv, sender="s@x.test", rcpts=["a@y.test", "b@y.test"], subject="marked")
    marked = q(srv, "bounce", "--reason", "  spam\r\nrun\x01 ", h4)
    assert marked.returncode == 0, marked.stderr
    assert state_of(srv, h4) == "incoming"
    env = envelope(srv, h4)
    assert env["extra"]["return_to_sender"] == "spam run"
    assert [r["status"] for r in env["recipients"]] == ["pending", "pending"]
    assert q(srv, "show", "--body", h4).stdout.rstrip().endswith("body of marked")
    nobody = park(srv, sender="", rcpts=["a@y.test"])
    assert "no notice is sent" in q(srv, "bounce", nobody).stdout
    held_all = q(srv, "hold", "--all")
    assert held_all.returncode == 0 and len(os.listdir(srv.spool / "queue" / "hold")) == 7
    assert q(srv, "delete", h4, d1).returncode == 0 and gone(srv, h4) and gone(srv, d1)


# -- usage ----------------------------------------------------------------------------------
def test_bad_usage_or_configuration_exits_2(srv, tmp_path):
    nospool = ServerProcess(tmp_path / "fresh")  # a valid configuration whose spool does not exist
    config = ["-c", str(srv.config_path)]
    commands = [[*config, "hold"], [*config, "release"], [*config, "delete"], [*config, "hold", "--all", NOSUCH],
                [*config, "list", "--older-than", "soon"], [*config, "list", "--state", "nowhere"],
                [*config, "frobnicate"], ["-c", str(tmp_path / "none.toml"), "list"],
                ["-c", str(nospool.config_path), "list"], [*config, "--help"]]
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda args: subprocess.run([*TOOL, *args], capture_output=True, text=True,
                                                             timeout=30), commands))
    *usage, missing, fresh, helped = results
    for result in usage:
        assert result.returncode == 2, (result.args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    assert missing.returncode == 2 and "none.toml" in missing.stderr
    assert fresh.returncode == 2 and "no spool there" in fresh.stderr
    assert helped.returncode == 0
    assert "Exit status" in helped.stdout and "2  bad usage or configuration" in helped.stdout
    for command in ("list", "show", "summary", "flush", "hold", "release", "requeue", "delete", "bounce"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.M), command


# -- concurrency ----------------------------------------------------------------------------
def test_concurrent_use_while_the_server_delivers(make_server):
    """Messages for bob (local, delivered at the first attempt) and a remote domain (deferred
    after 2 s of DNS) arrive while several commands run at once, round after round. In the end
    every message is in deferred/, bob has each exactly once, and nothing crashed."""
    srv = make_server({"queue": {"retry_schedule": ["1h"]}})
    sent: list[str] = []
    errors: list[BaseException] = []

    def sender():
        try:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
                c.ehlo()
                for i in range(30):
                    assert c.mail("x@remote.test")[0] == 250
                    assert c.rcpt("bob@example.test")[0] == 250
                    assert c.rcpt(f"far@busy{i % 3}.test")[0] == 250
                    code, msg = c.data(f"Subject: busy {i}\r\n\r\nbusy {i}\r\n".encode())
                    assert code == 250
                    sent.append(_QUEUED.search(msg).group(1).decode())
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    def met(results) -> int:
        return sum(r.stdout.count(": held") + r.stdout.count(": released") + r.stdout.count(": requeued")
                   + r.stdout.count(": queued for delivery now") for r in results)

    thread = threading.Thread(target=sender)
    thread.start()
    results = []
    rounds = 0
    deadline = time.monotonic() + 25
    # rounds while the messages come, and until the commands have met some (a fast delivery
    # may leave them nothing to act on until the deferrals)
    while (thread.is_alive() or rounds < 3 or met(results) < 5) and time.monotonic() < deadline:
        results += q_parallel(srv, ("hold", "--all"), ("release", "--all"), ("flush",), ("requeue", "--all"),
                              ("list", "--json"))
        rounds += 1
    thread.join(20)
    assert not errors and len(sent) == 30
    for r in results:
        assert r.returncode in (0, 1), (r.args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 1:  # only ever a race with the server or with the other commands
            for line in r.stderr.splitlines():
                assert re.search(r": (busy|not held|no such message|cannot \w+ it: it is held)", line), line
        if "--json" in r.args:
            [json.loads(line) for line in r.stdout.splitlines()]
    assert met(results) >= 5, "the commands never met the messages"
    final = q(srv, "release", "--all")
    assert final.returncode == 0, final.stderr

    def settled():
        return all(state_of(srv, qid) == "deferred" for qid in sent) and not srv.queue_files("incoming") \
            and not srv.queue_files("active")

    srv.wait_for(settled, timeout=15)
    counts = Counter(re.search(r"\.Q([0-9A-Za-z]+)R\d+\.", name).group(1)
                     for name in maildir_files(srv, "bob@example.test"))
    assert set(counts) == set(sent) and set(counts.values()) == {1}, "lost or duplicated"
    for qid in sent:
        statuses = {r["address"]: r["status"] for r in envelope(srv, qid)["recipients"]}
        assert statuses["bob@example.test"] == "delivered" and list(statuses.values()).count("pending") == 1
    assert srv.proc.poll() is None
    log = srv.log()
    assert "delivery failed" not in log and "Traceback" not in log and "cannot defer" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_keeps_the_spool_readable_for_the_servers_user(tmp_path):
    """Run as root on a spool owned by the server's user (nobody here): what the tool writes
    belongs to that user, never root-owned 0600 files the server could not read."""
    srv = ServerProcess(tmp_path)  # its configuration only
    Spool(srv.spool).setup()
    qid = park(srv, sender="s@x.test", rcpts=["r@y.test"])
    nobody = (65534, 65534)
    for path in [srv.spool, *srv.spool.rglob("*")]:
        os.chown(path, *nobody)
    assert q(srv, "bounce", qid, "--reason", "ownership test").returncode == 0
    files = [p for p in srv.spool.rglob("*") if p.is_file() and p.name != "lock"]
    assert any(p.parent.name == "incoming" for p in files), files  # rewritten and moved on
    assert {(p.stat().st_uid, p.stat().st_gid) for p in files} == {nobody}
