"""The queue manager: claims due spool entries and delivers them through a greenlet pool.

It alone decides what happens to a recipient after an attempt: 2xx done, 5xx failed, 4xx
retried on the schedule until the message is too old. Delivery code only returns a Reply
per recipient; it never touches the spool.

Nothing here walks a directory on the hub. incoming/ (normally small) is listed in a thread
at each scan. deferred/ is never listed per scan: the queue manager is the only writer into
it, so it keeps the next attempt of every entry in memory (a Schedule), built by a walk in a
thread at start-up and updated at every defer. geosmtp-queue only takes entries out of
deferred/ (a stale item's claim then fails and it is dropped), or puts one back that the
schedule still has. What else could put an entry there unseen (a person's mv, a restored
backup) is found by the same walk, repeated in a thread every WALK_EVERY scans.
"""
from __future__ import annotations

import os
import time
from functools import partial
from itertools import chain, islice
from typing import Callable, Protocol, Sequence

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from loguru import logger

from geosmtp import bounce, metrics
from geosmtp.dkim import Signer
from geosmtp.envelope import DELIVERED, FAILED, PENDING, ClientInfo, Envelope, Recipient
from geosmtp.relay.client import Outgoing
from geosmtp.relay.pool import Outcome
from geosmtp.replies import Reply
from geosmtp.schedule import Schedule
from geosmtp.spool import Spool, SpoolError

NO_RELAY = Reply(451, "4.4.0", "No route for remote delivery is configured")
EXPIRED = Reply(554, "5.4.7", "Delivery time expired")  # RFC 3463 5.4.7
SIGNING_AT_ONCE = 2  # DKIM signatures in progress (memory: a whole message each)
MAX_HOPS = 100  # Received: fields; RFC 5321 6.3: a large threshold, "normally at least 100"
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")
WALK_EVERY = 10  # scans between two walks of deferred/ (the safety net; see above)
GIVE_WAY = 200  # due entries looked at between two turns given to the hub (claims and drops)
MERGE_SLICE = 2000  # entries of a walk added to the schedule between two turns of the hub
TURN = 0.001  # seconds of one turn given to the hub


class Local(Protocol):
    def deliver(self, envelope: Envelope, index: int, open_body, redelivery: bool) -> Reply: ...


class Remote(Protocol):
    def destination(self, domain: str) -> str: ...

    def deliver(self, destination: str, msg: Outgoing, open_body) -> list[Outcome]: ...


def give_way() -> None:
    """Let the hub run a whole loop iteration (timers and I/O) before going on. sleep(0)
    would not: it runs the other ready greenlets and can come back before any I/O is polled
    (gevent's docs say so; measured: 180 ms without a timer firing over 50 of them)."""
    gevent.sleep(TURN)


def next_delay(schedule: Sequence[float], attempts: int) -> float:
    """Seconds to wait after the given number of attempts; the last interval repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _non_ascii(text: str) -> bool:
    return not text.isascii()


def tls_token(tls: str | None) -> str:
    """Outcome.tls as one word for the status line: "TLSv1.3/verified", "TLSv1.2/unverified",
    "none" (the transaction went in plaintext), "-" (no transaction was tried: local delivery,
    or no host took part: DNS, refused connections, a TLS-required host without STARTTLS)."""
    return tls.replace(" ", "/") if tls else "-"


class QueueManager:
    def __init__(
        self,
        spool: Spool,
        local: Local,
        local_domains: frozenset[str],
        *,
        relay: Remote | None = None,
        signer: Signer | None = None,
        may_sign: Callable[[Envelope], bool] = lambda envelope: False,
        hostname: str = "localhost",
        concurrency: int = 20,
        retry_schedule: Sequence[float] = (300.0,),
        max_lifetime: float = 5 * 86400.0,
        scan_interval: float = 30.0,
        delay_warning: float | None = None,
    ):
        self.spool = spool
        self.local = local
        self.local_domains = local_domains
        self.relay = relay
        self.signer = signer
        self.may_sign = may_sign
        self.hostname = hostname
        self.retry_schedule = tuple(retry_schedule)
        self.max_lifetime = max_lifetime
        self.scan_interval = scan_interval
        self.delay_warning = delay_warning
        self.pool = gevent.pool.Pool(concurrency)
        self._signing = gevent.lock.BoundedSemaphore(SIGNING_AT_ONCE)
        self._wakeup = gevent.event.Event()
        self._recovered: set[str] = set()
        self._loops: list[gevent.Greenlet] = []
        self.schedule = Schedule()  # next attempt of each deferred/ entry
        self.walks = 0  # walks of deferred/ done
        self._delivering: set[str] = set()  # claimed, in active/, their attempt under way

    def start(self, recovered: Sequence[str] = ()) -> None:
        self._recovered = set(recovered)
        self._loops = [gevent.spawn(self._run), gevent.spawn(self._walk_forever)]
        self._wakeup.set()

    def notify(self, qid: str | None = None) -> None:
        """A new entry is in incoming/: look now rather than at the next scan."""
        self._wakeup.set()

    def stop(self, timeout: float = 10.0) -> None:
        gevent.killall(self._loops)
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
        """Claim every due entry (all of incoming/, oldest first, then the deferred entries
        whose time has come, earliest first) and start its delivery; the number started."""
        now = time.time() if now is None else now
        incoming = self.spool.run(self.spool.ids, "incoming")
        due = chain(((qid, "incoming") for qid in incoming),
                    ((qid, "deferred") for qid in self.schedule.due(now)))
        started = 0
        for i, (qid, state) in enumerate(due, 1):
            if qid is not None:  # None: a stale item of the schedule, dropped
                started += self._start(qid, state)
            if i % GIVE_WAY == 0:  # a failed claim or a dropped item does not wait
                give_way()
        return started

    def _start(self, qid: str, state: str) -> bool:
        if state == "incoming":
            self.schedule.discard(qid)  # flushed from deferred/: its time there is over
        self.pool.wait_available()  # gives way to the hub when the pool is full
        if not self.spool.claim(qid, state):
            return False
        self._delivering.add(qid)
        self.pool.spawn(self.deliver, qid)
        return True

    # -- the schedule of deferred/ ----------------------------------------------------------
    def _walk_forever(self) -> None:
        while True:
            try:
                self.walk_deferred()
            except Exception:
                logger.exception("queue: walk of deferred/ failed")
            gevent.sleep(WALK_EVERY * self.scan_interval)

    def walk_deferred(self) -> int:
        """Schedule every deferred/ entry the schedule does not know: all of them at start-up,
        later only what something else put there. The walk runs in a thread; the hub adds
        what it found a slice at a time. The number added."""
        began = time.monotonic()
        found = self.spool.run(self.spool.deferred_times)
        walked = time.monotonic() - began
        first = not self.walks
        added = 0
        pairs = iter(found.items())
        for _ in range(0, len(found), MERGE_SLICE):
            # an entry in delivery may have been seen in deferred/ before it was claimed:
            # its attempt schedules it again, if it must
            added += self.schedule.add_missing(islice(pairs, MERGE_SLICE), busy=self._delivering)
            give_way()
        self.walks += 1
        if first:
            logger.info("queue: {} deferred entries scheduled (walk {:.2f}s, in all {:.2f}s)",
                        added, walked, time.monotonic() - began)
        elif added:
            logger.info("queue: {} deferred entries found that the schedule did not know", added)
        if added:
            self._wakeup.set()  # some may be due already
        return added

    def deliver(self, qid: str) -> None:
        try:
            self._deliver(qid)
        except Exception:  # a bug must not strand the entry in active/ until the next restart
            logger.bind(sid=qid).exception("queue: delivery failed")
            try:
                when = time.time() + self.retry_schedule[0]
                if self.spool.move(qid, "active", "deferred", when=when):
                    self.schedule.add(qid, when)
            except OSError:
                logger.bind(sid=qid).exception("queue: cannot defer; it stays in active/")
        finally:
            self._delivering.discard(qid)

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
        if not os.path.exists(self.spool.message_path(qid)):
            # no message will ever come back (an operator's delete that raced our last
            # rewrite, or a damaged spool): park the envelope where a person looks
            log.error("queue: the message file is gone; entry moved to corrupt/")
            self.spool.move(qid, "active", "corrupt")
            return
        redelivery = qid in self._recovered
        now = time.time()
        envelope.attempts += 1
        envelope.last_attempt = now
        client = envelope.client
        log.info("from=<{}> size={} nrcpt={} attempt={} client=[{}] helo={} tls={} user={}", envelope.sender,
                 envelope.size, len(envelope.pending()), envelope.attempts, client.address, client.helo or "-",
                 (client.tls or "-").partition(" ")[0], client.auth_user or "-")
        open_body = partial(self.spool.open_body, qid)
        failed: list[Recipient] = []
        record = partial(self._record, envelope, now, failed, log)
        remote: dict[str, list[int]] = {}
        returned = envelope.extra.pop("return_to_sender", None)  # geosmtp-queue bounce
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.status != PENDING:
                continue
            if returned is not None:
                record(index, Outcome(Reply(554, "5.0.0", f"Returned to sender by the postmaster: {returned}")),
                       "returned")
                continue
            domain = rcpt.address.rpartition("@")[2].lower()
            if domain in self.local_domains:
                record(index, Outcome(self.local.deliver(envelope, index, open_body, redelivery)), "local")
            else:  # grouped by where it goes: a smarthost takes every domain in one transaction
                destination = self.relay.destination(domain) if self.relay else domain
                remote.setdefault(destination, []).append(index)
        if remote:
            self._relay(envelope, remote, open_body, record, log)
        if envelope.pending() and now - envelope.created >= self.max_lifetime:
            failed += self._expire(envelope, log)
        # the sender's notice is durable before the recipients' new state: a crash in
        # between repeats the attempt (and maybe the notice), it never loses the notice
        if failed:
            self._notify_sender(envelope, failed, bounce.FAILED, log)
        if (envelope.pending() and self.delay_warning is not None and "warned" not in envelope.extra
                and now - envelope.created >= self.delay_warning):
            self._notify_sender(envelope, envelope.pending(), bounce.DELAYED, log)
            envelope.extra["warned"] = now
        if envelope.pending():
            self._defer(envelope, now + next_delay(self.retry_schedule, envelope.attempts), log)
        else:
            self.spool.done(qid)
            log.info("removed")
        self._recovered.discard(qid)

    def _record(self, envelope: Envelope, now: float, failed: list[Recipient], log,
                index: int, outcome: Outcome, where: str) -> None:
        """One recipient's outcome of this attempt: its new state, a metric and a log line
        (failed ones are added to `failed`, for the sender's notice)."""
        rcpt = envelope.recipients[index]
        reply = outcome.reply
        rcpt.attempts += 1
        rcpt.last_reply = str(reply)
        rcpt.remote = outcome.remote
        rcpt.updated = now
        if reply.code < 400:
            rcpt.status = DELIVERED
            metrics.DELIVERY_SECONDS.observe(max(time.time() - envelope.created, 0.0))
        elif reply.code >= 500:
            rcpt.status = FAILED
            failed.append(rcpt)
        result = {DELIVERED: "sent", FAILED: "bounced"}.get(rcpt.status, "deferred")
        if where != "returned":  # returned by the postmaster: not a delivery attempt
            metrics.DELIVERIES.labels(result, where).inc()
        relay = outcome.remote or ("local" if where == "local" else "none")
        log.info("to=<{}> relay={} tls={} delay={:.1f} attempt={} status={} ({})", rcpt.address, relay,
                 tls_token(outcome.tls), now - envelope.created, rcpt.attempts, result, reply)

    def _expire(self, envelope: Envelope, log) -> list[Recipient]:
        """Give up on the recipients still pending: the message is too old."""
        expired = envelope.pending()
        for rcpt in expired:
            rcpt.status = FAILED
            rcpt.last_reply = f"{EXPIRED} (last: {rcpt.last_reply})"
            log.info("to=<{}> status=expired after {} attempts", rcpt.address, rcpt.attempts)
        return expired

    def _defer(self, envelope: Envelope, when: float, log) -> None:
        if self.spool.defer(envelope, when):
            self.schedule.add(envelope.id, when)
        else:
            log.warning("queue: entry removed during delivery; not deferred")

    # -- relay ------------------------------------------------------------------------------
    def _relay(self, envelope: Envelope, remote: dict[str, list[int]], open_body,
               record: Callable[[int, Outcome, str], None], log) -> None:
        """Hand the remote recipients to the relay, a transaction per destination (a domain,
        or the smarthost), all destinations at once; each result is recorded as it comes."""
        def all_get(outcome: Outcome) -> None:
            for indices in remote.values():
                for i in indices:
                    record(i, outcome, "remote")

        if self.relay is None:
            return all_get(Outcome(NO_RELAY))
        with open_body() as fh:
            size = os.fstat(fh.fileno()).st_size - fh.tell()
            headers = bounce.header_section(fh)
        # RFC 5321 6.3: a message that has been through this many hosts is in a loop
        hops = sum(1 for line in headers.split(b"\r\n") if line[:9].lower() == b"received:")
        if hops > MAX_HOPS:
            return all_get(Outcome(TOO_MANY_HOPS))
        prefix = self._signature(envelope, open_body, log)
        size += len(prefix)
        saving = gevent.lock.Semaphore()
        unfinished = [len(remote)]

        def one(destination: str, indices: list[int]) -> None:
            recipients = tuple(envelope.recipients[i].address for i in indices)
            # RFC 6531 3.2: SMTPUTF8 is needed when an address of this transaction or a
            # header is not ASCII
            needs_utf8 = envelope.smtputf8 and (
                _non_ascii(envelope.sender) or any(map(_non_ascii, recipients)) or not headers.isascii())
            msg = Outgoing(
                sender=envelope.sender, recipients=recipients, size=size, prefix=prefix,
                eightbit=envelope.body == "8BITMIME", smtputf8=needs_utf8,
            )
            for i, outcome in zip(indices, self.relay.deliver(destination, msg, open_body)):
                record(i, outcome, "remote")
            unfinished[0] -= 1
            if unfinished[0]:
                # other destinations are still in flight, maybe for minutes: save what this one
                # achieved now, so a crash does not send it again
                with saving:
                    self.spool.update(envelope)

        jobs = [gevent.spawn(one, destination, indices) for destination, indices in remote.items()]
        gevent.joinall(jobs, raise_error=True)

    def _signature(self, envelope: Envelope, open_body, log) -> bytes:
        """The DKIM-Signature lines for this message: made once, before its first relay
        attempt, off the hub, and kept in the envelope so every retry sends the same bytes."""
        if "dkim" in envelope.extra:
            return envelope.extra["dkim"].encode("utf-8")
        signature = b""
        if self.signer and self.may_sign(envelope):
            def sign() -> bytes:
                with open_body() as fh:
                    return self.signer.sign(fh.read(), envelope.sender)
            try:
                # dkimpy wants the whole message in memory and is CPU-bound: a few at a time
                with self._signing:
                    signature = self.spool.run(sign)
            except Exception as exc:  # a message dkimpy cannot parse still goes, unsigned
                log.warning("dkim: not signed: {}", exc)
        envelope.extra["dkim"] = signature.decode("utf-8")
        return signature

    # -- notices to the sender --------------------------------------------------------------
    def _sent_headers(self, envelope: Envelope, recipients: list[Recipient]) -> bytes:
        """The header section as it was sent to these recipients: with the DKIM-Signature the
        relay put before the spooled message when one of them is remote. Runs in a thread."""
        signature = envelope.extra.get("dkim", "").encode("utf-8")
        if signature and all(r.address.rpartition("@")[2].lower() in self.local_domains for r in recipients):
            signature = b""  # local copies are stored as received, unsigned
        with self.spool.open_body(envelope.id) as fh:
            return signature + bounce.header_section(fh, bounce.HEADER_LIMIT - len(signature))

    def _notify_sender(self, envelope: Envelope, recipients: list[Recipient], kind: str, log) -> None:
        if not bounce.should_notify(envelope):
            log.info("no {} notice: the message has the null sender", kind)
            return
        try:
            headers = self.spool.run(self._sent_headers, envelope, recipients)
        except OSError:
            headers = b""
        now = time.time()
        data = bounce.build(envelope, recipients, kind=kind, reporting_mta=self.hostname,
                            original_headers=headers, now=now,
                            retry_until=envelope.created + self.max_lifetime)
        writer = self.spool.open_message()
        notice = Envelope(
            id=writer.id, created=now, sender="",
            recipients=[Recipient(address=envelope.sender, original=envelope.sender)],
            client=ClientInfo(address="127.0.0.1", helo=self.hostname, listener="bounce"),
            size=len(data), body="7BIT" if data.isascii() else "8BITMIME",
            smtputf8=_non_ascii(envelope.sender),
        )
        try:
            writer.write(data)
            self.spool.commit(writer, notice)
        except SpoolError as exc:
            # the recipients' new state must not be saved without the notice: retry later
            log.error("queue: cannot queue the {} notice: {}", kind, exc)
            raise
        log.info("sender notice {} ({}) queued as {}", kind, len(recipients), notice.id)
        self.notify()
