"""The queue manager: claims due spool entries and delivers them through a greenlet pool.

It alone decides what happens to a recipient after an attempt: 2xx done, 5xx failed, 4xx
retried on the schedule until the message is too old. Delivery code only returns a Reply
per recipient; it never touches the spool.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Protocol, Sequence

import gevent
import gevent.event
import gevent.pool
from loguru import logger

from geosmtp.envelope import DELIVERED, FAILED, PENDING, Envelope
from geosmtp.replies import Reply
from geosmtp.spool import Spool

NO_RELAY = Reply(451, "4.4.0", "No route for remote delivery is configured")
EXPIRED = Reply(554, "5.4.7", "Delivery time expired")  # RFC 3463 5.4.7


class Local(Protocol):
    def deliver(self, envelope: Envelope, index: int, open_body, redelivery: bool) -> Reply: ...


def next_delay(schedule: Sequence[float], attempts: int) -> float:
    """Seconds to wait after the given number of attempts; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


class QueueManager:
    def __init__(
        self,
        spool: Spool,
        local: Local,
        local_domains: frozenset[str],
        *,
        concurrency: int = 20,
        retry_schedule: Sequence[float] = (300.0,),
        max_lifetime: float = 5 * 86400.0,
        scan_interval: float = 30.0,
    ):
        self.spool = spool
        self.local = local
        self.local_domains = local_domains
        self.retry_schedule = tuple(retry_schedule)
        self.max_lifetime = max_lifetime
        self.scan_interval = scan_interval
        self.pool = gevent.pool.Pool(concurrency)
        self._wakeup = gevent.event.Event()
        self._recovered: set[str] = set()
        self._loop: gevent.Greenlet | None = None
        self._last_deferred_scan = 0.0

    def start(self, recovered: Sequence[str] = ()) -> None:
        self._recovered = set(recovered)
        self._loop = gevent.spawn(self._run)
        self._wakeup.set()

    def notify(self, qid: str | None = None) -> None:
        """A new entry is in incoming/: look now rather than at the next scan."""
        self._wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None:
            self._loop.kill()
        # deliveries still running after the timeout are killed; their entries stay in
        # active/ and go back to incoming/ at the next start
        self.pool.join(timeout=timeout)
        self.pool.kill()

    def _run(self) -> None:
        while True:
            self._wakeup.wait(self.scan_interval)
            self._wakeup.clear()
            try:
                self.run_once()
            except Exception:
                logger.exception("queue: scan failed")
                gevent.sleep(1)

    def run_once(self, now: float | None = None) -> int:
        """Claim every due entry and start its delivery; the number started."""
        now = time.time() if now is None else now
        include_deferred = now - self._last_deferred_scan >= self.scan_interval
        if include_deferred:
            self._last_deferred_scan = now
        started = 0
        for qid, state in self.spool.due(now, deferred=include_deferred):
            self.pool.wait_available()
            if self.spool.claim(qid, state):
                self.pool.spawn(self.deliver, qid)
                started += 1
        return started

    def deliver(self, qid: str) -> None:
        try:
            self._deliver(qid)
        except Exception:  # a bug must not strand the entry in active/ until the next restart
            logger.bind(sid=qid).exception("queue: delivery failed")
            try:
                self.spool.move(qid, "active", "deferred", when=time.time() + self.retry_schedule[0])
            except OSError:
                logger.bind(sid=qid).exception("queue: cannot defer; it stays in active/")

    def _deliver(self, qid: str) -> None:
        log = logger.bind(sid=qid)
        try:
            envelope = self.spool.run(self.spool.load, qid)
        except FileNotFoundError:
            return
        except (ValueError, TypeError, KeyError) as exc:
            log.error("queue: unreadable envelope ({}); moved to corrupt/", exc)
            self.spool.move(qid, "active", "corrupt")
            return
        redelivery = qid in self._recovered
        now = time.time()
        envelope.attempts += 1
        envelope.last_attempt = now
        open_body = partial(self.spool.open_body, qid)
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.status != PENDING:
                continue
            if rcpt.address.rpartition("@")[2].lower() in self.local_domains:
                reply = self.local.deliver(envelope, index, open_body, redelivery)
            else:
                reply = NO_RELAY
            rcpt.attempts += 1
            rcpt.last_reply = str(reply)
            rcpt.updated = now
            if reply.code < 400:
                rcpt.status = DELIVERED
            elif reply.code >= 500:
                rcpt.status = FAILED
            log.info(
                "to=<{}> status={} attempt={} reply={}",
                rcpt.address, rcpt.status if rcpt.status != PENDING else "deferred", rcpt.attempts, reply,
            )
        if envelope.pending() and now - envelope.created >= self.max_lifetime:
            for rcpt in envelope.pending():
                rcpt.status = FAILED
                rcpt.last_reply = f"{EXPIRED} (last: {rcpt.last_reply})"
                log.info("to=<{}> status=expired after {} attempts", rcpt.address, rcpt.attempts)
        if envelope.pending():
            when = now + next_delay(self.retry_schedule, envelope.attempts)
            if not self.spool.defer(envelope, when):
                log.warning("queue: entry removed during delivery; not deferred")
        else:
            self.spool.done(qid)
        self._recovered.discard(qid)
