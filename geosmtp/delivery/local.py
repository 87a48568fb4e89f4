"""Local delivery: write a spooled message into a user's Maildir.

<maildir_root>/<domain>/<localpart>/{tmp,new,cur}, with LF line ends and Return-Path: and
Delivered-To: on top. The file is written in tmp/, flushed, renamed into new/, and that is
flushed: by the group commit (geosmtp.groupcommit), whose flushes every delivery in flight
shares, as the spool's commits do. The name is derived from the queue id and the
recipient, so a delivery repeated after a crash renames over its own earlier copy instead
of adding a second one.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable

from geosmtp import linescan, safeio
from geosmtp.delivery.target import DIRECTORY_DOWN, Message, OpenBody, Outcome
from geosmtp.directory import DirectoryUnavailable
from geosmtp.envelope import Envelope
from geosmtp.groupcommit import GroupCommit, Method
from geosmtp.replies import Reply

COPY_CHUNK = 1024 * 1024

DELIVERED = Reply(250, "2.0.0", "Delivered to mailbox")
NO_MAILBOX = Reply(550, "5.1.1", "Mailbox does not exist")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full or disk full")
MAILBOX_ERROR = Reply(451, "4.3.0", "Mailbox write failed")


def _direct(fn, *args):
    return fn(*args)


def maildir_name(msg: Message | Envelope, slot: int, hostname: str) -> str:
    """Maildir convention: time.unique.host, with "/" and ":" in the host escaped; unique is
    the queue id and the recipient's place in the envelope, so a repeat has the same name."""
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{int(msg.created)}.Q{msg.id}R{slot}.{host}"


def copy_as_lf(src: BinaryIO, fd: int) -> None:
    """Copy the spooled CRLF message to fd with LF line ends (the Maildir convention)."""
    carry = b""
    while chunk := src.read(COPY_CHUNK):
        chunk = carry + chunk
        carry = b"\r" if chunk.endswith(b"\r") else b""
        if carry:
            chunk = chunk[:-1]
        safeio.write_all(fd, linescan.lf_line_ends(chunk))
    if carry:
        safeio.write_all(fd, carry)


class MaildirDelivery:
    def __init__(self, root: str | os.PathLike, hostname: str, is_mailbox: Callable[[str], bool],
                 run: Callable = _direct, flush: Method = "syncfs", commits: GroupCommit | None = None):
        self.root = Path(root)
        self._root = os.fspath(root)  # the hot path joins strings: pathlib costs ~40 us a join
        self.hostname = hostname
        self.is_mailbox = is_mailbox  # the directory's answer (a mailbox removed since RCPT: 5xx)
        self.run = run
        # the spool's rounds when the Maildir is on its filesystem (one flush covers both: a
        # delivery's rename and the queue entry's removal share rounds); else our own,
        # opened at the first flush, after the first delivery made the root
        self.commits = commits if commits is not None else GroupCommit(self.root, run, flush)

    def mailbox(self, address: str) -> Path:
        return Path(self._box(address))

    def _box(self, address: str) -> str:
        local, _, domain = address.lower().rpartition("@")
        return f"{self._root}/{domain}/{local}"

    kind = "maildir"

    def close(self) -> None:
        pass  # nothing kept open between deliveries

    def destination(self, domain: str) -> str:
        return "maildir"  # every local mailbox of a message in one call

    def deliver(self, destination: str, msg: Message, open_body: OpenBody) -> list[Outcome]:
        """Each recipient's copy, one after the other (the delivery target contract)."""
        return [Outcome(self._deliver_one(msg, address, slot, open_body))
                for address, slot in zip(msg.recipients, msg.slots)]

    def _deliver_one(self, msg: Message, address: str, slot: int, open_body: OpenBody) -> Reply:
        """A Reply: 2xx done, 4xx retry, 5xx failed. `open_body()` gives the spooled message
        (our Received: header first); msg.prefix (added header fields) goes in front of it."""
        try:
            if not self.is_mailbox(address.lower()):
                return NO_MAILBOX
        except DirectoryUnavailable:
            return DIRECTORY_DOWN
        header = f"Return-Path: <{msg.sender}>\nDelivered-To: {address}\n".encode("utf-8")
        header += msg.prefix.replace(b"\r\n", b"\n")
        name = maildir_name(msg, slot, self.hostname)
        box = self._box(address)
        tmp, final = f"{box}/tmp/{name}", f"{box}/new/{name}"
        try:
            if self.run(self._write, box, name, header, open_body, msg.redelivery):
                self.commits.flush(then=partial(os.rename, tmp, final), files=(tmp,), dirs=(f"{box}/new",))
        except OSError as exc:
            # a copy left in tmp/ goes; one renamed into new/ before its flush failed is
            # replaced by the retry, which has the same name
            safeio.unlink_quietly(tmp)
            return MAILBOX_FULL if exc.errno in safeio.FULL_ERRNOS else MAILBOX_ERROR
        return DELIVERED

    @staticmethod
    def _write(box: str, name: str, header: bytes, open_body: Callable[[], BinaryIO],
               redelivery: bool) -> bool:
        """The copy written in tmp/, unsynced; False when there is nothing to write."""
        if not os.path.isdir(f"{box}/new"):
            # every level 0700, files 0600 (as Postfix's local does): Dovecot copies these
            # modes to its index files, which hold subjects and senders
            domain = os.path.dirname(box)
            root = os.path.dirname(domain)
            os.makedirs(root, mode=0o700, exist_ok=True)  # maildir_root
            for level in (domain, box, f"{box}/tmp", f"{box}/new", f"{box}/cur"):
                try:
                    os.mkdir(level, 0o700)
                except FileExistsError:
                    pass
            for folder in (box, domain, root):  # make the new folders durable
                safeio.fsync_path(folder)
        if redelivery and any(n == name or n.startswith(name + ":") for n in os.listdir(f"{box}/cur")):
            return False  # delivered before the crash and already seen by the user's mail reader
        tmp = f"{box}/tmp/{name}"
        try:
            fd = safeio.create(tmp)
        except FileExistsError:  # a copy cut short by a crash
            safeio.unlink_quietly(tmp)
            fd = safeio.create(tmp)
        try:
            safeio.write_all(fd, header)
            with open_body() as body:
                copy_as_lf(body, fd)
        except BaseException:
            os.close(fd)
            safeio.unlink_quietly(tmp)
            raise
        os.close(fd)
        return True
