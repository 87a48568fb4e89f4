"""geosmtp.batches: the small disk jobs of many greenlets in one threadpool job."""
from __future__ import annotations

import threading

import gevent
import pytest
from gevent.threadpool import ThreadPool

from geosmtp.batches import Batches, each


class Jobs:
    """A `run` through a real threadpool that records each job's items."""

    def __init__(self):
        self.pool = ThreadPool(2)
        self.batches: list[list] = []

    def __call__(self, fn, items):
        self.batches.append(list(items))
        return self.pool.apply(fn, (items,))


@pytest.fixture
def jobs():
    j = Jobs()
    yield j
    j.pool.kill()


def test_callers_at_once_share_one_job(jobs):
    batches = Batches(jobs, each(lambda n: n * 2))
    calls = [gevent.spawn(batches.call, n) for n in range(50)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert [c.value for c in calls] == [n * 2 for n in range(50)]
    assert jobs.batches == [list(range(50))]


def test_what_comes_during_a_job_goes_in_the_next(jobs):
    in_job, go_on = threading.Event(), threading.Event()

    def work(items):
        if items == [0]:
            in_job.set()
            go_on.wait(10)
        return [(True, n) for n in items]

    batches = Batches(jobs, work)
    first = gevent.spawn(batches.call, 0)
    while not in_job.is_set():  # bounded by the job's own wait
        gevent.sleep(0.001)
    later = [gevent.spawn(batches.call, n) for n in (1, 2, 3)]
    gevent.sleep(0.01)
    go_on.set()
    gevent.joinall([first, *later], timeout=10, raise_error=True)
    assert [c.value for c in (first, *later)] == [0, 1, 2, 3]
    assert jobs.batches == [[0], [1, 2, 3]]


def test_an_item_that_raises_fails_alone(jobs):
    def half(n):
        if n % 2:
            raise ValueError(f"odd {n}")
        return n

    batches = Batches(jobs, each(half))
    calls = [gevent.spawn(batches.call, n) for n in range(4)]
    gevent.joinall(calls, timeout=10)
    assert [c.value for c in calls if c.successful()] == [0, 2]
    assert [str(c.exception) for c in calls if not c.successful()] == ["odd 1", "odd 3"]
    assert len(jobs.batches) == 1


def test_a_failed_job_fails_its_whole_batch_and_the_next_runs(jobs):
    def work(items):
        if 0 in items:
            raise OSError("disk")
        return [(True, n) for n in items]

    batches = Batches(jobs, work)
    failed = [gevent.spawn(batches.call, n) for n in (0, 1)]
    gevent.joinall(failed, timeout=10)
    assert [type(c.exception) for c in failed] == [OSError, OSError]
    assert batches.call(5) == 5


def test_posted_items_are_done_and_after_sees_them(jobs):
    done, seen = [], []
    batches = Batches(jobs, each(done.append), after=lambda items, outcomes: seen.append((list(items), outcomes)))
    for n in range(3):
        batches.post(n)
    assert done == []  # nothing waits: the job runs once the poster gives way
    assert batches.settle(10)
    assert done == [0, 1, 2]
    assert seen == [([0, 1, 2], [(True, None)] * 3)]
    assert batches.settle(0)  # nothing under way


def test_a_batch_is_bounded(jobs):
    batches = Batches(jobs, each(lambda n: n), limit=4)
    calls = [gevent.spawn(batches.call, n) for n in range(10)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    assert [len(b) for b in jobs.batches] == [4, 4, 2]
