"""Spare message files: a delivered message's file, emptied, becomes the next message's.

A spool that unlinks every delivered message and creates a file for every new one frees
and allocates an inode per message. On ext4 without a journal each allocation passes over
every inode freed in the last one to six minutes, one at a time (find_inode_bit() skips
them as recently_deleted()), so in steady delivery a create costs 0.3-0.6 ms of CPU
instead of 0.02 (bench/README.md, "Deleting before measuring"); the Maildir's creates pay
the same for the spool's deletions. Kept spares free no inode and allocate none.

    spare/<slot>    an empty file; slot < SLOTS, so there are never more than SLOTS

keep(path) empties a message file that has no other name and renames it to the next slot
(over a spare nobody took yet, which then goes: the number stays bounded). take(path)
renames a spare to a new message's name without replacing anything (renameat2
RENAME_NOREPLACE) and opens it: exactly one taker wins a spare, so the master and its
workers share them without locks. A spare holds no octets; one that a crash left with some
(its emptying not yet on disk) is swept with the others by clear() at start-up, before
anything takes one. A reused file whose new content a crash kept from the disk still
holds its old first line, the previous message's envelope: recovery tells it by the id
(geosmtp.spool's _cut_short), as it tells a new file by its length.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import time

SLOTS = 1024
RELIST = 1.0  # seconds between listings of spare/ that found it empty

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def rename_new(src: str, dst: str) -> None:
    """src renamed to dst, which must not exist (FileExistsError); FileNotFoundError when
    src is gone (another taker won)."""
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


class Spares:
    def __init__(self, directory: str):
        self.dir = directory
        self.enabled = _renameat2 is not None
        self._known: list[str] = []  # names seen in the last listing, not yet tried
        self._listed_empty = float("-inf")
        # next() of a count is one step under the GIL: threads of a process take turns
        self._slots = itertools.count(int.from_bytes(os.urandom(2), "big"))  # processes start apart

    def clear(self) -> None:
        """Start-up, before any take(): every spare goes (one a crash left unemptied too)."""
        for name in os.listdir(self.dir):
            try:
                os.unlink(f"{self.dir}/{name}")
            except FileNotFoundError:
                pass
        self._known.clear()

    def keep(self, path: str) -> bool:
        """The message file at `path` emptied and kept as a spare, if it has no other name;
        False when it was left where it is (the caller unlinks it then)."""
        if not self.enabled:
            return False
        try:
            if os.stat(path).st_nlink != 1:  # still a queue entry's file (an operator moved it)
                return False
            os.truncate(path, 0)
        except FileNotFoundError:
            return True  # gone already: nothing is left to unlink
        except OSError:
            return False
        slot = str(next(self._slots) % SLOTS)
        try:
            os.rename(path, f"{self.dir}/{slot}")
        except OSError:
            return False  # spare/ gone (an operator's hand): the caller unlinks the file
        if len(self._known) < SLOTS:  # a master that delivers and seldom takes: bounded
            self._known.append(slot)  # this process's next take() needs no listing for it
        return True

    def take(self, path: str) -> int | None:
        """A spare renamed to `path` (a new name) and opened for writing, or None: no spare
        left, and the caller creates the file."""
        if not self.enabled:
            return None
        while True:
            try:
                spare = self._known.pop()  # threads of one process share the list
            except IndexError:
                if not self._relist():
                    return None
                continue
            try:
                rename_new(f"{self.dir}/{spare}", path)
            except FileNotFoundError:
                continue  # another process took it
            except OSError as exc:
                if exc.errno in (errno.ENOSYS, errno.EINVAL):  # no renameat2 here
                    self.enabled = False
                    return None
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if st.st_nlink == 1:
                if st.st_size:  # emptied by keep(); never otherwise, but never trust it
                    os.ftruncate(fd, 0)
                return fd
            os.close(fd)  # linked elsewhere meanwhile (never by geosmtp): not ours to fill
            os.unlink(path)

    def _relist(self) -> bool:
        now = time.monotonic()
        if now - self._listed_empty < RELIST:
            return False
        try:
            self._known = os.listdir(self.dir)
        except FileNotFoundError:
            self._known = []
        if not self._known:
            self._listed_empty = now
        return bool(self._known)
