"""The spool lock: one geosmtp per spool, held by every process of it (geosmtp.spool.lock_spool)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from geosmtp.spool import held_lock, lock_holder, lock_spool
from tests.support.server import alive

# A "master" that takes the lock, starts a "worker" holding the same descriptor (as
# Server._spawn_worker passes it), prints the worker's pid and exits at once.
MASTER = r"""
import os, subprocess, sys
from geosmtp.spool import lock_spool
fd = lock_spool(sys.argv[1])
worker = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(float(sys.argv[1]))", sys.argv[2]],
                          pass_fds=(fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(worker.pid, flush=True)
"""


def orphaned_worker(spool, lives: float) -> int:
    """The pid of a worker whose master has exited; it holds the lock for `lives` s."""
    proc = subprocess.run([sys.executable, "-c", MASTER, str(spool), str(lives)], capture_output=True,
                          text=True, timeout=30, check=True)
    return int(proc.stdout)


def test_a_live_holder_is_refused_at_once(tmp_path):
    fd = lock_spool(tmp_path)
    try:
        assert lock_holder(tmp_path) == os.getpid()
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from geosmtp.spool import lock_spool; lock_spool(sys.argv[1], wait=30)",
             str(tmp_path)], capture_output=True, text=True, timeout=30)
        assert child.returncode != 0
        assert f"another geosmtp (pid {os.getpid()}) is running on the spool" in child.stderr
    finally:
        os.close(fd)
    assert lock_holder(tmp_path) is None


def test_the_workers_of_a_dead_master_are_waited_for(tmp_path):
    worker = orphaned_worker(tmp_path, lives=1.5)
    assert lock_holder(tmp_path) is not None  # the master is gone, its worker holds the lock
    started = time.monotonic()
    fd = lock_spool(tmp_path, wait=20)
    waited = time.monotonic() - started
    try:
        assert 0.5 < waited < 10, waited
        assert not alive(worker)
        assert lock_holder(tmp_path) == os.getpid()
    finally:
        os.close(fd)


def test_the_wait_is_bounded(tmp_path):
    orphaned_worker(tmp_path, lives=8)
    started = time.monotonic()
    with pytest.raises(OSError, match="still hold the spool"):
        lock_spool(tmp_path, wait=1)
    assert time.monotonic() - started < 4


def test_a_worker_checks_the_descriptor_it_was_given(tmp_path):
    fd = lock_spool(tmp_path)
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)
    try:
        assert held_lock(tmp_path, fd) == fd
        with pytest.raises(OSError, match="is not the lock"):
            held_lock(tmp_path, other)
    finally:
        os.close(fd)
        os.close(other)
