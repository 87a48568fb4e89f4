"""Kill -9 under load: every message that got a 250 is delivered exactly once after restart.

Clients keep sending while the server is SIGKILLed several times, in the middle of
accepting and of delivering. 250 means fsynced in the spool, and Maildir delivery after a
crash renames over its own earlier copy, so no acknowledged message is lost or doubled.
"""
import random
import time

import pytest

from tests.support.load import Load
from tests.support.server import ServerProcess

KILLS = 4


@pytest.mark.parametrize("workers, method", [(1, "fsync"), (2, "syncfs")])
def test_sigkill_loses_and_duplicates_nothing(tmp_path, workers, method):
    # with workers = 2 the master and its workers go at once; both flush methods
    srv = ServerProcess(tmp_path / "crash", {"server": {"workers": workers, "spool_flush": method},
                                             "log": {"level": "WARNING"}}).start()
    load = Load(lambda: srv.port).start()
    try:
        for _ in range(KILLS):
            time.sleep(random.uniform(0.6, 1.2))
            srv.kill_all()  # SIGKILL, workers too: no cleanup of any kind
            srv.start(timeout=30)  # a new master waits for dying workers' lock
        time.sleep(0.5)
    finally:
        load.stop()
    try:
        assert len(load.acked) > 20, "the load did not get going"
        print(f"acked={len(load.acked)} attempted={len(load.attempted)}")
        # let the queue manager finish every local delivery
        srv.wait_for(lambda: not srv.queue_files("incoming") and not srv.queue_files("active"), timeout=30)
        load.check_delivered_once(srv)
        assert not srv.queue_files("deferred") and not srv.queue_files("corrupt")
    finally:
        srv.stop()
