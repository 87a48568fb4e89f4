"""geosmtp.destinations: per-destination slots, parked entries, and their order."""
from __future__ import annotations

import pytest

from geosmtp.config import ConfigError, validate
from geosmtp.destinations import Destinations

from tests.unit.test_config import minimal


def test_a_destination_at_its_limit_is_full_until_a_delivery_ends():
    d = Destinations(limit=2)
    a = d.routes(["relay:a.test"])
    ab = d.routes(["relay:b.test", "relay:a.test", "relay:a.test"])
    assert ab == ("relay:a.test", "relay:b.test")
    assert d.routes(["relay:a.test"]) is a  # one shared tuple per set of routes
    d.take(a)
    assert d.full(ab) is None
    d.take(a)
    assert d.full(a) == "relay:a.test" and d.full(ab) == "relay:a.test"
    assert d.full(d.routes(["relay:b.test"])) is None  # another destination has room
    assert d.give_back(a) is False  # nobody waits
    assert d.full(a) is None and d.in_delivery("relay:a.test") == 1
    d.give_back(a)
    assert d.in_delivery("relay:a.test") == 0


def test_parked_entries_come_back_in_order_as_slots_free():
    d = Destinations(limit=1)
    a = d.routes(["relay:a.test"])
    d.take(a)
    for qid in ("Q1", "Q2", "Q3"):
        d.park(qid, "deferred", "relay:a.test")
    assert len(d) == 3 and "Q2" in d
    assert list(d.ready()) == []  # still full
    d.park("Q2", "incoming", "relay:a.test")  # flushed by the operator: keeps its place
    assert d.give_back(a) is True
    taken = []
    for qid, state in d.ready():
        taken.append((qid, state))
        d.take(a)  # the caller starts it: the destination is full again
    assert taken == [("Q1", "deferred")]
    d.give_back(a)
    assert [qid for qid, _ in d.ready()] == ["Q2", "Q3"]  # nobody took a slot: both may go
    assert len(d) == 0


def test_a_caller_that_stops_early_leaves_the_rest_their_turn():
    d = Destinations(limit=5)
    for qid in ("Q1", "Q2", "Q3"):
        d.park(qid, "deferred", "relay:a.test")  # room already: ready at once
    ready = d.ready()
    assert next(ready) == ("Q1", "deferred")
    ready.close()
    assert [qid for qid, _ in d.ready()] == ["Q2", "Q3"]


def test_known_routes_are_remembered_and_forgotten():
    d = Destinations(limit=3)
    r = d.routes(["lmtp:127.0.0.1:24"])
    d.remember("Q1", r)
    assert d.known("Q1") is r and d.known("Q2") is None
    d.forget("Q1")
    d.forget("Q1")
    assert d.known("Q1") is None


@pytest.mark.parametrize("value", [0, -1, 1001, "ten"])
def test_destination_concurrency_is_validated(value):
    data = minimal()
    data["queue"] = {"destination_concurrency": value}
    with pytest.raises(ConfigError) as info:
        validate(data)
    assert "queue.destination_concurrency" in str(info.value)


def test_destination_concurrency_defaults_below_concurrency():
    queue = validate(minimal()).queue
    assert queue.destination_concurrency == 20 < queue.concurrency == 100
