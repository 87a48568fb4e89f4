"""A worker's life is bound to its master's, from the worker's first instruction.

The master starts each worker with its own pid (GEOSMTP_MASTER_PID) and the read end of a
pipe whose write end only the master holds (GEOSMTP_LIFELINE_FD). Two ways to notice that
the master is gone, for two moments of a worker's life:

- bind_to_master(), run by the entry points before any import, asks the kernel for SIGTERM
  when the parent dies (prctl PR_SET_PDEATHSIG) and then checks that the parent is still the
  master: a master that died between fork and that call is caught by the check, one that
  dies later by the signal (before the server's handlers exist, its default action ends the
  worker: nothing has been accepted yet).
- master_gone(fd), in a running worker, waits for end-of-file on the pipe, which comes when
  every process holding the write end has exited, whatever its parent is now.

This module imports only the standard library: it runs before gevent patches anything.
"""
from __future__ import annotations

import ctypes
import os
import signal

MASTER_PID = "GEOSMTP_MASTER_PID"
LIFELINE_FD = "GEOSMTP_LIFELINE_FD"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bind_to_master() -> None:
    """In a worker (GEOSMTP_MASTER_PID set): SIGTERM when the master dies, and exit at once
    if it already has. Does nothing in any other process."""
    master = os.environ.get(MASTER_PID)
    if not master:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        os.write(2, f"geosmtp worker: prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}\n".encode())
        os._exit(1)
    if os.getppid() != int(master):  # gone before the line above: no signal will come
        os.write(2, f"geosmtp worker: master {master} exited before this worker started\n".encode())
        os._exit(1)


def master_gone(fd: int) -> None:
    """Return when the master has exited: end-of-file on the lifeline pipe (it never writes).
    Runs in a greenlet: wait_read yields to the hub."""
    import gevent.socket

    while True:
        gevent.socket.wait_read(fd)
        try:
            if not os.read(fd, 1):
                return
        except BlockingIOError:
            continue
