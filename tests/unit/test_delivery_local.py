"""geosmtp.delivery.local: Maildir delivery into a real directory tree.

deliver() gets the message as `open_body`, a callable returning a binary file positioned at
the message (the queue passes functools.partial(spool.open_body, qid)).
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp import safeio
from geosmtp.delivery import local
from geosmtp.delivery.local import (
    COPY_CHUNK,
    DELIVERED,
    MAILBOX_ERROR,
    MAILBOX_FULL,
    NO_MAILBOX,
    MaildirDelivery,
    copy_as_lf,
    maildir_name,
)
from geosmtp.delivery.target import Message
from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.spool import SPILL_SIZE, Spool

USERS = frozenset({"alice@example.test", "bob@example.test"})
MESSAGE = b"Received: by mx.example.test\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"


def make_envelope(rcpts=("alice@example.test",), sender="s@remote.test", qid="0123456789ABCDEF01") -> Envelope:
    return Envelope(
        id=qid,
        created=1_700_000_000.5,
        sender=sender,
        recipients=[Recipient(r, r) for r in rcpts],
        client=ClientInfo("192.0.2.1"),
    )


class Opener:
    """An `open_body`: opens the spooled message file; remembers what it opened."""

    def __init__(self, path: Path):
        self.path = path
        self.opened: list = []

    def __call__(self):
        fh = open(self.path, "rb")
        self.opened.append(fh)
        return fh


@pytest.fixture
def message(tmp_path) -> Opener:
    path = tmp_path / "msg"
    path.write_bytes(MESSAGE)
    return Opener(path)


@pytest.fixture
def maildir(tmp_path) -> MaildirDelivery:
    return MaildirDelivery(tmp_path / "mail", "mx.example.test", USERS.__contains__)


def deliver_one(maildir: MaildirDelivery, envelope: Envelope, index: int, open_body, redelivery: bool):
    """The reply for envelope.recipients[index] from the target's deliver()."""
    msg = Message(sender=envelope.sender, recipients=(envelope.recipients[index].address,), id=envelope.id,
                  created=envelope.created, slots=(index,), redelivery=redelivery)
    [outcome] = maildir.deliver("maildir", msg, open_body)
    return outcome.reply


def box(maildir: MaildirDelivery, address: str, sub: str) -> list[Path]:
    d = maildir.mailbox(address) / sub
    return sorted(d.iterdir()) if d.is_dir() else []


# -- deliver ------------------------------------------------------------------------------
def test_deliver_writes_lf_file_with_headers(maildir, message):
    envelope = make_envelope()
    assert deliver_one(maildir, envelope, 0, message, redelivery=False) == DELIVERED
    root = maildir.root / "example.test" / "alice"
    assert {p.name for p in root.iterdir()} == {"tmp", "new", "cur"}
    [delivered] = box(maildir, "alice@example.test", "new")
    assert delivered.name == maildir_name(envelope, 0, "mx.example.test")
    assert delivered.read_bytes() == (
        b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    )
    assert b"\r" not in delivered.read_bytes()
    assert box(maildir, "alice@example.test", "tmp") == []
    assert DELIVERED.code == 250


def test_null_sender_return_path(maildir, message):
    deliver_one(maildir, make_envelope(sender=""), 0, message, redelivery=False)
    [delivered] = box(maildir, "alice@example.test", "new")
    assert delivered.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n")


def test_recipient_case_is_folded_for_the_mailbox(maildir, message):
    envelope = make_envelope(rcpts=("Alice@Example.TEST",))
    assert deliver_one(maildir, envelope, 0, message, redelivery=False) == DELIVERED
    assert len(box(maildir, "alice@example.test", "new")) == 1


def test_each_recipient_gets_its_own_file(maildir, message):
    envelope = make_envelope(rcpts=("alice@example.test", "bob@example.test", "alice@example.test"))
    for index in range(3):
        assert deliver_one(maildir, envelope, index, message, redelivery=False) == DELIVERED
    assert len(box(maildir, "alice@example.test", "new")) == 2
    assert len(box(maildir, "bob@example.test", "new")) == 1


def test_same_delivery_twice_leaves_one_file(maildir, message):
    # a delivery repeated after a crash renames over its own copy
    envelope = make_envelope()
    for _ in range(2):
        assert deliver_one(maildir, envelope, 0, message, redelivery=True) == DELIVERED
    assert len(box(maildir, "alice@example.test", "new")) == 1
    assert box(maildir, "alice@example.test", "tmp") == []


def test_stale_tmp_file_from_a_crash_is_replaced(maildir, message):
    envelope = make_envelope()
    deliver_one(maildir, envelope, 0, message, redelivery=False)
    name = maildir_name(envelope, 0, maildir.hostname)
    (maildir.mailbox("alice@example.test") / "tmp" / name).write_bytes(b"half")
    assert deliver_one(maildir, envelope, 0, message, redelivery=True) == DELIVERED
    assert box(maildir, "alice@example.test", "tmp") == []
    assert (maildir.mailbox("alice@example.test") / "new" / name).read_bytes().endswith(b"line two\n")


@pytest.mark.parametrize("suffix", [":2,S", ":2,", ":2,RS", ""])
def test_redelivery_skips_a_message_already_seen(maildir, message, suffix):
    envelope = make_envelope()
    deliver_one(maildir, envelope, 0, message, redelivery=False)
    [new] = box(maildir, "alice@example.test", "new")
    new.rename(new.parent.parent / "cur" / (new.name + suffix))  # the mail reader moved it
    assert deliver_one(maildir, envelope, 0, message, redelivery=True) == DELIVERED
    assert box(maildir, "alice@example.test", "new") == []
    assert len(box(maildir, "alice@example.test", "cur")) == 1


def test_redelivery_is_not_fooled_by_a_name_prefix(maildir, message):
    # recipient 1 must not be skipped because recipient 10's file is in cur/
    envelope = make_envelope(rcpts=["alice@example.test"] * 11)
    deliver_one(maildir, envelope, 10, message, redelivery=False)
    [new] = box(maildir, "alice@example.test", "new")
    new.rename(new.parent.parent / "cur" / (new.name + ":2,S"))
    assert deliver_one(maildir, envelope, 1, message, redelivery=True) == DELIVERED
    assert [p.name for p in box(maildir, "alice@example.test", "new")] == [maildir_name(envelope, 1, maildir.hostname)]


def test_first_delivery_ignores_cur(maildir, message):
    envelope = make_envelope()
    deliver_one(maildir, envelope, 0, message, redelivery=False)
    [new] = box(maildir, "alice@example.test", "new")
    new.rename(new.parent.parent / "cur" / (new.name + ":2,S"))
    assert deliver_one(maildir, envelope, 0, message, redelivery=False) == DELIVERED
    assert len(box(maildir, "alice@example.test", "new")) == 1


@pytest.mark.parametrize("rcpt", ["nobody@example.test", "alice@other.test", "alice"])
def test_unknown_user(maildir, message, rcpt):
    assert deliver_one(maildir, make_envelope(rcpts=(rcpt,)), 0, message, redelivery=False) == NO_MAILBOX
    assert (NO_MAILBOX.code, NO_MAILBOX.enhanced) == (550, "5.1.1")
    assert not maildir.root.exists()


def test_missing_spool_file_is_a_temporary_error(maildir, tmp_path):
    reply = deliver_one(maildir, make_envelope(), 0, Opener(tmp_path / "gone"), redelivery=False)
    assert reply == MAILBOX_ERROR and (reply.code, reply.enhanced) == (451, "4.3.0")
    assert box(maildir, "alice@example.test", "tmp") == []
    assert box(maildir, "alice@example.test", "new") == []


@pytest.mark.parametrize("err, reply", [(errno.ENOSPC, MAILBOX_FULL), (errno.EDQUOT, MAILBOX_FULL),
                                        (errno.EIO, MAILBOX_ERROR)])
def test_disk_errors_are_temporary(tmp_path, message, err, reply):
    def run(fn, *args):
        raise OSError(err, os.strerror(err))

    maildir = MaildirDelivery(tmp_path / "mail", "mx.example.test", USERS.__contains__, run=run)
    assert deliver_one(maildir, make_envelope(), 0, message, redelivery=False) == reply
    assert 400 <= reply.code < 500


def test_write_failure_mid_copy_cleans_tmp(maildir, message, monkeypatch):
    calls = []
    real = safeio.write_all

    def write_all(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the header went in; the body hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(safeio, "write_all", write_all)
    assert deliver_one(maildir, make_envelope(), 0, message, redelivery=False) == MAILBOX_FULL
    monkeypatch.undo()
    assert box(maildir, "alice@example.test", "tmp") == []
    assert box(maildir, "alice@example.test", "new") == []


def test_the_message_is_opened_once_and_closed(maildir, message):
    assert deliver_one(maildir, make_envelope(), 0, message, redelivery=False) == DELIVERED
    assert len(message.opened) == 1 and message.opened[0].closed


def test_the_message_is_closed_after_a_failed_copy(maildir, message, monkeypatch):
    monkeypatch.setattr(safeio, "write_all", mock.Mock(side_effect=[None, OSError(errno.EIO, "I/O error")]))
    assert deliver_one(maildir, make_envelope(), 0, message, redelivery=False) == MAILBOX_ERROR
    assert len(message.opened) == 1 and message.opened[0].closed


def test_the_message_is_not_opened_when_there_is_nothing_to_write(maildir, message):
    assert deliver_one(maildir, make_envelope(rcpts=("nobody@example.test",)), 0, message, redelivery=False) == NO_MAILBOX
    envelope = make_envelope()
    deliver_one(maildir, envelope, 0, message, redelivery=False)
    [new] = box(maildir, "alice@example.test", "new")
    new.rename(new.parent.parent / "cur" / (new.name + ":2,S"))
    message.opened.clear()
    assert deliver_one(maildir, envelope, 0, message, redelivery=True) == DELIVERED  # already seen
    assert message.opened == []


def test_an_unreadable_spool_file_leaves_no_mailbox_file(maildir):
    # e.g. spool.open_body() on a message file without its envelope line raises ValueError;
    # whether deliver() raises (the queue defers it) or answers 4xx, nothing is half-delivered
    def open_body():
        raise ValueError("message 0123456789ABCDEF01 has no envelope line")

    try:
        reply = deliver_one(maildir, make_envelope(), 0, open_body, redelivery=False)
    except ValueError:
        pass
    else:
        assert 400 <= reply.code < 500
    assert box(maildir, "alice@example.test", "tmp") == []
    assert box(maildir, "alice@example.test", "new") == []


# -- delivering from a real spool ---------------------------------------------------------
@pytest.fixture
def spool(tmp_path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


def spool_message(spool: Spool, data: bytes) -> Envelope:
    writer = spool.open_message()
    for i in range(0, len(data), 4096):
        writer.write(data[i:i + 4096])
    envelope = Envelope(writer.id, time.time(), "s@remote.test", [Recipient("alice@example.test", "alice@example.test")],
                        ClientInfo("192.0.2.1"), size=len(data))
    spool.commit(writer, envelope)
    return envelope


@pytest.mark.parametrize("rewritten", [False, True], ids=["linked", "rewritten"])
@pytest.mark.parametrize("data", [MESSAGE, MESSAGE + b"x" * (2 * SPILL_SIZE) + b"\r\n"], ids=["small", "spilled"])
def test_deliver_from_the_spool_writes_the_message_without_the_envelope_line(maildir, spool, data, rewritten):
    envelope = spool_message(spool, data)
    if rewritten:  # the entry is no longer the message file; msg/<id> keeps its first line
        assert spool.claim(envelope.id)
        spool.defer(envelope, time.time())
    reply = deliver_one(maildir, envelope, 0, partial(spool.open_body, envelope.id), redelivery=False)
    assert reply == DELIVERED
    [delivered] = box(maildir, "alice@example.test", "new")
    assert delivered.read_bytes() == (
        b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n" + data.replace(b"\r\n", b"\n")
    )


def test_deliver_from_the_spool_when_the_message_file_is_gone(maildir, spool):
    envelope = spool_message(spool, MESSAGE)
    os.unlink(spool.message_path(envelope.id))
    reply = deliver_one(maildir, envelope, 0, partial(spool.open_body, envelope.id), redelivery=False)
    assert reply == MAILBOX_ERROR and reply.code == 451
    assert box(maildir, "alice@example.test", "tmp") == []
    assert box(maildir, "alice@example.test", "new") == []


def test_maildir_name():
    envelope = make_envelope(qid="ABCDEF0123456789AB")
    assert maildir_name(envelope, 3, "mx.example.test") == "1700000000.QABCDEF0123456789ABR3.mx.example.test"
    # Maildir: "/" and ":" cannot appear in the host part
    assert maildir_name(envelope, 0, "a/b:c").endswith(".a\\057b\\072c")


# -- copy_as_lf ---------------------------------------------------------------------------
def copy(data: bytes, tmp: Path) -> bytes:
    src, dst = tmp / "src", tmp / "dst"
    src.write_bytes(data)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src, "rb") as fh:
            copy_as_lf(fh, fd)
    finally:
        os.close(fd)
    return dst.read_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"a" * (COPY_CHUNK - 1) + b"\r\nb\r\n",  # CR is the last byte of the first chunk
        b"a" * (COPY_CHUNK - 2) + b"\r\r\nb\r\n",
        b"a" * (COPY_CHUNK - 1) + b"\rb",  # a bare CR at the boundary stays a CR
        b"a" * (COPY_CHUNK - 1) + b"\r",  # ... also at the end of the file
        b"a" * COPY_CHUNK + b"\r\n",
        b"\r\n" * COPY_CHUNK,
    ],
    ids=["crlf-split", "cr-cr-lf-split", "bare-cr-split", "cr-at-eof", "crlf-after", "all-crlf"],
)
def test_copy_as_lf_at_the_chunk_boundary(tmp_path, data):
    assert copy(data, tmp_path) == data.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("data", [b"", b"\r", b"\n", b"\r\n", b"a\rb\nc\r\n", b"\r\r\r\n\n"])
def test_copy_as_lf_small(tmp_path, data):
    assert copy(data, tmp_path) == data.replace(b"\r\n", b"\n")


def test_copy_as_lf_starts_where_the_file_is_positioned(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b'{"id":"x"}\nReceived: a\r\n\r\nb\r\n')
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src, "rb") as fh:
            fh.readline()
            copy_as_lf(fh, fd)
            assert not fh.closed  # the caller owns the file
    finally:
        os.close(fd)
    assert dst.read_bytes() == b"Received: a\n\nb\n"


def test_copy_as_lf_from_any_binary_file_object(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "COPY_CHUNK", 3)
    data = b"a\r\nb\r\r\nc\r"
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        copy_as_lf(io.BytesIO(data), fd)
    finally:
        os.close(fd)
    assert dst.read_bytes() == data.replace(b"\r\n", b"\n")


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=64).map(lambda b: bytes(x for x in b if x in b"\r\na")) | st.binary(max_size=64),
       chunk=st.integers(min_value=1, max_value=9))
def test_copy_as_lf_any_chunk_size(data, chunk):
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(local, "COPY_CHUNK", chunk):
        assert copy(data, Path(tmp)) == data.replace(b"\r\n", b"\n")
