"""Telling the running server to look at incoming/ now: SIGUSR1 to the pid in the spool's
lock file, which the server holds locked (flock) while it runs."""
from __future__ import annotations

import os
import signal

from geosmtp.spool import lock_holder


def wake_server(spool_dir: str) -> bool:
    """SIGUSR1 to the running server, whose pid is in spool_dir/lock: look at incoming/ now.

    Quiet about every failure: with no server (the lock is free), an empty or stale pid, or
    a pid that is not a geosmtp, nothing is sent and the next start or scan finds the change.
    """
    pid = lock_holder(spool_dir)
    if not pid or pid <= 1 or pid == os.getpid():
        return False
    # the pid was written by the lock's holder; still, never signal a process that is not a
    # geosmtp (SIGUSR1 kills a process that does not handle it)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"geosmtp" not in fh.read():
                return False
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc to ask
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    return True
