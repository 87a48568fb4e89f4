"""geosmtp.limits: the DATA deadline arithmetic on a clock the test moves, and the stricter
limits under stress."""
from __future__ import annotations

import pytest

from geosmtp.connection import DataTooSlow, ReadTimeout
from geosmtp.limits import DataClock, Limits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clock_for(limits: Limits) -> tuple[DataClock, Clock, list[Limits]]:
    t = Clock()
    current = [limits]  # the test swaps limits[0] as the stress state would
    return DataClock(lambda: current[0], t), t, current


BASE = Limits(data_timeout=60, data_deadline=100, min_data_rate=500)


def test_starts_with_the_deadline_in_hand_and_silence_bounded():
    dc, t, _ = clock_for(BASE)
    assert dc.wait() == 60  # the silence bound is shorter than the 100 s in hand
    assert isinstance(dc.expired(), ReadTimeout) and not isinstance(dc.expired(), DataTooSlow)
    t.now += 50
    assert dc.wait() == 50  # now the deadline is the nearer bound
    assert isinstance(dc.expired(), DataTooSlow)


def test_each_octet_earns_time_at_the_minimum_rate():
    dc, t, _ = clock_for(BASE)
    t.now += 90
    dc.got(2500)  # 5 s earned
    assert dc.wait() == pytest.approx(15)
    t.now += 15
    assert dc.wait() == pytest.approx(0)


def test_at_the_minimum_rate_a_body_never_runs_out():
    dc, t, _ = clock_for(BASE)
    for _ in range(10_000):  # bounded: 10,000 s of a 35 MB-class body at 500 B/s
        t.now += 1
        dc.got(500)
        assert dc.wait() == 60
    assert dc.received == 5_000_000


def test_savings_are_capped_so_a_fast_start_buys_no_long_drip():
    dc, t, _ = clock_for(BASE)
    t.now += 1
    dc.got(10_000_000)  # 20,000 s "earned" in one second
    assert dc.due == t.now + 100  # but at most data_deadline in hand
    for _ in range(99):  # then one octet a second: bounded, 99 steps
        t.now += 1
        dc.got(1)
    assert 0 < dc.wait() < 2
    t.now += 2
    assert dc.wait() <= 0


def test_one_octet_every_few_seconds_runs_out_within_the_deadline():
    dc, t, _ = clock_for(BASE)
    steps = 0
    while dc.wait() > 0 and steps < 1000:  # bounded
        t.now += 5
        dc.got(3)
        steps += 1
    assert t.now - dc.started <= 100 + 5
    assert isinstance(dc.expired(), DataTooSlow)


def test_stress_shortens_a_body_already_under_way_and_keeps_it_short():
    dc, t, current = clock_for(BASE)
    t.now += 10
    dc.got(5000)
    current[0] = BASE.tightened(timeout=10, min_data_rate=1000, max_errors=3)
    assert dc.wait() == 10  # 10 s in hand at most, at once
    t.now += 4
    dc.got(1000)  # 1 s earned at the stricter rate
    assert dc.wait() == pytest.approx(7)
    current[0] = BASE  # stress over: the time in hand grows back only by earning it
    assert dc.wait() == pytest.approx(7)


def test_progress_is_how_far_the_octets_would_carry_at_the_minimum_rate():
    dc, t, _ = clock_for(BASE)
    t.now += 100
    dc.got(1500)
    assert dc.progress() == dc.started + 3  # a drip: "useful" only 3 s after its start
    dc.got(10_000_000)
    assert dc.progress() == t.now  # a fast body is useful now, never in the future


def test_tightened_never_loosens():
    loose = Limits(command_timeout=5, data_timeout=5, data_deadline=5, min_data_rate=5000, max_errors=1)
    assert loose.tightened(timeout=10, min_data_rate=1000, max_errors=3) == loose
    strict = BASE.tightened(timeout=10, min_data_rate=1000, max_errors=3)
    assert strict == Limits(command_timeout=10, data_timeout=10, data_deadline=10, min_data_rate=1000,
                            max_errors=3)
