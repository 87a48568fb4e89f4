"""Spool.commit's two steps with a check between them: the check reads the finished message
and may still refuse it, with nothing queued (the seam for end-of-data checks)."""
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

    def check(path):
        with open(path, "rb") as fh:
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
