"""geosmtp.metrics.SpoolCollector: entries by state and the oldest's age, counted off the hub
(gevent's threadpool unless told otherwise), and nothing walked when it is registered."""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, generate_latest

from geosmtp import metrics
from geosmtp.spool import Spool, new_id


def spool_with(tmp_path, **states: int) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    for state, n in states.items():
        for _ in range(n):
            (tmp_path / "spool" / "queue" / state / new_id()).write_bytes(b"{}\n")
    return s


def test_counts_by_state_and_the_oldest_age(tmp_path):
    old = f"{int((time.time() - 600) * 1e6):013X}{0:010X}"
    spool_with(tmp_path, incoming=2, deferred=3)
    (tmp_path / "spool" / "queue" / "hold" / old).write_bytes(b"{}\n")
    counts, first = metrics.SpoolCollector(str(tmp_path / "spool")).count()
    assert counts == {"incoming": 2, "active": 0, "deferred": 3, "hold": 1, "corrupt": 0}
    assert abs(first - (time.time() - 600)) < 5


def test_collect_counts_through_run_and_register_walks_nothing(tmp_path):
    spool_with(tmp_path, deferred=4)
    jobs = []

    def run(fn, *args):
        jobs.append(fn)
        return fn(*args)

    registry = CollectorRegistry(auto_describe=True)
    registry.register(metrics.SpoolCollector(str(tmp_path / "spool"), run))
    assert jobs == []
    text = generate_latest(registry).decode()
    assert len(jobs) == 1
    assert 'geosmtp_spool_entries{state="deferred"} 4.0' in text
    assert "geosmtp_spool_oldest_age_seconds" in text


def test_the_default_run_is_a_thread_of_gevents_pool(tmp_path):
    spool_with(tmp_path, incoming=1)
    collector = metrics.SpoolCollector(str(tmp_path / "spool"))
    threads = []
    count = collector.count

    def counted():
        threads.append(threading.get_ident())
        return count()

    collector.count = counted
    families = list(collector.collect())
    assert threads and threads[0] != threading.get_ident()
    assert [s.value for s in families[0].samples if s.labels == {"state": "incoming"}] == [1]


def test_a_big_state_is_listed_again_only_after_reuse_seconds(tmp_path, monkeypatch):
    # a listing of 100,000 names takes the GIL back once a name: scraped often, a big
    # queue is counted once in REUSE seconds; a small state is counted at every scrape
    monkeypatch.setattr(metrics, "BIG", 4)
    spool_with(tmp_path, incoming=1, deferred=4)
    collector = metrics.SpoolCollector(str(tmp_path / "spool"))
    assert collector.count()[0]["deferred"] == 4
    queue = tmp_path / "spool" / "queue"
    for i in range(2):
        (queue / "deferred" / f"{int(time.time() * 1e6):013X}{i + 100:010X}").write_bytes(b"{}\n")
        (queue / "incoming" / f"{int(time.time() * 1e6):013X}{i + 100:010X}").write_bytes(b"{}\n")
    counts = collector.count()[0]
    assert counts["deferred"] == 4 and counts["incoming"] == 3
    clock = time.monotonic
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock() + metrics.REUSE)
    assert collector.count()[0]["deferred"] == 6
