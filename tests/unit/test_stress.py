"""geosmtp.stress: the stress state machine with its hysteresis, and who gives up a slot.

Sessions and greenlets here are small stand-ins with the two attributes the module reads
(the real ones are exercised end to end in tests/e2e/test_slowloris.py)."""
from __future__ import annotations

from loguru import logger

from geosmtp.stress import Evicted, Load, longest_useless, under_stress


class FakeSession:
    def __init__(self, useful_at: float, reading: bool = True):
        self.useful_at, self.evictable, self.log = useful_at, reading, logger

    def last_useful(self) -> float:
        return self.useful_at


class FakeGreenlet:
    def __init__(self):
        self.killed_with = None


def told(greenlet, exception, still):
    """Load's interrupt, recorded: the victim's session is still the one its greenlet runs."""
    assert still()
    greenlet.killed_with = exception


def walk(capacity: int, share: float, path: list[int]) -> list[bool]:
    state, out = False, []
    for n in path:
        state = under_stress(state, n, capacity, share)
        out.append(state)
    return out


def test_stress_starts_at_the_share_and_ends_a_band_below():
    # 40 slots, 80%: on at 32 open, off only at 28 (a tenth of 40 below)
    assert walk(40, 0.8, [31, 32, 31, 29, 28, 29, 31, 32]) == [False, True, True, True, False, False, False, True]


def test_one_session_coming_and_going_at_the_threshold_does_not_flap():
    assert walk(1000, 0.8, [800, 799, 800, 799, 800, 799]) == [True] * 6


def test_tiny_and_full_thresholds():
    assert walk(3, 0.8, [2, 3, 2, 3, 1]) == [False, True, False, True, False]  # band of one
    assert walk(10, 1.0, [9, 10, 9, 8]) == [False, True, False, False]
    assert walk(1, 0.5, [0, 1, 0]) == [False, True, False]


def test_longest_useless_is_the_oldest_last_useful_among_the_evictable():
    sessions = [("a", FakeSession(30.0)), ("b", FakeSession(10.0, reading=False)),
                ("c", FakeSession(20.0)), ("d", FakeSession(25.0))]
    assert longest_useless(sessions) == "c"  # b is older but busy (not waiting for input)
    assert longest_useless([("b", FakeSession(1.0, reading=False))]) is None
    assert longest_useless([]) is None


def make_load(useful: list[float], capacity: int = 4, share: float = 0.5):
    load = Load("test", interrupt=told)
    greenlets = [FakeGreenlet() for _ in useful]
    for g, at in zip(greenlets, useful):
        load.join(g, FakeSession(at), capacity, share)
    return load, greenlets


def test_load_goes_under_stress_and_back_as_sessions_join_and_leave():
    load, gs = make_load([1.0, 2.0], capacity=4, share=0.5)
    assert load.stressed and load.open == 2
    load.leave(gs[0], 4, 0.5)
    assert not load.stressed and load.open == 1


def test_room_is_free_below_capacity_and_nobody_is_evicted():
    load, gs = make_load([1.0, 2.0, 3.0])
    assert load.make_room(4) is True
    assert all(g.killed_with is None for g in gs)


def test_full_load_evicts_the_longest_useless_once_each():
    load, gs = make_load([5.0, 1.0, 3.0, 4.0])
    assert load.make_room(4) is True
    assert isinstance(gs[1].killed_with, Evicted)
    assert load.open == 3  # its slot is the newcomer's at once
    newcomer = FakeGreenlet()
    load.join(newcomer, FakeSession(9.0), 4, 0.5)
    assert load.make_room(4) is True  # a second newcomer: the next one goes, not the same twice
    assert isinstance(gs[2].killed_with, Evicted)
    load.leave(gs[1], 4, 0.5)  # the evicted session ends
    assert load.open == 3 and gs[1] not in load.evicted


def test_full_load_with_nobody_evictable_refuses():
    load = Load("test", interrupt=told)
    for _ in range(2):
        load.join(FakeGreenlet(), FakeSession(1.0, reading=False), 2, 0.8)
    assert load.make_room(2) is False
