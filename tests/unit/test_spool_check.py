"""Spool.commit with a check before its flush: the check reads the whole message and may
still refuse it, with nothing queued (the seam for end-of-data checks). A small message is
checked in memory and written only in the commit's round, unless the check asks for its file."""
from __future__ import annotations

import os
import time

import pytest

from geosmtp.envelope import ClientInfo, Envelope, Recipient
from geosmtp.spool import SPILL_SIZE, Spool


class Refused(Exception):
    pass


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


def files(spool: Spool) -> list[str]:
    out = []
    for root, _, names in os.walk(spool.root):
        out += [os.path.relpath(os.path.join(root, n), spool.root) for n in names]
    return sorted(out)


def message(spool: Spool, size: int):
    writer = spool.open_message()
    data = b"Subject: x\r\n\r\n" + b"y" * size + b"\r\n"
    writer.write(data)
    envelope = Envelope(writer.id, time.time(), "s@remote.test", [Recipient("a@example.test", "a@example.test")],
                        ClientInfo("192.0.2.1"), size=len(data))
    return writer, envelope, data


@pytest.mark.parametrize("size", [100, SPILL_SIZE * 2])  # in memory until commit, and spilled
def test_a_check_reads_the_finished_message_and_may_refuse_it(spool, size):
    writer, envelope, data = message(spool, size)
    seen = []

    def check(file):
        with open(file(), "rb") as fh:
            fh.readline()  # the envelope line (or the placeholder of a spilled message)
            seen.append(fh.read())
        raise Refused("550 5.7.1 no thanks")

    with pytest.raises(Refused):
        spool.commit(writer, envelope, check=check)
    assert seen == [data]  # the whole message, durable, before anything was queued
    assert files(spool) == []


@pytest.mark.parametrize("size", [100, SPILL_SIZE * 2])
def test_a_check_that_passes_lets_the_message_be_published(spool, size):
    writer, envelope, data = message(spool, size)
    spool.commit(writer, envelope, check=lambda path: None)
    assert spool.ids("incoming") == [envelope.id]
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data
    assert spool.load(envelope.id, "incoming").id == envelope.id


@pytest.mark.parametrize("size", [100, SPILL_SIZE * 2])
def test_a_check_may_change_the_envelope_and_hold_the_message(spool, size):
    """Fields to add and a quarantine reason: a small message is written with them (one
    file, as without a check), a spilled message gets its own entry file; either way in
    hold/, and the message reads as it was received."""
    writer, envelope, data = message(spool, size)

    def check(file):
        envelope.extra["headers"] = "X-Checked: yes\r\n"
        envelope.extra["quarantine"] = "test: held"
        return True

    spool.commit(writer, envelope, check=check)
    entry = spool.entry_path(envelope.id, "hold")
    one_file = os.stat(entry).st_ino == os.stat(spool.message_path(envelope.id)).st_ino
    assert one_file == (size < SPILL_SIZE)
    assert spool.load(envelope.id, "hold").extra == {"headers": "X-Checked: yes\r\n", "quarantine": "test: held"}
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data
    assert files(spool) == sorted([f"msg/{envelope.id}", f"queue/hold/{envelope.id}"])
    assert spool.recover() == []  # and a restart finds it whole
    assert spool.load(envelope.id, "hold").extra["quarantine"] == "test: held"


def test_an_unchanged_envelope_keeps_one_file(spool):
    writer, envelope, data = message(spool, 100)
    spool.commit(writer, envelope, check=lambda path: False)
    entry = spool.entry_path(envelope.id, "incoming")
    assert os.stat(entry).st_ino == os.stat(spool.message_path(envelope.id)).st_ino


def test_a_check_may_rewrite_the_finished_message(spool):
    writer, envelope, data = message(spool, 100)

    def check(file):
        def edit(src, dst):
            os.write(dst, src.read().replace(b"Subject: x", b"Subject: y"))
        spool.rewrite_message(writer, file, edit)
        return False

    spool.commit(writer, envelope, check=check)
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data.replace(b"Subject: x", b"Subject: y")
    assert spool.load(envelope.id, "incoming").id == envelope.id
    assert files(spool) == sorted([f"msg/{envelope.id}", f"queue/incoming/{envelope.id}"])


@pytest.mark.parametrize("written", [False, True])
def test_a_change_too_big_for_the_room_gets_its_own_entry(spool, written):
    """Once the file is written (its path asked for), a change past the padding of its first
    line is an entry file of its own; before, the message is simply written with it."""
    writer, envelope, data = message(spool, 100)

    def check(file):
        if written:
            file()
        envelope.extra["headers"] = "X-Big: " + "b" * 4000 + "\r\n"
        return False

    spool.commit(writer, envelope, check=check)
    entry = spool.entry_path(envelope.id, "incoming")
    assert (os.stat(entry).st_ino != os.stat(spool.message_path(envelope.id)).st_ino) == written
    assert spool.load(envelope.id, "incoming").extra["headers"].startswith("X-Big: bbb")
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data


def test_a_check_that_refuses_after_the_unsynced_finish_leaves_nothing(spool):
    writer, envelope, data = message(spool, 100)

    def check(file):
        assert os.path.exists(file())  # written (not yet fsynced): readable
        raise Refused("no")

    with pytest.raises(Refused):
        spool.commit(writer, envelope, check=check)
    assert files(spool) == []


class Counting:
    """A spool's `run` that counts the jobs handed to it (the threadpool's hops)."""

    def __init__(self):
        self.jobs = 0

    def __call__(self, fn, *args):
        self.jobs += 1
        return fn(*args)


@pytest.fixture
def counted(tmp_path):
    """A spool whose threadpool jobs are counted, and its counter."""
    run = Counting()
    spool = Spool(tmp_path / "spool", run=run)
    spool.setup()
    return spool, run


def test_a_small_message_is_checked_in_memory_and_written_in_one_round(counted):
    """No file before the flush's round: the check reads the kept octets, a changed
    envelope is written with the message, and the commit is one job and one round."""
    spool, run = counted
    writer, envelope, data = message(spool, 100)
    seen = []

    def check(file):
        seen.append((writer.kept, os.path.exists(spool.message_path(envelope.id))))
        envelope.extra["headers"] = "X-Checked: yes\r\n"
        return False

    before = spool.commits.rounds
    spool.commit(writer, envelope, check=check)
    assert seen == [(data, False)]
    assert (run.jobs, spool.commits.rounds - before) == (1, 1)
    entry = spool.entry_path(envelope.id, "incoming")
    assert os.stat(entry).st_ino == os.stat(spool.message_path(envelope.id)).st_ino
    with open(entry, "rb") as fh:
        line = fh.readline()
    assert line == envelope.to_line()  # written once, as it is: no padding, no overwrite
    assert spool.load(envelope.id, "incoming").extra["headers"] == "X-Checked: yes\r\n"
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data
    assert spool.recover() == []


def test_asking_for_the_file_writes_it_once(counted):
    spool, run = counted
    writer, envelope, data = message(spool, 100)
    paths = []

    def check(file):
        paths.extend([file(), file()])
        with open(paths[0], "rb") as fh:
            fh.readline()
            assert fh.read() == data
        envelope.extra["quarantine"] = "test: held"
        return True

    spool.commit(writer, envelope, check=check)
    assert paths == [spool.message_path(envelope.id)] * 2
    assert run.jobs == 2  # the file, then the round (the envelope over its padded line)
    assert spool.load(envelope.id, "hold").extra["quarantine"] == "test: held"
    with spool.open_body(envelope.id) as fh:
        assert fh.read() == data
    assert spool.recover() == []
