"""How long a client may take: the time and error limits a session works under, and the
clock that bounds a whole DATA body.

A session reads its Limits afresh at every receive (normal ones, or the stricter ones while
its listener is under stress: geosmtp.stress), so a change reaches sessions already open,
and a drip feels it at its next octet.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from time import monotonic
from typing import Callable

from geosmtp.connection import DataTooSlow, ReadTimeout


@dataclass(frozen=True, slots=True)
class Limits:
    command_timeout: float = 300.0  # a whole command line (or SASL response) must arrive in this
    data_timeout: float = 180.0  # the longest silence while a message body arrives
    data_deadline: float = 300.0  # a body's time in hand: see DataClock
    min_data_rate: float = 500.0  # octets per second a body must keep up on average
    max_errors: int = 20  # 5xx replies, then 421 4.7.0

    def tightened(self, timeout: float, min_data_rate: float, max_errors: int) -> "Limits":
        """These limits made stricter (never looser): every timeout at most `timeout`, the
        rate at least `min_data_rate`, errors at most `max_errors`."""
        return replace(
            self,
            command_timeout=min(self.command_timeout, timeout),
            data_timeout=min(self.data_timeout, timeout),
            data_deadline=min(self.data_deadline, timeout),
            min_data_rate=max(self.min_data_rate, min_data_rate),
            max_errors=min(self.max_errors, max_errors),
        )


class DataClock:
    """The deadline of one DATA body, as Postfix's smtpd_per_request_deadline with
    smtpd_min_data_rate (and Apache's RequestReadTimeout MinRate) work: the body starts with
    `data_deadline` seconds in hand; every receive spends the time it took and earns one
    second per `min_data_rate` octets it brought; no more than `data_deadline` can be saved up
    (a fast start buys no time for a drip later). A client at or above the rate never runs out;
    one byte every few seconds does within `data_deadline`. Besides, no single wait may last
    longer than `data_timeout`. `limits` is asked at every step: stress applies at once."""

    def __init__(self, limits: Callable[[], Limits], clock: Callable[[], float] = monotonic):
        self._limits = limits
        self._clock = clock
        self.started = clock()
        self.due = self.started + limits().data_deadline
        self.received = 0
        self._slow = False  # the last wait was cut by the deadline, not by data_timeout

    def wait(self) -> float:
        """Seconds the next receive may wait (0 or less: the deadline has passed)."""
        lim, now = self._limits(), self._clock()
        self.due = min(self.due, now + lim.data_deadline)  # a shorter deadline applies at once
        left = self.due - now
        self._slow = left <= lim.data_timeout
        return min(left, lim.data_timeout)

    def got(self, octets: int) -> None:
        """A receive brought `octets`."""
        lim, now = self._limits(), self._clock()
        self.received += octets
        self.due = min(self.due + octets / lim.min_data_rate, now + lim.data_deadline)

    def expired(self) -> ReadTimeout:
        """What the last wait's expiry means: too slow (DataTooSlow), or silent too long."""
        return DataTooSlow() if self._slow else ReadTimeout()

    def progress(self) -> float:
        """The moment a body sent at exactly `min_data_rate` would have reached with the
        octets received so far (at most now): how recently this body did something useful."""
        lim, now = self._limits(), self._clock()
        return min(now, self.started + self.received / lim.min_data_rate)
