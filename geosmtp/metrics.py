"""Counters, gauges and histograms (prometheus_client), and the HTTP side: /metrics,
/healthz (the process answers) and /readyz (it should get traffic: not draining, the spool
can take mail), served by gevent's WSGI server on [metrics] address.

The metric objects are module globals, one set per process; the rest of geosmtp updates them
directly. With workers, every process writes its values to files in PROMETHEUS_MULTIPROC_DIR
(set by `geosmtp start` before this module is imported) and the master adds them up when
scraped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import gevent
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from geosmtp.spool import SPILL_SIZE, id_time

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_CHILDREN: dict = {}


def child(metric, *values: str):
    """metric.labels(*values), kept: labels() takes a lock and builds a key each time, on
    paths taken several times a message (a reply, a connection). For labels of bounded
    sets only (verbs, reply classes, listener names, enhanced codes)."""
    key = (metric, values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


CONNECTIONS = Counter("geosmtp_connections", "Connections accepted", ["listener"])
REFUSED = Counter("geosmtp_connections_refused", "Connections turned away (421)", ["listener", "reason"])
SESSIONS = Gauge("geosmtp_sessions_active", "Open SMTP sessions", ["listener"], multiprocess_mode="livesum")
COMMANDS = Counter("geosmtp_commands", "SMTP commands by verb and reply class", ["verb", "reply"])
ACCEPTED = Counter("geosmtp_messages_accepted", "Messages queued (250 after DATA)", ["listener"])
QUARANTINED = Counter("geosmtp_messages_quarantined",
                      "Messages an inbound check put in queue/hold/ (counted in accepted too)", ["listener"])
REJECTED = Counter("geosmtp_messages_rejected",
                   "MAIL, RCPT and DATA refused, by enhanced status code", ["stage", "status"])
RECEIVED_BYTES = Counter("geosmtp_received_bytes", "Message octets queued")
TLS = Counter("geosmtp_tls_sessions", "TLS handshakes completed, by protocol version", ["version"])
TLS_FAILURES = Counter("geosmtp_tls_handshake_failures", "TLS handshakes that failed")
AUTH_FAILURES = Counter("geosmtp_auth_failures", "Failed AUTH attempts")
DIRECTORY_ERRORS = Counter("geosmtp_directory_errors",
                           "Directory lookups that failed (database down or slow): RCPT and MAIL got 451, "
                           "AUTH 454, a local delivery was deferred", ["backend"])
RATE_LIMITED = Counter("geosmtp_rate_limited", "Requests refused by a rate limit", ["limit"])
REDIS_ERRORS = Counter("geosmtp_redis_errors", "Calls to Redis that failed, or were not tried in the second "
                       "after a failure, by use (limits, connections, greylist, dns_cache)", ["use"])
DELIVERIES = Counter("geosmtp_delivery_attempts", "Delivery attempts per recipient",
                     ["result", "destination"])  # result: sent|deferred|bounced; local|remote
STRESS = Gauge("geosmtp_stress", "1 while a listener's open sessions are past the stress threshold "
               "(with workers: how many processes are)", ["listener"], multiprocess_mode="livesum")
STRESS_CHANGES = Counter("geosmtp_stress_changes", "A listener going under stress (on) or out of it (off)",
                         ["listener", "state"])
EVICTED = Counter("geosmtp_sessions_evicted",
                  "Sessions closed (421 4.7.0) to give their slot to a new client", ["listener"])
DELIVERY_SECONDS = Histogram("geosmtp_delivery_seconds", "From arrival to delivery, per recipient",
                             buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400))
CHECK_VERDICTS = Counter("geosmtp_check_verdicts", "Inbound check verdicts by check, phase and action",
                         ["check", "phase", "verdict"])
CHECK_ERRORS = Counter("geosmtp_check_errors", "Inbound checks that failed (error) or gave no verdict in time "
                       "(timeout); their on_error verdict applied", ["check", "kind"])
CHECK_SECONDS = Histogram("geosmtp_check_seconds", "Time one inbound check took for one phase", ["check"],
                          buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 30))

QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt")


def _in_threadpool(fn, *args):
    return gevent.get_hub().threadpool.apply(fn, args)


MIN_SLICE = 50_000  # names one min() call looks at (~1 ms with the GIL held)
# a state with this many entries is listed again only after REUSE seconds: its listing
# takes the GIL back once a name (50 ms for 100,000), which on a loaded machine the hub's
# greenlets wait for; scraped every few seconds, a big queue is counted once in REUSE
BIG, REUSE = 10_000, 2.0


class SpoolCollector:
    """Spool entries by state and the age of the oldest, read from the directories at
    scrape time: one listdir per state, in a thread through `run` (100,000 deferred entries
    take 50 ms to list; the hub serves sessions meanwhile)."""

    def __init__(self, spool_dir: str, run: Callable = _in_threadpool):
        self.spool_dir = spool_dir
        self.run = run
        self._big: dict[str, tuple[float, int, float | None]] = {}  # state: (when, count, oldest)

    def count(self) -> tuple[dict[str, int], float | None]:
        """Entries per state, and the arrival time of the oldest (None: no entry)."""
        counts, first = {}, None
        for state in QUEUE_STATES:
            counts[state], stamp = self._state(state)
            if stamp is not None and (first is None or stamp < first):
                first = stamp
        return counts, first

    def _state(self, state: str) -> tuple[int, float | None]:
        now = time.monotonic()
        if state in self._big and now - self._big[state][0] < REUSE:
            return self._big[state][1:]
        try:
            names = os.listdir(os.path.join(self.spool_dir, "queue", state))
        except OSError:
            names = []
        stamp = None
        if names:
            # min() of a slice at a time: one call on a million names would hold the GIL
            stamp = id_time(min(min(names[i:i + MIN_SLICE]) for i in range(0, len(names), MIN_SLICE)))
        if len(names) >= BIG:
            self._big[state] = (now, len(names), stamp)
        else:
            self._big.pop(state, None)
        return len(names), stamp

    @staticmethod
    def describe():
        """The families without samples: registering the collector walks nothing."""
        yield GaugeMetricFamily("geosmtp_spool_entries", "Queue entries by state", labels=["state"])
        yield GaugeMetricFamily("geosmtp_spool_oldest_age_seconds", "Age of the oldest queued message")

    def collect(self):
        entries, oldest = self.describe()
        counts, first = self.run(self.count)
        for state, n in counts.items():
            entries.add_metric([state], n)
        oldest.add_metric([], max(time.time() - first, 0.0) if first is not None else 0.0)
        yield entries
        yield oldest


def registry_for(spool_dir: str, run: Callable = _in_threadpool) -> CollectorRegistry:
    """What /metrics shows: this process's metrics (or every process's, with workers) and
    the spool (counted through `run`: gevent's threadpool unless told)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    registry.register(SpoolCollector(spool_dir, run))
    registry.register(SpoolRoomCollector(spool_dir))
    return registry


def process_gone(pid: int) -> None:
    """A worker died: its live gauges (open sessions) no longer count."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@dataclass(frozen=True)
class Unready:
    """Why /readyz is not a plain "ready". `serve`: keep sending us traffic anyway (200)."""

    text: str
    serve: bool = False


def spool_room(spool_dir: str) -> tuple[str | None, int]:
    """(why the spool cannot take any message, or None; octets free to us on its disk).
    The directories a commit writes in (tmp/, msg/, queue/incoming/) must be writable
    directories on a filesystem mounted read-write (os.access says so for root too)."""
    dirs = [os.path.join(spool_dir, *d) for d in (("tmp",), ("msg",), ("queue", "incoming"))]
    try:
        st = os.statvfs(dirs[0])
    except OSError as exc:
        return f"{dirs[0]}: {exc.strerror}", 0
    unwritable = [d for d in dirs if not (os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK))]
    problem = f"{unwritable[0]} is not a writable directory" if unwritable else None
    return problem, st.f_bavail * st.f_frsize


def spool_readiness(spool_dir: str, max_message_size: int) -> Unready | None:
    """None while a message of max size fits. With less room the spool answers 452 4.3.1 to
    the messages that do not fit, but takes the others: that is no reason to leave the
    balancer, whose other nodes are often just as full (a queue backed up behind the same
    outage). Below SPILL_SIZE free (nor max size) the disk is full in practice: the common,
    small message fails too, and so do the queue's own rewrites; that is "cannot accept"."""
    problem, free = spool_room(spool_dir)
    if problem is None and free < min(SPILL_SIZE, max_message_size):
        problem = f"disk full ({free} octets free)"
    if problem is not None:
        return Unready(f"spool cannot accept mail: {problem}")
    if free < max_message_size:
        return Unready(f"no space for a message of max size ({free} octets free, max_message_size "
                       f"{max_message_size}): larger messages get 452 4.3.1", serve=True)
    return None


class SpoolRoomCollector:
    """geosmtp_spool_writable and geosmtp_spool_free_bytes, read at scrape time: what
    /readyz decides on, for alerts that come before it turns 503."""

    def __init__(self, spool_dir: str):
        self.spool_dir = spool_dir

    def collect(self):
        problem, free = spool_room(self.spool_dir)
        writable = GaugeMetricFamily("geosmtp_spool_writable",
                                     "1 when the spool's directories can be written, else 0")
        writable.add_metric([], 0.0 if problem else 1.0)
        room = GaugeMetricFamily("geosmtp_spool_free_bytes", "Octets free to geosmtp on the spool's filesystem")
        room.add_metric([], float(free))
        yield writable
        yield room


def wsgi_app(registry: CollectorRegistry, ready: Callable[[], Unready | None]) -> Callable:
    """/metrics, /healthz, /readyz. `ready()` returns None when ready, else an Unready:
    /readyz says 503 and why, or (`serve`) 200 and what is wrong."""

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            problem = ready()
            if problem is None:
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            if problem.serve:
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [f"ready, but {problem.text}\n".encode()]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"not ready: {problem.text}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app
