"""geosmtp.ratelimit.MemoryLimiter with an injected clock: counts, window rollover, purge bound."""
import pytest

from geosmtp.ratelimit import Limiter, MemoryLimiter

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 10 * HOUR):  # at the start of a fixed window
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def limiter(clock):
    return MemoryLimiter(clock=clock)


def test_satisfies_the_limiter_interface(limiter):
    def use(lim: Limiter) -> float:
        lim.add("k", HOUR)
        return lim.count("k", HOUR)

    assert use(limiter) == 1


def test_counts_per_key_and_per_window(limiter, clock):
    assert limiter.count("ip:192.0.2.1", HOUR) == 0
    for _ in range(3):
        limiter.add("ip:192.0.2.1", HOUR)
    limiter.add("ip:192.0.2.2", HOUR)
    limiter.add("ip:192.0.2.1", 60.0)
    assert limiter.count("ip:192.0.2.1", HOUR) == 3
    assert limiter.count("ip:192.0.2.2", HOUR) == 1
    assert limiter.count("ip:192.0.2.1", 60.0) == 1
    assert limiter.count("user:alice@example.test", HOUR) == 0
    clock.now += HOUR / 2  # still inside the same fixed window
    assert limiter.count("ip:192.0.2.1", HOUR) == 3


def test_count_does_not_add(limiter):
    for _ in range(5):
        assert limiter.count("k", HOUR) == 0
    limiter.add("k", HOUR)
    for _ in range(5):
        assert limiter.count("k", HOUR) == 1


def test_previous_window_is_weighted_by_its_overlap(limiter, clock):
    for _ in range(4):
        limiter.add("k", HOUR)
    clock.now += HOUR  # the next fixed window has just begun: the last hour still holds all 4
    assert limiter.count("k", HOUR) == pytest.approx(4)
    clock.now += HOUR / 4  # a quarter into it: 3/4 of the old window still overlaps
    assert limiter.count("k", HOUR) == pytest.approx(3)
    limiter.add("k", HOUR)
    assert limiter.count("k", HOUR) == pytest.approx(4)
    clock.now += HOUR / 2  # three quarters in
    assert limiter.count("k", HOUR) == pytest.approx(1 + 1)


def test_events_older_than_two_windows_are_forgotten(limiter, clock):
    for _ in range(10):
        limiter.add("k", HOUR)
    clock.now += 2 * HOUR
    assert limiter.count("k", HOUR) == 0
    limiter.add("k", HOUR)
    assert limiter.count("k", HOUR) == 1
    clock.now += 5 * HOUR + 123
    assert limiter.count("k", HOUR) == 0


def test_rollover_carries_only_the_window_just_ended(limiter, clock):
    limiter.add("k", HOUR)  # window n
    clock.now += HOUR
    for _ in range(2):
        limiter.add("k", HOUR)  # window n+1
    clock.now += HOUR  # start of window n+2: n+1 counts fully, n not at all
    assert limiter.count("k", HOUR) == pytest.approx(2)


def test_a_limit_is_reached_and_later_released(limiter, clock):
    limit = 3
    allowed = 0
    for _ in range(10):
        if limiter.count("ip:x", HOUR) < limit:
            limiter.add("ip:x", HOUR)
            allowed += 1
    assert allowed == limit
    clock.now += 2 * HOUR
    assert limiter.count("ip:x", HOUR) < limit


def test_purge_keeps_the_number_of_keys_bounded(clock):
    lim = MemoryLimiter(clock=clock, max_keys=10)
    for i in range(1000):
        lim.add(f"k{i}", HOUR)
        assert len(lim._slots) <= 10
        if i % 7 == 0:
            clock.now += 60
    # reading a fresh key may not grow it either
    for i in range(100):
        lim.count(f"read{i}", HOUR)
        assert len(lim._slots) <= 10


def test_purge_drops_stale_keys_first(clock):
    lim = MemoryLimiter(clock=clock, max_keys=4)
    for name in ("old1", "old2"):
        lim.add(name, HOUR)
    clock.now += 2 * HOUR  # old1 and old2 are now idle for two windows
    for name in ("new1", "new2"):
        lim.add(name, HOUR)
    lim.add("new3", HOUR)  # full: the stale ones go, the fresh ones stay
    assert set(k for k, _ in lim._slots) == {"new1", "new2", "new3"}
    assert lim.count("new1", HOUR) == 1


def test_just_after_a_boundary_the_last_window_counts_whole(limiter, clock):
    """Found in the suite: auth_failures_per_hour_per_ip = 1 let a second attempt through
    when the hour's boundary fell between the two (1 x 0.9999 < 1)."""
    clock.now = HOUR - 0.5
    limiter.add("k", HOUR)
    clock.now = HOUR + 0.5
    assert limiter.count("k", HOUR) >= 1
