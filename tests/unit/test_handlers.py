"""The greenlets that run connections (geosmtp.handlers): reused, counted, interrupted only
for the session they were meant for."""
from weakref import WeakKeyDictionary

import gevent
import pytest
from gevent.event import Event

from geosmtp.handlers import Handlers, interrupt


class Stop(Exception):
    pass


def test_a_finished_connection_s_greenlet_runs_the_next_one():
    pool = Handlers()
    ran = []
    pool.spawn(lambda: ran.append(gevent.getcurrent()))
    pool.join(1)
    pool.spawn(lambda: ran.append(gevent.getcurrent()))
    assert pool.join(1)
    assert len(ran) == 2 and ran[0] is ran[1]


def test_connections_at_once_get_greenlets_of_their_own_and_are_counted():
    pool = Handlers()
    go = Event()
    seen = []

    def job():
        seen.append(gevent.getcurrent())
        go.wait(5)

    for _ in range(3):
        pool.spawn(job)
    gevent.sleep(0.01)
    assert len(pool) == 3 and len(set(seen)) == 3
    assert pool.join(0.05) is False
    go.set()
    assert pool.join(1) and len(pool) == 0


def test_two_connections_in_one_turn_of_the_hub_do_not_share_the_one_idle_greenlet():
    """The idle greenlet is claimed by the first when it is queued: the second gets a new one
    at once, not after the first connection ends (the hub wakes a waiting greenlet a turn
    later, by when StreamServer may have handed over the next connection already)."""
    pool = Handlers()
    pool.spawn(lambda: None)
    pool.join(1)
    gevent.sleep(0)  # the finished greenlet is back, waiting
    go, second_ran = Event(), Event()
    pool.spawn(go.wait, 5)
    pool.spawn(second_ran.set)
    assert second_ran.wait(1)
    go.set()
    assert pool.join(1)


def test_only_keep_idle_greenlets_stay():
    pool = Handlers(keep=2)
    go = Event()
    for _ in range(5):
        pool.spawn(go.wait, 5)
    gevent.sleep(0.01)
    go.set()
    pool.join(1)
    gevent.sleep(0.01)
    assert len(pool._all) == 2


def test_a_failing_connection_handler_is_logged_and_its_greenlet_goes_on(caplog_loguru):
    pool = Handlers()
    ran = []

    def bad():
        ran.append(gevent.getcurrent())
        raise RuntimeError("bug")

    pool.spawn(bad)
    pool.join(1)
    pool.spawn(lambda: ran.append(gevent.getcurrent()))
    pool.join(1)
    assert ran[0] is ran[1]
    assert "connection handler failed" in caplog_loguru.text


def test_an_interrupt_reaches_the_session_it_was_meant_for():
    pool = Handlers()
    started, caught = Event(), []

    def session():
        started.set()
        try:
            gevent.sleep(5)
        except Stop as exc:
            caught.append(exc)

    pool.spawn(session)
    started.wait(1)
    (worker,) = pool._all
    interrupt(worker, Stop(), lambda: True)
    assert pool.join(1) and len(caught) == 1


def test_an_interrupt_for_a_session_that_ended_spares_the_next_one_on_its_greenlet():
    pool = Handlers()
    order = []
    second_started = Event()

    def first():
        order.append("first")

    def second():
        second_started.set()
        try:
            gevent.sleep(0.2)
            order.append("second ran to its end")
        except Stop:
            order.append("second interrupted")

    pool.spawn(first)
    pool.join(1)
    (worker,) = pool._all
    current = ["first"]  # which session the greenlet runs: what the server's live map says
    pool.spawn(second)
    current[0] = "second"
    interrupt(worker, Stop(), lambda: current[0] == "first")  # meant for the first, long gone
    second_started.wait(1)
    assert pool.join(2)
    assert order == ["first", "second ran to its end"]


def test_kill_ends_idle_and_busy_greenlets():
    pool = Handlers()
    pool.spawn(lambda: None)
    pool.spawn(gevent.sleep, 10)
    gevent.sleep(0.01)
    workers = list(pool._all)
    assert len(workers) == 2
    pool.kill(timeout=1)
    assert all(g.dead for g in workers)


@pytest.fixture
def caplog_loguru():
    from loguru import logger

    class Text:
        text = ""

    sink = Text()

    def write(message):
        sink.text += str(message)

    handler = logger.add(write, level="ERROR")
    yield sink
    logger.remove(handler)


def test_a_bounded_pool_runs_at_most_size_jobs_and_waits_for_room():
    pool = Handlers(size=2, name="delivery")
    go = Event()
    running = []

    def job(n):
        running.append(n)
        go.wait(5)

    pool.spawn(job, 1)
    pool.spawn(job, 2)
    third = gevent.spawn(pool.spawn, job, 3)  # waits for room, as gevent's Pool does
    gevent.sleep(0.05)
    assert running == [1, 2] and not third.dead
    waiter = gevent.spawn(pool.wait_available)
    gevent.sleep(0.01)
    assert not waiter.dead
    go.set()
    assert pool.join(1) and sorted(running) == [1, 2, 3]
    waiter.join(1)
    assert waiter.dead


def test_background_jobs_run_in_kept_greenlets(monkeypatch):
    from geosmtp import handlers
    monkeypatch.setattr(handlers, "_kept", WeakKeyDictionary())  # a pool of this test's own
    ran = []
    handlers.spawn(lambda: ran.append(gevent.getcurrent()))
    gevent.sleep(0.01)
    gevent.sleep(0)
    handlers.spawn(lambda: ran.append(gevent.getcurrent()))
    gevent.sleep(0.01)
    assert len(ran) == 2 and ran[0] is ran[1]


def test_background_jobs_of_a_thread_that_ended_leave_the_main_hubs_alone(monkeypatch):
    """A thread with a hub of its own (a server run in a thread) keeps greenlets of that hub
    idle when it ends: the main hub's jobs must not be handed to them (before: a pool for
    the whole process, whose idle greenlets of a dead hub took the jobs and never ran them;
    tests/unit/test_batches.py hung on it when a test before it in the process did that)."""
    from geosmtp import handlers
    monkeypatch.setattr(handlers, "_kept", WeakKeyDictionary())
    thread_ran = []

    def in_thread():
        handlers.spawn(thread_ran.append, 1)
        gevent.sleep(0.01)  # the job ran; its greenlet idles in this thread's hub

    worker = gevent.get_hub().threadpool.spawn(in_thread)
    worker.get(timeout=5)
    ran = Event()
    handlers.spawn(ran.set)
    assert thread_ran == [1] and ran.wait(2)
