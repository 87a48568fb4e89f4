"""workers = 2, the master alone SIGKILLed (not its process group), then started again.

The workers are bound to the master from their first instruction (geosmtp.lifeline): once it
is gone they stop accepting at once, finish or abort their sessions within drain_timeout and
exit. They hold the master's spool lock until then, so the new master's recovery (which
sweeps message files that have no queue entry) waits for the last of them and never runs
beside a worker that is still writing a message. Every acknowledged message is delivered
exactly once.
"""
from __future__ import annotations

import random
import time

from tests.support.load import Load
from tests.support.server import ServerProcess, alive, children

KILLS = 10
DRAIN = 3.0  # [server] drain_timeout
# an orphaned worker ends its sessions within drain_timeout; what the stop adds after it
# (the 421s to sessions still open, the exit) takes well under this
MARGIN = 4.0


def server(tmp_path) -> ServerProcess:
    return ServerProcess(tmp_path, {"server": {"workers": 2, "drain_timeout": f"{DRAIN:g}s"},
                                    "log": {"level": "INFO"}})


def test_master_sigkill_under_load_loses_and_duplicates_nothing(tmp_path):
    srv = server(tmp_path / "mc").start()
    # up to 400 KB: most messages are streamed to msg/ during DATA (the ones that were lost)
    load = Load(lambda: srv.port, clients=6, max_size=400_000).start()
    survived = []
    try:
        for _ in range(KILLS):
            time.sleep(random.uniform(0.3, 1.5))
            workers = children(srv.proc.pid)
            killed = time.monotonic()
            srv.kill()  # the master only: its workers get no signal from us
            srv.start(timeout=DRAIN + MARGIN + 20)  # waits for the old workers' lock
            srv.wait_for(lambda: not any(alive(p) for p in workers), timeout=DRAIN + MARGIN)
            survived.append(time.monotonic() - killed)
        time.sleep(0.5)
    finally:
        load.stop()
    try:
        print(f"acked={len(load.acked)} attempted={len(load.attempted)} "
              f"orphans gone after {max(survived):.2f}s at most")
        assert len(load.acked) > 50, "the load did not get going"
        srv.wait_for(lambda: not srv.queue_files("incoming") and not srv.queue_files("active"), timeout=60)
        load.check_delivered_once(srv)
        assert not srv.queue_files("deferred") and not srv.queue_files("corrupt")
        assert "still hold the spool" not in srv.log()  # no master gave up waiting
    finally:
        assert srv.stop() == 0


def test_master_killed_while_its_workers_start(tmp_path):
    """The window that used to leave workers behind for good: the master dies before its
    workers have finished their imports. They are gone at once, and the next master starts
    on the same ports and spool."""
    srv = server(tmp_path / "su")
    for pause in (0.0, 0.2, 0.6):  # at fork, during the imports, around the first listen
        proc = srv.launch()
        workers = srv.wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid), timeout=10,
                               interval=0.005)
        time.sleep(pause)
        killed = time.monotonic()
        srv.kill()
        srv.wait_for(lambda: not any(alive(p) for p in workers), timeout=DRAIN)
        print(f"pause {pause}: workers gone after {time.monotonic() - killed:.2f}s")
    srv.start()
    try:
        load = Load(lambda: srv.port, clients=1, max_per_client=3).start()
        srv.wait_for(lambda: len(load.acked) == 3, timeout=20)
        load.stop()
        srv.wait_for(lambda: len(srv.messages("alice@example.test")) == 3, timeout=20)
    finally:
        assert srv.stop() == 0
