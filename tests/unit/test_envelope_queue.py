"""geosmtp.envelope JSON round trip and geosmtp.queue.next_delay."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosmtp.envelope import DELIVERED, FAILED, PENDING, ClientInfo, Envelope, Recipient
from geosmtp.queue import next_delay


def full_envelope() -> Envelope:
    return Envelope(
        id="0123456789ABCDEF0123",
        created=1_700_000_000.123456,
        sender="ü@bücher.test",
        recipients=[
            Recipient("alice@example.test", "team@example.test"),
            Recipient("bob@example.test", "team@example.test", DELIVERED, 1, "250 2.0.0 Delivered", 1_700_000_100.5),
            Recipient("x@remote.test", "x@remote.test", FAILED, 3, "550 5.1.1 no", None),
        ],
        client=ClientInfo("2001:db8::1", helo="client.test", listener="submission", auth_user="alice",
                          tls="TLSv1.3 TLS_AES_256_GCM_SHA384"),
        size=12345,
        body="8BITMIME",
        smtputf8=True,
        attempts=2,
        last_attempt=1_700_000_200.0,
        extra={"dkim": {"selector": "s1"}, "list": [1, 2]},
    )


def test_round_trip_every_field():
    envelope = full_envelope()
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_round_trip_defaults_and_null_sender():
    envelope = Envelope("0123456789ABCDEF", 0.0, "", [Recipient("a@b.test", "a@b.test")], ClientInfo("192.0.2.1"))
    back = Envelope.from_json(envelope.to_json())
    assert back == envelope
    assert back.sender == "" and back.body == "7BIT" and back.extra == {} and back.recipients[0].status == PENDING


def test_json_is_compact_utf8_and_readable():
    raw = full_envelope().to_json()
    assert "ü@bücher.test".encode() in raw  # not \u-escaped: a person reads these files
    assert b": " not in raw and b", " not in raw
    data = json.loads(raw)
    assert data["recipients"][1]["status"] == "delivered"
    assert data["client"]["auth_user"] == "alice"


def test_pending():
    assert [r.address for r in full_envelope().pending()] == ["alice@example.test"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("id"),
        lambda d: d.update(unknown=1),
        lambda d: d["recipients"][0].pop("address"),
        lambda d: d["client"].update(colour="blue"),
    ],
)
def test_from_json_refuses_a_wrong_shape(mutate):
    data = json.loads(full_envelope().to_json())
    mutate(data)
    with pytest.raises((TypeError, KeyError)):
        Envelope.from_json(json.dumps(data).encode())


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff", b"[]", b"null"])
def test_from_json_garbage(raw):
    # the spool moves these to corrupt/: every failure must be one of the errors it catches
    with pytest.raises((ValueError, TypeError, KeyError)):
        Envelope.from_json(raw)


_text = st.text(max_size=30)
_opt_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)
_recipient = st.builds(Recipient, _text, _text, st.sampled_from([PENDING, DELIVERED, FAILED]),
                       st.integers(0, 100), st.none() | _text, _opt_float)
_client = st.builds(ClientInfo, _text, st.none() | _text, st.none() | _text, st.none() | _text, st.none() | _text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.builds(Envelope, _text, st.floats(allow_nan=False, allow_infinity=False), _text,
                 st.lists(_recipient, max_size=5), _client, st.integers(0, 10**12),
                 st.sampled_from(["7BIT", "8BITMIME"]), st.booleans(), st.integers(0, 100), _opt_float,
                 st.dictionaries(_text, st.none() | st.integers() | _text, max_size=3)))
def test_round_trip_property(envelope):
    assert Envelope.from_json(envelope.to_json()) == envelope


# -- next_delay ---------------------------------------------------------------------------
SCHEDULE = (300.0, 600.0, 1200.0)


@pytest.mark.parametrize(
    "attempts, delay",
    [(0, 300.0), (1, 300.0), (2, 600.0), (3, 1200.0), (4, 1200.0), (100, 1200.0), (-1, 300.0)],
)
def test_next_delay(attempts, delay):
    # the last interval repeats (RFC 5321 4.5.4.1: keep retrying until the lifetime ends)
    assert next_delay(SCHEDULE, attempts) == delay


def test_next_delay_single_interval():
    assert [next_delay([60.0], n) for n in range(5)] == [60.0] * 5
