"""geosmtp.envelope's one-line JSON round trip, geosmtp.queue.next_delay, and the queue
manager delivering from a real spool."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp.delivery import local
from geosmtp.envelope import DELIVERED, FAILED, PENDING, ClientInfo, Envelope, Recipient
from geosmtp.config import QueueConfig
from geosmtp.queue import QueueManager, next_delay
from geosmtp.delivery.target import NO_ROUTE, Outcome, Router
from geosmtp.replies import Reply
from geosmtp.spool import SPILL_SIZE, Spool


def full_envelope() -> Envelope:
    return Envelope(
        id="0123456789ABCDEF0123",
        created=1_700_000_000.123456,
        sender="ü@bücher.test",
        recipients=[
            Recipient("alice@example.test", "team@example.test"),
            Recipient("bob@example.test", "team@example.test", DELIVERED, 1, "250 2.0.0 Delivered", 1_700_000_100.5),
            Recipient("x@remote.test", "x@remote.test", FAILED, 3, "550 5.1.1 no", None),
        ],
        client=ClientInfo("2001:db8::1", helo="client.test", listener="submission", auth_user="alice",
                          tls="TLSv1.3 TLS_AES_256_GCM_SHA384"),
        size=12345,
        body="8BITMIME",
        smtputf8=True,
        attempts=2,
        last_attempt=1_700_000_200.0,
        extra={"dkim": {"selector": "s1"}, "list": [1, 2]},
    )


def test_round_trip_every_field():
    envelope = full_envelope()
    assert Envelope.from_line(envelope.to_line()) == envelope


def test_round_trip_defaults_and_null_sender():
    envelope = Envelope("0123456789ABCDEF", 0.0, "", [Recipient("a@b.test", "a@b.test")], ClientInfo("192.0.2.1"))
    back = Envelope.from_line(envelope.to_line())
    assert back == envelope
    assert back.sender == "" and back.body == "7BIT" and back.extra == {} and back.recipients[0].status == PENDING


def test_line_is_compact_utf8_and_readable():
    raw = full_envelope().to_line()
    assert "ü@bücher.test".encode() in raw  # not \u-escaped: a person reads these files
    assert b": " not in raw and b", " not in raw
    data = json.loads(raw)
    assert data["recipients"][1]["status"] == "delivered"
    assert data["client"]["auth_user"] == "alice"


def test_to_line_is_exactly_one_line():
    envelope = full_envelope()
    # newlines inside any string must not split the line
    envelope.sender = "a\nb\r\nc"
    envelope.recipients[0].last_reply = "451 4.0.0 one\ntwo"
    envelope.client.helo = "x\u2028y\u0085z\rw"
    envelope.extra = {"k\n": "v\n", "nested": {"\n": ["\n"]}}
    line = envelope.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    assert Envelope.from_line(line) == envelope
    assert Envelope.from_line(line[:-1]) == envelope  # the line end is optional


def test_to_dict_has_every_field():
    # to_dict() is written out by hand: a field added to the dataclasses must be added there
    envelope = full_envelope()
    assert envelope.to_dict() == asdict(envelope)
    assert json.loads(envelope.to_line()) == envelope.to_dict()


def test_pending():
    assert [r.address for r in full_envelope().pending()] == ["alice@example.test"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("id"),
        lambda d: d.update(unknown=1),
        lambda d: d["recipients"][0].pop("address"),
        lambda d: d["client"].update(colour="blue"),
        lambda d: d.pop("recipients"),
        lambda d: d.pop("client"),
        lambda d: d.update(recipients=5),
        lambda d: d.update(recipients=[5]),
        lambda d: d.update(recipients="ab"),
        lambda d: d.update(client=[]),
        lambda d: d.update(client={}),
    ],
)
def test_from_line_refuses_a_wrong_shape(mutate):
    data = json.loads(full_envelope().to_line())
    mutate(data)
    with pytest.raises((TypeError, KeyError)):
        Envelope.from_line(json.dumps(data).encode())


@pytest.mark.parametrize(
    "raw",
    [b"", b"\n", b"{", b"\xff", b"{}", b"{}\n", b"[]", b"null", b'"x"', b"1", b"{} {}",
     b"[" * 100_000, b'{"a":' * 100_000],  # absurd nesting: a ValueError, not a RecursionError
    ids=["empty", "blank", "open-brace", "not-utf8", "empty-object", "placeholder", "array", "null", "string",
         "number", "two-objects", "deep-array", "deep-object"],
)
def test_from_line_garbage(raw):
    # the spool moves these to corrupt/: every failure must be one of the errors it catches
    with pytest.raises((ValueError, TypeError, KeyError)):
        Envelope.from_line(raw)


@pytest.mark.parametrize("raw", [b"[]", b"null", b'"x"', b"1", b"true", b"[{}]"])
def test_from_line_non_object_is_a_value_error(raw):
    with pytest.raises(ValueError, match="JSON object"):
        Envelope.from_line(raw)


_text = st.text(max_size=30)
_opt_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)
_recipient = st.builds(Recipient, _text, _text, st.sampled_from([PENDING, DELIVERED, FAILED]),
                       st.integers(0, 100), st.none() | _text, _opt_float)
_client = st.builds(ClientInfo, _text, st.none() | _text, st.none() | _text, st.none() | _text, st.none() | _text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.builds(Envelope, _text, st.floats(allow_nan=False, allow_infinity=False), _text,
                 st.lists(_recipient, max_size=5), _client, st.integers(0, 10**12),
                 st.sampled_from(["7BIT", "8BITMIME"]), st.booleans(), st.integers(0, 100), _opt_float,
                 st.dictionaries(_text, st.none() | st.integers() | _text, max_size=3)))
def test_round_trip_property(envelope):
    line = envelope.to_line()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert Envelope.from_line(line) == envelope


# -- next_delay ---------------------------------------------------------------------------
SCHEDULE = (300.0, 600.0, 1200.0)


@pytest.mark.parametrize(
    "attempts, delay",
    [(0, 300.0), (1, 300.0), (2, 600.0), (3, 1200.0), (4, 1200.0), (100, 1200.0), (-1, 300.0)],
)
def test_next_delay(attempts, delay):
    # the last interval repeats (RFC 5321 4.5.4.1: keep retrying until the lifetime ends)
    assert next_delay(SCHEDULE, attempts) == delay


def test_next_delay_single_interval():
    assert [next_delay([60.0], n) for n in range(5)] == [60.0] * 5


# -- QueueManager with a real spool -------------------------------------------------------
LOCAL_DOMAINS = frozenset({"example.test"}).__contains__  # the directory's is_local
MESSAGE = b"Received: by mx.example.test\r\nSubject: q\r\n\r\nbody\r\n"


@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


class FakeLocal:
    """Reads the message through open_body, as Maildir delivery does, and answers `reply`."""

    def __init__(self, reply: Reply = local.DELIVERED):
        self.reply = reply
        self.calls: list[tuple] = []

    kind = "maildir"

    def destination(self, domain):
        return "local"

    def deliver(self, destination, msg, open_body):
        out = []
        for index in msg.slots:
            with open_body() as fh:
                data = fh.read()
            self.calls.append((msg.id, index, open_body, data, msg.redelivery))
            out.append(Outcome(self.reply))
        return out


def enqueue(spool: Spool, data: bytes = MESSAGE, rcpts=("alice@example.test",), extra=None) -> Envelope:
    writer = spool.open_message()
    for i in range(0, len(data), 4096):
        writer.write(data[i:i + 4096])
    envelope = Envelope(writer.id, time.time(), "s@remote.test", [Recipient(r, r) for r in rcpts],
                        ClientInfo("192.0.2.1"), size=len(data), extra=dict(extra or {}))
    spool.commit(writer, envelope)
    return envelope


def files_under(root) -> list[str]:
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def deliver(qm: QueueManager, qid: str, state: str = "incoming") -> None:
    assert qm.spool.claim(qid, state)
    qm.deliver(qid)


@pytest.mark.parametrize("data", [MESSAGE, MESSAGE + b"x" * (2 * SPILL_SIZE)], ids=["small", "spilled"])
def test_queue_delivers_the_message_without_its_envelope_line(spool, tmp_path, data):
    maildir = local.MaildirDelivery(tmp_path / "mail", "mx.example.test", frozenset({"alice@example.test"}).__contains__)
    qm = QueueManager(spool, Router(maildir, LOCAL_DOMAINS))
    envelope = enqueue(spool, data)
    deliver(qm, envelope.id)
    [delivered] = (maildir.mailbox("alice@example.test") / "new").iterdir()
    assert delivered.read_bytes() == (
        b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n" + data.replace(b"\r\n", b"\n")
    )
    def left() -> list[str]:  # what is not a spare (the message file, emptied, is kept as one)
        return [f for f in files_under(spool.root) if not f.startswith("spare/")]

    deadline = time.monotonic() + 5  # a message of its own goes once the entry's removal is flushed
    while left() and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert left() == []  # done: entry and message gone


def test_queue_loads_through_run_and_passes_open_body(tmp_path):
    jobs = []

    def run(fn, *args):
        jobs.append(args)
        return fn(*args)

    s = Spool(tmp_path / "spool", run=run)
    s.setup()
    fake = FakeLocal()
    qm = QueueManager(s, Router(fake, LOCAL_DOMAINS))
    envelope = enqueue(s, rcpts=("alice@example.test", "bob@example.test"))
    jobs.clear()
    deliver(qm, envelope.id)
    assert jobs[0] == ([envelope.id],)  # the envelope is read off the hub, in a batch of reads
    assert [(c[0], c[1], c[3], c[4]) for c in fake.calls] == [
        (envelope.id, 0, MESSAGE, False), (envelope.id, 1, MESSAGE, False)]
    open_body = fake.calls[0][2]
    assert isinstance(open_body, partial) and open_body.func == s.open_body and open_body.args == (envelope.id,)


def test_queue_defers_with_progress_and_delivers_from_the_rewritten_entry(spool):
    fake = FakeLocal()
    qm = QueueManager(spool, Router(fake, LOCAL_DOMAINS), QueueConfig(retry_schedule=[300.0]))
    envelope = enqueue(spool, rcpts=("alice@example.test", "someone@remote.test"))
    qid = envelope.id
    before = time.time()
    deliver(qm, qid)
    assert spool.ids("deferred") == [qid]
    entry, msg = spool.entry_path(qid, "deferred"), spool.message_path(qid)
    assert os.stat(entry).st_mtime >= before + 299
    assert os.stat(msg).st_nlink == 1 and os.stat(entry).st_ino != os.stat(msg).st_ino
    saved = spool.load(qid, "deferred")
    assert saved.attempts == 1
    assert [(r.status, r.attempts) for r in saved.recipients] == [(DELIVERED, 1), (PENDING, 1)]
    assert saved.recipients[1].last_reply == str(NO_ROUTE)
    # the next attempt reads the envelope from the standalone entry and the message still
    # from msg/<id>, whose stale first line is skipped
    fake.reply = local.MAILBOX_ERROR
    deliver(qm, qid, "deferred")
    assert spool.load(qid, "deferred").attempts == 2
    assert [c[3] for c in fake.calls] == [MESSAGE]  # alice is not delivered twice
    assert sorted(files_under(spool.root)) == [f"msg/{qid}", f"queue/deferred/{qid}"]


def test_queue_moves_an_unreadable_entry_to_corrupt(spool):
    qm = QueueManager(spool, Router(FakeLocal(), LOCAL_DOMAINS))
    qid = "0123456789ABCDEF"
    with open(spool.entry_path(qid, "incoming"), "wb") as fh:
        fh.write(b"{not json\nReceived: x\r\n\r\n")
    deliver(qm, qid)
    assert spool.ids("corrupt") == [qid] and spool.ids("active") == []


def test_queue_missing_message_file_parks_the_entry_in_corrupt(spool, tmp_path):
    # the file will not come back: retrying for days would only hide it from the operator
    maildir = local.MaildirDelivery(tmp_path / "mail", "mx.example.test", frozenset({"alice@example.test"}).__contains__)
    qm = QueueManager(spool, Router(maildir, LOCAL_DOMAINS))
    envelope = enqueue(spool)
    assert spool.claim(envelope.id)
    spool.update(envelope)  # a standalone entry, so unlinking msg/<id> really loses the file
    os.unlink(spool.message_path(envelope.id))
    qm.deliver(envelope.id)
    assert spool.ids("corrupt") == [envelope.id] and spool.ids("deferred") == []


def test_queue_ignores_an_entry_that_vanished(spool):
    qm = QueueManager(spool, Router(FakeLocal(), LOCAL_DOMAINS))
    qm.deliver("0123456789ABCDEF")  # e.g. claimed, then removed by an operator
    assert files_under(spool.root) == []


class FakeRelay:
    """A smarthost: every domain goes to one destination; refuses every recipient."""

    kind = "relay"

    def __init__(self):
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def destination(self, domain):
        return "smart.test"

    def deliver(self, destination, msg, open_body):
        self.calls.append((destination, msg.recipients))
        return [Outcome(Reply(550, "5.1.1", "unknown"), "smart.test[192.0.2.9]", "none")] * len(msg.recipients)


def notice_headers(spool: Spool, qid: str) -> bytes:
    """The returned header section (part 3) of the one notice spooled besides `qid`."""
    [notice] = [i for i in spool.ids("incoming") if i != qid]
    with spool.open_body(notice) as fh:
        return fh.read().split(b"text/rfc822-headers", 1)[1]


@pytest.mark.parametrize("route", ["remote", "local"])
def test_the_bounce_returns_the_header_section_as_sent_or_written(spool, route):
    relay = FakeRelay()
    qm = QueueManager(spool, Router(FakeLocal(Reply(550, "5.2.1", "mailbox disabled")), LOCAL_DOMAINS, relay))
    rcpts = ("a@one.test", "b@two.test") if route == "remote" else ("alice@example.test",)
    envelope = enqueue(spool, rcpts=rcpts, extra={"dkim": "DKIM-Signature: v=1; d=remote.test; b=sig\r\n"})
    deliver(qm, envelope.id)
    returned = notice_headers(spool, envelope.id)
    if route == "remote":
        assert relay.calls == [("smart.test", rcpts)]  # one transaction for both domains
        assert b"\r\n\r\nDKIM-Signature: v=1; d=remote.test; b=sig\r\nReceived: by mx.example.test\r\n" in returned
    else:  # the local copy was written with the same prefix (the target contract)
        assert relay.calls == []
        assert b"\r\n\r\nDKIM-Signature: v=1; d=remote.test; b=sig\r\nReceived: by mx.example.test\r\n" in returned
