"""The queue manager: claims due spool entries and delivers them through a greenlet pool.

It alone decides what happens to a recipient after an attempt: 2xx done, 5xx failed, 4xx
retried on the schedule until the message is too old. Delivery code only returns a Reply
per recipient; it never touches the spool.

Nothing here walks a directory on the hub. A new message's entry is taken when its commit
announces it, durable (see run_once); incoming/ is listed, in a thread, at the periodic
scan, at start-up and when geosmtp-queue asks. deferred/ is never listed per scan: the
queue manager is the only writer into it, so it keeps the next attempt of every entry in
memory (a Schedule), built by a walk in a thread at start-up and updated at every defer.
geosmtp-queue only takes entries out of deferred/ (a stale item's claim then fails and it
is dropped), or puts one back that the schedule still has. What else could put an entry
there unseen (a person's mv, a restored backup) is found by the same walk, repeated in a
thread every WALK_EVERY scans (less often for a queue so big that its walk would cost more
than WALK_SHARE of the time).

The queue manager sleeps until the schedule's next entry is due, or scan_interval at most:
a retry two seconds away is tried two seconds later, and an idle server with 100,000
deferred entries does nothing until one of them is due. A defer earlier than that wakes it,
and so do a new message, geosmtp-queue (SIGUSR1) and a delivery ending for a destination
that entries wait for (Destinations: at most destination_concurrency messages in delivery
for one destination).
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from functools import partial
from itertools import chain, islice
from typing import Callable, Sequence

import gevent
import gevent.event
import gevent.lock
from loguru import logger

from geosmtp import bounce, metrics, safeio
from geosmtp.batches import Batches, each
from geosmtp.config import QueueConfig
from geosmtp.delivery.target import NO_ROUTE, Message, OpenBody, Outcome, Router, Target
from geosmtp.destinations import Destinations, Routes
from geosmtp.dkim import Signer
from geosmtp.envelope import DELIVERED, FAILED, PENDING, ClientInfo, Envelope, Recipient
from geosmtp.handlers import Handlers
from geosmtp.replies import Reply
from geosmtp.schedule import Schedule
from geosmtp.spool import Spool, SpoolError

EXPIRED = Reply(554, "5.4.7", "Delivery time expired")  # RFC 3463 5.4.7
SIGNING_AT_ONCE = 2  # DKIM signatures in progress (memory: a whole message each)
MAX_HOPS = 100  # Received: fields; RFC 5321 6.3: a large threshold, "normally at least 100"
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")
WALK_EVERY = 10  # scans between two walks of deferred/ (the safety net; see above)
WALK_SHARE = 0.1  # at most this share of the time spent walking deferred/ (1,000,000 entries: 6 s a walk)
UNBOUNDED = ("maildir",)  # target kinds without a destination limit: our own disk, nobody to wait for
GIVE_WAY = 200  # due entries looked at between two turns given to the hub (claims and drops)
MERGE_SLICE = 2000  # entries of a walk added to the schedule between two turns of the hub
TURN = 0.001  # seconds of one turn given to the hub
COMMIT_GRACE = 60.0  # seconds after which an entry of incoming/ nobody announced is taken


def give_way() -> None:
    """Let the hub run a whole loop iteration (timers and I/O) before going on. sleep(0)
    would not: it runs the other ready greenlets and can come back before any I/O is polled
    (gevent's docs say so; measured: 180 ms without a timer firing over 50 of them)."""
    gevent.sleep(TURN)


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), for the start-up log line."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError):
        return 0.0
    started = int(stat[stat.rindex(b")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
    return max(uptime - started, 0.0)


class _Either:
    """Membership in either of two containers, without copying them."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __contains__(self, item) -> bool:
        return item in self.first or item in self.second


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
        router: Router,
        settings: QueueConfig = QueueConfig(),
        *,
        signer: Signer | None = None,
        may_sign: Callable[[Envelope], bool] = lambda envelope: False,
        hostname: str = "localhost",
    ):
        self.spool = spool
        self.hostname = hostname
        self.may_sign = may_sign
        # what a reload replaces whole (use()): the routes, the signer, [queue]
        self.router = router  # which target each recipient's domain goes to
        self.signer = signer
        self.settings = settings
        self.pool = Handlers(keep=settings.concurrency, size=settings.concurrency, name="delivery")
        self._signing = gevent.lock.BoundedSemaphore(SIGNING_AT_ONCE)
        self._wakeup = gevent.event.Event()
        # incoming/ entries their committers said are durable (claimed without a listing),
        # and whether the next scan takes every entry there (geosmtp-queue asked)
        self._announced: dict[str, None] = {}
        self._look_all = False
        self._listed_at = 0.0  # when incoming/ was last listed for unannounced entries (monotonic)
        self._started = 0.0  # when start() ran (wall clock): entries written before are settled
        self._recovered: set[str] = set()
        self._loops: list[gevent.Greenlet] = []
        self.schedule = Schedule()  # next attempt of each deferred/ entry
        self.walks = 0  # walks of deferred/ done
        self.walk_seconds = 0.0  # how long the last one took (in its thread)
        self._delivering: set[str] = set()  # claimed, in active/, their attempt under way
        # messages in delivery per destination, and entries waiting for a slot of theirs
        self.destinations = Destinations(min(settings.destination_concurrency, settings.concurrency))
        self._waiting_ids = _Either(self._delivering, self.destinations)  # what a walk must not schedule
        self._armed_until = 0.0  # when the sleeping loop wakes by itself (a defer before it wakes it)
        self._reads = Batches(spool.run, each(self._read))  # the claimed entries', a batch a job

    def start(self, recovered: Sequence[str] = ()) -> None:
        self._recovered = set(recovered)
        self._started = time.time()
        self._loops = [gevent.spawn(self._run), gevent.spawn(self._walk_forever)]
        self._wakeup.set()

    def notify(self, qid: str | None = None) -> None:
        """Look at incoming/ now rather than at the next scan: at the entry `qid`, which its
        commit has made durable, or (None: geosmtp-queue moved entries there) at all."""
        if qid is None:
            self._look_all = True
        else:
            self._announced[qid] = None
        self._wakeup.set()

    def use(self, router: Router, signer: Signer | None, may_sign: Callable[[Envelope], bool],
            settings: QueueConfig) -> None:
        """A reload's new parts, taken whole: attempts that start from now on use them (a
        changed concurrency takes a restart)."""
        self.router, self.signer, self.may_sign, self.settings = router, signer, may_sign, settings
        self.destinations.limit = min(settings.destination_concurrency, settings.concurrency)

    def stop(self, timeout: float = 10.0) -> None:
        gevent.killall(self._loops)
        # deliveries still running after the timeout are killed; their entries stay in
        # active/ and go back to incoming/ at the next start
        self.pool.join(timeout=timeout)
        self.pool.kill(timeout=timeout)
        self.spool.settle(timeout)  # the finished deliveries' entries removed

    def _run(self) -> None:
        while True:
            self._wakeup.wait(self._pause())
            self._wakeup.clear()
            # incoming/ is listed when asked to, and every scan_interval however often commits
            # wake us (a lost notice must not wait for a lull); otherwise only the entries
            # commits named are taken
            due = time.monotonic() - self._listed_at >= self.settings.scan_interval
            look = "all" if self._look_all else "settled" if due else "announced"
            self._look_all = False
            try:
                self.run_once(incoming=look)
            except Exception:
                logger.exception("queue: scan failed")
                gevent.sleep(1)

    def _pause(self) -> float:
        """Seconds to sleep: until the schedule's next entry is due, scan_interval at most."""
        now = time.time()
        pause = self.settings.scan_interval
        next_due = self.schedule.next_due()
        if next_due is not None:
            pause = min(pause, max(next_due - now, 0.0))
        self._armed_until = now + pause
        return pause

    def _schedule(self, qid: str, when: float) -> None:
        """`qid` waits in deferred/ until `when`; the sleeping loop is woken if it would
        sleep past that."""
        self.schedule.add(qid, when)
        if when < self._armed_until:
            self._armed_until = when
            self._wakeup.set()

    def run_once(self, now: float | None = None, incoming: str = "all") -> int:
        """Start every entry that may go: the parked ones whose destination has room again,
        then those of incoming/ (see below), then the deferred entries whose time has
        come, earliest first; the number started.

        Of incoming/: the entries announced by their commits, and then, listing it, "all"
        the others, oldest first, or only the "settled" ones (linked there COMMIT_GRACE
        seconds ago or more, or before start()), or none ("announced"). A commit links its
        entry there before the flush that makes it durable: taken before that flush failed,
        a message answered 451 would be delivered all the same. An entry nobody announced
        (its worker died after its commit, or the notice was lost) is found by a periodic
        scan once settled; every entry is taken when geosmtp-queue asks (an operator's
        action meeting a failing flush is the one case left to that race)."""
        now = time.time() if now is None else now
        waited = self.destinations.ready()
        listed: list[str] = []
        if incoming == "all":
            listed = self.spool.run(self.spool.ids, "incoming")
        elif incoming == "settled":
            before = max(time.time() - COMMIT_GRACE, self._started)
            listed = self.spool.run(self.spool.settled_ids, "incoming", before)
        if incoming != "announced":
            self._listed_at = time.monotonic()
        # an announcement that comes after a listing took its entry (now in delivery, or
        # parked or deferred again) is stale: dropped, not started as if still in incoming/
        announced = {qid: None for qid in self._announced if qid not in self._waiting_ids}
        self._announced = {}
        others = (qid for qid in listed if qid not in announced)
        due = chain(waited, ((qid, "incoming") for qid in chain(announced, others)),
                    ((qid, "deferred") for qid in self.schedule.due(now)))
        started = 0
        for i, (qid, state) in enumerate(due, 1):
            if qid is not None:  # None: a stale item of the schedule, dropped
                started += self._start(qid, state)
            if i % GIVE_WAY == 0:  # a failed claim or a dropped item does not wait
                give_way()
        return started

    def _start(self, qid: str, state: str) -> bool:
        """Claim the entry and start its delivery, unless a destination it is known to go to
        is at its limit: then it waits, in memory, without being claimed."""
        if state == "incoming":
            self.schedule.discard(qid)  # flushed from deferred/: its time there is over
        if qid in self.destinations:  # parked already (an operator's flush moved it)
            self.destinations.moved(qid, state)
            return False
        routes = self.destinations.known(qid)
        if routes is not None and self._parked(qid, state, routes):
            return False
        self.pool.wait_available()  # gives way to the hub when the pool is full
        # the wait may have let other entries take the last slot of a destination
        if routes is not None and self._parked(qid, state, routes):
            return False
        if not self.spool.claim(qid, state):
            self.destinations.forget(qid)  # deleted or held meanwhile
            return False
        if routes is not None:
            self.destinations.take(routes)
        self._delivering.add(qid)
        self.pool.spawn(self.deliver, qid, routes)
        return True

    def _parked(self, qid: str, state: str, routes: Routes) -> bool:
        """Park the entry if one of its destinations is at its limit; True if so."""
        full = self.destinations.full(routes)
        if full is None:
            return False
        self.destinations.park(qid, state, full)
        return True

    # -- the schedule of deferred/ ----------------------------------------------------------
    def _walk_forever(self) -> None:
        while True:
            try:
                self.walk_deferred()
            except Exception:
                logger.exception("queue: walk of deferred/ failed")
            gevent.sleep(max(WALK_EVERY * self.settings.scan_interval, self.walk_seconds / WALK_SHARE))

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
            added += self.schedule.add_missing(islice(pairs, MERGE_SLICE), busy=self._waiting_ids)
            give_way()
        self.walks += 1
        self.walk_seconds = walked
        if first:
            logger.info("queue: {} deferred entries scheduled (walk {:.2f}s, in all {:.2f}s); "
                        "start-up {:.2f}s, recovery included", added, walked, time.monotonic() - began,
                        process_age())
        elif added:
            logger.info("queue: {} deferred entries found that the schedule did not know", added)
        if added:
            self._wakeup.set()  # some may be due already
        return added

    def deliver(self, qid: str, routes: Routes | None = None) -> None:
        """One attempt of a claimed entry. `routes`: its destinations, if known before the
        claim (their slots are taken); else they are found in its envelope."""
        taken = [routes]
        try:
            self._deliver(qid, taken)
        except Exception:  # a bug must not strand the entry in active/ until the next restart
            logger.bind(sid=qid).exception("queue: delivery failed")
            try:
                when = time.time() + self.settings.retry_schedule[0]
                if self.spool.move(qid, "active", "deferred", when=when):
                    self._schedule(qid, when)
            except OSError:
                logger.bind(sid=qid).exception("queue: cannot defer; it stays in active/")
        finally:
            self._delivering.discard(qid)
            if taken[0] and self.destinations.give_back(taken[0]):
                self._wakeup.set()  # entries wait for one of these destinations

    def routes_of(self, envelope: Envelope) -> Routes:
        """The bounded destinations of the envelope's pending recipients ("relay:example.com")."""
        found = []
        for rcpt in envelope.recipients:
            if rcpt.status == PENDING:
                domain = rcpt.address.rpartition("@")[2]
                target = self.router.target(domain)
                if target is not None and target.kind not in UNBOUNDED:
                    found.append(f"{target.kind}:{target.destination(domain)}")
        return self.destinations.routes(found)

    def _wait_for_room(self, qid: str, routes: Routes, log) -> bool:
        """An entry seen for the first time whose destination turns out to be at its limit:
        back to deferred/, due now, and parked until that destination has room. True if so.
        The rename needs no fsync: after a crash either name is fine (both are delivered)."""
        full = self.destinations.full(routes)
        if full is None:
            return False
        if not self.spool.run(self._put_back, qid, time.time()):
            return True  # deleted meanwhile: nothing to deliver
        self.destinations.remember(qid, routes)
        self.destinations.park(qid, "deferred", full)
        log.debug("queue: waits for {} ({} in delivery)", full, self.destinations.in_delivery(full))
        return True

    def _put_back(self, qid: str, when: float) -> bool:
        active = self.spool.entry_path(qid, "active")
        try:
            os.utime(active, (when, when))
        except FileNotFoundError:
            return False
        return safeio.move(active, self.spool.entry_path(qid, "deferred"))

    def _deliver(self, qid: str, taken: list) -> None:
        """One attempt: load, hand every pending recipient to its target, record the
        outcomes, tell the sender what failed, then defer or remove the entry. `taken[0]`:
        the destinations whose slots this attempt holds (set here when they were not known)."""
        log = logger.bind(sid=qid)
        self.destinations.forget(qid)
        loaded = self._load(qid, log)
        if loaded is None:
            return
        envelope, measured = loaded
        if taken[0] is None:
            routes = self.routes_of(envelope)
            if self._wait_for_room(qid, routes, log):
                return
            self.destinations.take(routes)
            taken[0] = routes
        now = time.time()
        self._begin(envelope, now, log)
        failed: list[Recipient] = []
        record = partial(self._record, envelope, now, failed, log)
        returned = envelope.extra.pop("return_to_sender", None)  # geosmtp-queue bounce
        if returned is not None:
            reply = Reply(554, "5.0.0", f"Returned to sender by the postmaster: {returned}")
            for index, rcpt in enumerate(envelope.recipients):
                if rcpt.status == PENDING:
                    record(index, Outcome(reply), "returned")
        else:
            self._hand_out(envelope, measured, qid in self._recovered, record, log)
        if envelope.pending() and now - envelope.created >= self.settings.max_lifetime:
            failed += self._expire(envelope, log)
        self._finish(envelope, now, failed, log)

    def _load(self, qid: str, log) -> tuple[Envelope, tuple[int, bytes]] | None:
        """The claimed entry's envelope and its message's (octets, header section), read off
        the hub with those of the other deliveries starting now; None (and the entry parked
        in corrupt/ when it is unusable) when there is nothing to deliver."""
        try:
            envelope, measured = self._reads.call(qid)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log.error("queue: unreadable entry ({}); moved to corrupt/", exc)
            self.spool.move(qid, "active", "corrupt")
            return None
        if envelope.id != qid:
            # a name a crash kept for a file that was since a spare and another message's
            # (geosmtp.spares): that message has names of its own; this one goes
            log.warning("queue: the entry names the file of another message ({}); removed, "
                        "a name left by a crash", envelope.id)
            self.spool.run(self.spool.drop_stale, qid, "active")
            return None
        if measured is None:
            # no message will ever come back (an operator's delete that raced our last
            # rewrite, or a damaged spool): park the envelope where a person looks
            log.error("queue: the message file is gone; entry moved to corrupt/")
            self.spool.move(qid, "active", "corrupt")
            return None
        return envelope, measured

    def _read(self, qid: str) -> tuple[Envelope, tuple[int, bytes] | None]:
        """In a thread: the active entry's envelope (FileNotFoundError: the entry is gone),
        and its message's (octets, header section), None when the message file is gone."""
        envelope = self.spool.load(qid)
        try:
            return envelope, self._measure(qid)
        except FileNotFoundError:
            return envelope, None

    @staticmethod
    def _begin(envelope: Envelope, now: float, log) -> None:
        envelope.attempts += 1
        envelope.last_attempt = now
        client = envelope.client
        log.info("from=<{}> size={} nrcpt={} attempt={} client=[{}] helo={} tls={} user={}", envelope.sender,
                 envelope.size, len(envelope.pending()), envelope.attempts, client.address, client.helo or "-",
                 (client.tls or "-").partition(" ")[0], client.auth_user or "-")

    def _finish(self, envelope: Envelope, now: float, failed: list[Recipient], log) -> None:
        """The sender's notices, then the entry's new state. A notice is durable before the
        recipients' new state: a crash in between repeats the attempt (and maybe the
        notice), it never loses the notice."""
        if failed:
            self._notify_sender(envelope, failed, bounce.FAILED, log)
        if (envelope.pending() and self.settings.delay_warning is not None and "warned" not in envelope.extra
                and now - envelope.created >= self.settings.delay_warning):
            self._notify_sender(envelope, envelope.pending(), bounce.DELAYED, log)
            envelope.extra["warned"] = now
        if envelope.pending():
            # counted from the attempt's end: a retry 1 s after an attempt that hung for 2 s
            # (now that the queue manager wakes when it is due) would come straight after it
            self._defer(envelope, time.time() + next_delay(self.settings.retry_schedule, envelope.attempts), log)
        else:
            self.spool.done(envelope.id)
            log.info("removed")
        self._recovered.discard(envelope.id)

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
            self.destinations.remember(envelope.id, self.routes_of(envelope))
            self._schedule(envelope.id, when)
        else:
            log.warning("queue: entry removed during delivery; not deferred")

    # -- handing recipients to their targets ------------------------------------------------
    def _hand_out(self, envelope: Envelope, measured: tuple[int, bytes], redelivery: bool, record: Callable,
                  log) -> None:
        """Every pending recipient to its target (the router decides), grouped by the
        target's destination: one deliver() per group, all groups at once; each outcome is
        recorded as it comes."""
        groups: dict[tuple[int, str], tuple[Target, list[int]]] = {}
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.status != PENDING:
                continue
            domain = rcpt.address.rpartition("@")[2]
            target = self.router.target(domain)
            if target is None:
                record(index, Outcome(NO_ROUTE), "remote")
                continue
            key = (id(target), target.destination(domain))
            groups.setdefault(key, (target, []))[1].append(index)
        if not groups:
            return
        size, headers = measured
        # RFC 5321 6.3: a message that has been through this many hosts is in a loop
        if sum(1 for line in headers.split(b"\r\n") if line[:9].lower() == b"received:") > MAX_HOPS:
            for _, indices in groups.values():
                for i in indices:
                    record(i, Outcome(TOO_MANY_HOPS), "remote")
            return
        remote = any(target.kind == "relay" for target, _ in groups.values())
        prefix = self._prefix(envelope, remote, log)
        base = Message(
            sender=envelope.sender, recipients=(), size=size + len(prefix), prefix=prefix,
            eightbit=envelope.body == "8BITMIME", id=envelope.id, created=envelope.created, redelivery=redelivery,
        )
        self._deliver_groups(envelope, base, headers, list(groups.items()), record)

    def _deliver_groups(self, envelope: Envelope, base: Message, headers: bytes, groups: list, record) -> None:
        open_body: OpenBody = partial(self.spool.open_body, envelope.id)
        saving = gevent.lock.Semaphore()
        unfinished = [len(groups)]

        def one(destination: str, target: Target, indices: list[int]) -> None:
            recipients = tuple(envelope.recipients[i].address for i in indices)
            # RFC 6531 3.2: SMTPUTF8 is needed when an address of this transaction or a
            # header is not ASCII
            utf8 = envelope.smtputf8 and (
                _non_ascii(envelope.sender) or any(map(_non_ascii, recipients)) or not headers.isascii())
            msg = replace(base, recipients=recipients, slots=tuple(indices), smtputf8=utf8,
                          originals=tuple(envelope.recipients[i].original for i in indices))
            where = "remote" if target.kind == "relay" else "local"
            for i, outcome in zip(indices, target.deliver(destination, msg, open_body)):
                record(i, outcome, where)
            unfinished[0] -= 1
            if unfinished[0]:
                # other destinations are still in flight, maybe for minutes: save what this one
                # achieved now, so a crash does not send it again
                with saving:
                    self.spool.update(envelope)

        if len(groups) == 1:  # most mail: one destination, delivered in this greenlet
            (key, (target, indices)), = groups
            one(key[1], target, indices)
            return
        jobs = [gevent.spawn(one, key[1], target, indices) for key, (target, indices) in groups]
        gevent.joinall(jobs, raise_error=True)

    def _measure(self, qid: str) -> tuple[int, bytes]:
        """(octets of the message, its header section)."""
        with self.spool.open_body(qid) as fh:
            return os.fstat(fh.fileno()).st_size - fh.tell(), bounce.header_section(fh)

    def _prefix(self, envelope: Envelope, remote: bool, log) -> bytes:
        """The header fields put in front of the message for every target: the DKIM-Signature
        of what our own users send, then the fields the inbound checks added at receipt
        (extra["headers"]: Authentication-Results, ...). The signature covers those fields
        and is made once, before the first attempt that has a remote recipient, off the hub,
        and kept in the envelope so every retry (and every local copy from then on) gets the
        same bytes."""
        added = envelope.extra.get("headers", "").encode("utf-8")
        if "dkim" in envelope.extra:  # an envelope written before "prefix" existed
            envelope.extra["prefix"] = envelope.extra.pop("dkim")
        if "prefix" in envelope.extra:
            return envelope.extra["prefix"].encode("utf-8") + added
        if not remote:
            return added  # local mail only: nothing to sign for (yet)
        signature = b""
        if self.signer and self.may_sign(envelope):
            def sign() -> bytes:
                with self.spool.open_body(envelope.id) as fh:
                    return self.signer.sign(added + fh.read(), envelope.sender)
            try:
                # the whole message in memory, hashed and signed: a few at a time
                with self._signing:
                    signature = self.spool.run(sign)
            except Exception as exc:  # a header section we will not sign still goes, unsigned
                log.warning("dkim: not signed: {}", exc)
        envelope.extra["prefix"] = signature.decode("utf-8")
        return signature + added

    def _sent_headers(self, envelope: Envelope) -> bytes:
        """The header section as it was sent or written: the prefix (our DKIM-Signature and
        the checks' fields), then the spooled header section. Runs in a thread."""
        prefix = (envelope.extra.get("prefix", envelope.extra.get("dkim", ""))
                  + envelope.extra.get("headers", "")).encode("utf-8")
        with self.spool.open_body(envelope.id) as fh:
            return prefix + bounce.header_section(fh, bounce.HEADER_LIMIT - len(prefix))

    # -- notices to the sender --------------------------------------------------------------
    def _notify_sender(self, envelope: Envelope, recipients: list[Recipient], kind: str, log) -> None:
        if not bounce.should_notify(envelope):
            log.info("no {} notice: the message has the null sender", kind)
            return
        try:
            headers = self.spool.run(self._sent_headers, envelope)
        except OSError:
            headers = b""
        now = time.time()
        data = bounce.build(envelope, recipients, kind=kind, reporting_mta=self.hostname,
                            original_headers=headers, now=now,
                            retry_until=envelope.created + self.settings.max_lifetime)
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
        self.notify(notice.id)
