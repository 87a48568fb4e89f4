"""geosmtp.spares on a real directory, and the spool's use of it: a delivered message's file,
emptied, is the next message's; never one with another name, never more than SLOTS, and a
reused file whose new content a crash lost is not taken for a message at recovery."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gevent
import pytest

from geosmtp import spares as spares_module
from geosmtp.spares import Spares, rename_new
from geosmtp.spool import Spool
from tests.unit.test_spool import DATA, body, enqueue, files_under, make_envelope


@pytest.fixture
def spares(tmp_path) -> Spares:
    (tmp_path / "spare").mkdir()
    return Spares(str(tmp_path / "spare"))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def inode(path) -> int:
    return os.stat(path).st_ino


def test_a_kept_file_is_emptied_and_taken_back_under_a_new_name(tmp_path, spares):
    old = write(tmp_path / "old", b"a delivered message" * 100)
    number = inode(old)
    assert spares.keep(str(old))
    assert not old.exists()
    [name] = os.listdir(spares.dir)
    assert os.path.getsize(f"{spares.dir}/{name}") == 0  # no octet of the old message is kept
    fd = spares.take(str(tmp_path / "new"))
    assert fd is not None
    os.write(fd, b"next")
    os.close(fd)
    assert inode(tmp_path / "new") == number and (tmp_path / "new").read_bytes() == b"next"
    assert os.listdir(spares.dir) == []


def test_a_file_with_another_name_is_not_kept(tmp_path, spares):
    message = write(tmp_path / "msg", DATA)
    os.link(message, tmp_path / "entry")  # still a queue entry (an operator moved it to hold/)
    assert not spares.keep(str(message))
    assert message.read_bytes() == DATA and os.listdir(spares.dir) == []


def test_there_are_never_more_than_slots_spares(tmp_path, spares, monkeypatch):
    monkeypatch.setattr(spares_module, "SLOTS", 3)
    for i in range(10):
        assert spares.keep(str(write(tmp_path / f"m{i}", b"x")))
    assert len(os.listdir(spares.dir)) == 3


def test_no_spare_means_a_created_file_and_few_listings(tmp_path, spares, monkeypatch):
    listings = []
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p: (listings.append(p), real(p))[1])
    assert all(spares.take(str(tmp_path / f"n{i}")) is None for i in range(50))
    assert len(listings) == 1  # an empty spare/ is listed again only after RELIST seconds
    clock = time.monotonic
    monkeypatch.setattr(spares_module.time, "monotonic", lambda: clock() + spares_module.RELIST)
    assert spares.take(str(tmp_path / "later")) is None and len(listings) == 2


def test_one_spare_goes_to_one_taker(tmp_path, spares):
    other = Spares(spares.dir)  # another process of the same spool
    assert spares.keep(str(write(tmp_path / "m", b"x")))
    assert other._relist() and spares._relist()  # both saw it
    got = [spares.take(str(tmp_path / "a")), other.take(str(tmp_path / "b"))]
    assert sum(fd is not None for fd in got) == 1
    for fd in got:
        if fd is not None:
            os.close(fd)
    assert (tmp_path / "a").exists() != (tmp_path / "b").exists()


def test_rename_new_never_replaces(tmp_path):
    src, dst = write(tmp_path / "src", b"s"), write(tmp_path / "dst", b"d")
    with pytest.raises(FileExistsError):
        rename_new(str(src), str(dst))
    assert src.read_bytes() == b"s" and dst.read_bytes() == b"d"
    with pytest.raises(FileNotFoundError):
        rename_new(str(tmp_path / "gone"), str(tmp_path / "x"))


def test_clear_removes_every_spare(tmp_path, spares):
    for i in range(3):
        assert spares.keep(str(write(tmp_path / f"m{i}", b"x")))
    write(Path(spares.dir) / "7", b"a spare whose emptying a crash lost")
    spares.clear()
    assert os.listdir(spares.dir) == [] and spares.take(str(tmp_path / "n")) is None


# -- the spool ------------------------------------------------------------------------------
@pytest.fixture(params=["syncfs", "fsync"])
def spool(tmp_path, request) -> Spool:
    s = Spool(tmp_path / "spool", flush=request.param)
    s.setup()
    return s


def deliver(spool: Spool, qid: str) -> None:
    assert spool.claim(qid)
    spool.done(qid)
    deadline = time.monotonic() + 5
    while os.path.exists(spool.message_path(qid)) and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert not os.path.exists(spool.message_path(qid))


@pytest.mark.parametrize("rewritten", [False, True], ids=["linked", "own-entry"])
def test_a_new_message_takes_a_delivered_ones_file(spool, rewritten):
    first = enqueue(spool, DATA * 50)
    number = inode(spool.message_path(first.id))
    if rewritten:
        assert spool.claim(first.id)
        spool.update(first)  # the entry is an envelope file of its own
        assert spool.move(first.id, "active", "incoming")
    deliver(spool, first.id)
    second = enqueue(spool, b"short\r\n")  # shorter: nothing of the first may be left after it
    assert inode(spool.message_path(second.id)) == number
    assert body(spool, second.id) == b"short\r\n"
    assert spool.load(second.id, "incoming").id == second.id
    assert spool.recover() == [] and spool.ids("incoming") == [second.id]


def test_recover_removes_a_reused_file_whose_new_content_was_lost(spool):
    # a crash after the spare was renamed and linked but before its emptying and the new
    # message's octets reached the disk: the entry's name shows the old message. Never
    # acknowledged (250 follows the flush); never to be delivered as the old one again.
    kept = enqueue(spool, DATA)
    old = enqueue(spool, b"the old message\r\n")
    with open(spool.message_path(old.id), "rb") as fh:
        old_octets, number = fh.read(), os.fstat(fh.fileno()).st_ino
    deliver(spool, old.id)
    writer = spool.open_message()
    writer.write(b"the new one\r\n")
    spool.commit(writer, make_envelope(writer.id, size=13))
    assert inode(spool.entry_path(writer.id, "incoming")) == number  # the old message's file
    Path(spool.message_path(writer.id)).write_bytes(old_octets)  # the disk's old content
    assert spool.recover() == []
    assert spool.ids("incoming") == [kept.id] and body(spool, kept.id) == DATA
    assert sorted(files_under(spool.root)) == sorted([f"msg/{kept.id}", f"queue/incoming/{kept.id}"])


def test_recover_removes_an_own_entry_whose_message_file_shows_another_message(spool):
    big = b"B" * (3 * 128 * 1024)  # spilled: an entry file of its own, a placeholder in msg/
    kept = enqueue(spool, big)
    message = enqueue(spool, big)
    # the message file shows another message's envelope and as many octets as recorded
    line = make_envelope(kept.id, stored=len(big)).to_line()
    Path(spool.message_path(message.id)).write_bytes(line + b"y" * len(big))
    assert spool.recover() == []
    assert spool.ids("incoming") == [kept.id] and body(spool, kept.id) == big


def test_recover_clears_the_spares(spool):
    deliver(spool, enqueue(spool, DATA).id)
    assert os.listdir(spool.spares.dir)
    spool.recover()
    assert os.listdir(spool.spares.dir) == []


def test_a_stale_deferred_name_of_a_reused_file_is_not_delivered(spool):
    # a deferred entry's name that a crash kept after its message was delivered and its
    # file taken by another message (the "fsync" method flushes only the new message's
    # names): at recovery it looks like a message of its own. Delivered, it would send the
    # other message under the old id and end that one's file.
    from geosmtp.delivery.target import Router
    from geosmtp.queue import QueueManager
    from tests.unit.test_envelope_queue import LOCAL_DOMAINS, FakeLocal

    old = enqueue(spool, DATA)
    assert spool.claim(old.id) and spool.move(old.id, "active", "deferred")
    assert spool.move(old.id, "deferred", "incoming")
    deliver(spool, old.id)
    new = enqueue(spool, b"the new message\r\n")
    os.link(spool.message_path(new.id), spool.entry_path(old.id, "deferred"))  # the crash's image
    spool.recover()
    target = FakeLocal()
    qm = QueueManager(spool, Router(target, LOCAL_DOMAINS))
    assert spool.claim(old.id, "deferred")
    qm.deliver(old.id)
    assert target.calls == []  # nothing delivered under the old id
    assert spool.ids("incoming") == [new.id] and body(spool, new.id) == b"the new message\r\n"
    assert spool.ids("active") == spool.ids("deferred") == spool.ids("corrupt") == []
    assert not os.path.exists(spool.message_path(old.id))


@pytest.mark.parametrize("placeholder", [b'{"placeholder":"0123456789ABCDEF01"}\n', b"{}\n"],
                         ids=["named", "older"])
def test_recover_removes_an_entry_that_begins_with_a_placeholder(spool, placeholder):
    # a small message's entry is its file: over a spilled message's reused file whose new
    # content never reached the disk it begins with that message's placeholder
    kept = enqueue(spool, DATA)
    lost = enqueue(spool, b"small\r\n")
    Path(spool.message_path(lost.id)).write_bytes(placeholder + b"x" * 40)
    assert spool.recover() == []
    assert spool.ids("incoming") == [kept.id] and spool.ids("corrupt") == []


def test_a_spilled_message_file_names_its_id(spool):
    message = enqueue(spool, b"B" * (3 * 128 * 1024))
    with open(spool.message_path(message.id), "rb") as fh:
        assert json.loads(fh.readline()) == {"placeholder": message.id}


def test_the_queue_tool_does_not_show_a_file_emptied_while_it_read(spool, monkeypatch):
    from geosmtp.queuectl import entries

    message = enqueue(spool, DATA)
    assert entries.read_message(spool, message.id, whole=True) == (DATA, None)
    real = spool.open_body

    def delivered_meanwhile(qid):
        fh = real(qid)
        assert spool.claim(qid)
        spool._remove_entries([qid])  # the delivery's end: the file goes into spare/
        return fh

    monkeypatch.setattr(spool, "open_body", delivered_meanwhile)
    assert entries.read_message(spool, message.id, whole=True) == (None, "delivered while it was read")


def test_keep_without_a_spare_directory_leaves_the_file_to_unlink(tmp_path):
    spares = Spares(str(tmp_path / "no-such-dir"))
    message = write(tmp_path / "m", DATA)
    assert not spares.keep(str(message))  # the caller unlinks it


def test_a_master_that_only_keeps_remembers_at_most_slots_names(tmp_path, spares, monkeypatch):
    monkeypatch.setattr(spares_module, "SLOTS", 4)
    for i in range(20):
        assert spares.keep(str(write(tmp_path / f"m{i}", b"x")))
    assert len(spares._known) <= 4
