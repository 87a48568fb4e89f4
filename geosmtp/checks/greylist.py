"""Greylisting: the first delivery attempt of an unknown (client network, sender, recipient)
triplet is deferred at RCPT; a real MTA retries, most spam software does not.

A triplet is the client's /24 (IPv4) or /64 (IPv6) -- big senders retry from another
address of the same pool -- the sender lowercased ("" for the null sender) and the recipient
lowercased. The first try is answered 451 4.7.1 "Greylisted, try again in N seconds"; a
retry after `delay` and within `retry_window` of the first passes, and a triplet that passed
is remembered for `lifetime` after its last pass, so regular correspondents are not delayed
again.

Never greylisted: clients in `networks`, mail whose SPF passed for a domain of
`sender_domains` (results["spf"]: the spf check runs at MAIL, before this at RCPT), and
clients on a DNSBL check's allow list (results["dnsbl"]["allowed"]) unless `dnswl = false`.
DKIM is known only at the end of DATA, so with `dkim_domains` set a recipient that would be
greylisted is accepted at RCPT (its triplet recorded as first seen all the same) and the
message is decided at data: a valid DKIM signature of a listed domain (results["dkim"]; put
the dkim check before this one) lets it through, else the whole message gets 451 4.7.1 and
the retry after the delay passes at RCPT.

The store is an interface (GreylistStore) so several servers can share one (Redis). The
memory store is for one process: bounded, expiring, and evicting not-yet-passed triplets
before passed ones so a flood of new triplets cannot make us forget our regular
correspondents. With `store_file` the triplets live in an SQLite file instead, shared by
the processes of one machine (`workers > 1`: a retry may reach any of them) and kept
across restarts. With [redis] configured (and its `greylist` not turned off) they live in
Redis, shared by every node: a retry may come through any of them. Redis down: the store
raises and the check's on_error applies (defer by default).
"""
from __future__ import annotations

import ipaddress
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from geosmtp.checks.interface import Check, Facts, Verdict, safe_text
from geosmtp.config import Duration, is_hostname


@dataclass(frozen=True, slots=True)
class GreyEntry:
    """What is known of a triplet: when it was first seen, when it last passed (None: not yet)."""

    first_seen: float
    passed: float | None = None


class GreylistStore(Protocol):
    """Where triplets are remembered. Keys are short printable strings (the triplet), times
    are wall-clock seconds (time.time(): several hosts may share a store).

    get(key) -> the entry, or None when unknown or expired.
    put(key, entry, lifetime) -> store it (replacing any), forgotten `lifetime` seconds from now.

    One process needs nothing more than each call being atomic (gevent switches only on I/O;
    the memory store does none). Two racing first tries of one triplet both write a
    first_seen: the later wins, which only delays that sender by the difference.
    """

    def get(self, key: str) -> GreyEntry | None: ...

    def put(self, key: str, entry: GreyEntry, lifetime: float) -> None: ...


class MemoryGreylistStore:
    """A GreylistStore in this process's memory, at most `max_entries` triplets.

    Entries expire when read after their lifetime (and a few from the oldest end on each
    put). When full, the oldest not-yet-passed triplet goes first: losing it costs a sender
    one more delay, losing a passed one would delay a known correspondent again."""

    SWEEP = 8  # expired entries removed per put, from the oldest end: bounded work per call

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.time):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.clock = clock
        self._pending: OrderedDict[str, tuple[GreyEntry, float]] = OrderedDict()  # key -> (entry, expires)
        self._passed: OrderedDict[str, tuple[GreyEntry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending) + len(self._passed)

    def get(self, key: str) -> GreyEntry | None:
        for table in (self._passed, self._pending):
            item = table.get(key)
            if item is not None:
                if item[1] <= self.clock():
                    del table[key]
                    return None
                return item[0]
        return None

    def put(self, key: str, entry: GreyEntry, lifetime: float) -> None:
        now = self.clock()
        self._pending.pop(key, None)
        self._passed.pop(key, None)
        table = self._pending if entry.passed is None else self._passed
        table[key] = (entry, now + lifetime)
        for table in (self._pending, self._passed):
            for _ in range(self.SWEEP):
                oldest = next(iter(table.items()), None)
                if oldest is None or oldest[1][1] > now:
                    break
                del table[oldest[0]]
        while len(self) > self.max_entries:
            (self._pending or self._passed).popitem(last=False)


class FileGreylistStore:
    """A GreylistStore in an SQLite file (WAL), shared by the processes that open it.

    Each call is one statement in its own transaction, run through `run` (the threadpool:
    another process may hold the write lock for a moment, and the hub never waits on
    disk). Expired rows are deleted a few at a time on each put, which bounds the file by
    what `retry_window` and `lifetime` keep. The file is opened at the first call, by the
    process that makes it (after a root-started server has become its [server] user). A
    database that cannot be used raises, and the engine applies the check's on_error."""

    SWEEP = 16

    def __init__(self, path: str | os.PathLike, run: Callable = lambda fn, *a: fn(*a),
                 clock: Callable[[], float] = time.time):
        self.path = os.fspath(path)
        self.run = run
        self.clock = clock
        self._lock = threading.Lock()  # one connection per process, used by one thread at a time
        self._opened: sqlite3.Connection | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._opened is None:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a triplet lost in a power cut costs one delay
            db.execute("CREATE TABLE IF NOT EXISTS triplet (key TEXT PRIMARY KEY, first_seen REAL NOT NULL,"
                       " passed REAL, expires REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS triplet_expires ON triplet (expires)")
            self._opened = db
        return self._opened

    def _get(self, key: str) -> GreyEntry | None:
        with self._lock:
            row = self._db.execute("SELECT first_seen, passed FROM triplet WHERE key = ? AND expires > ?",
                                   (key, self.clock())).fetchone()
        return None if row is None else GreyEntry(row[0], row[1])

    def _put(self, key: str, entry: GreyEntry, lifetime: float) -> None:
        now = self.clock()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?)",
                             (key, entry.first_seen, entry.passed, now + lifetime))
            self._db.execute("DELETE FROM triplet WHERE key IN (SELECT key FROM triplet WHERE expires <= ? "
                             "ORDER BY expires LIMIT ?)", (now, self.SWEEP))

    def get(self, key: str) -> GreyEntry | None:
        return self.run(self._get, key)

    def put(self, key: str, entry: GreyEntry, lifetime: float) -> None:
        self.run(self._put, key, entry, lifetime)


class RedisGreylistStore:
    """A GreylistStore in Redis (geosmtp.redisclient.RedisStore): one string per triplet,
    "first_seen passed", under a hashed key that Redis expires after `lifetime`."""

    def __init__(self, store):
        self.store = store

    def get(self, key: str) -> GreyEntry | None:
        raw = self.store.call("greylist", self.store.client.get, self.store.key("grey", key))
        if raw is None:
            return None
        first, _, passed = raw.decode("ascii").partition(" ")
        return GreyEntry(float(first), float(passed) if passed else None)

    def put(self, key: str, entry: GreyEntry, lifetime: float) -> None:
        value = f"{entry.first_seen!r} {'' if entry.passed is None else repr(entry.passed)}".rstrip()
        self.store.call("greylist", self.store.client.set, self.store.key("grey", key), value,
                        ex=max(1, math.ceil(lifetime)))


def _domains(v: list[str]) -> list[str]:
    out = []
    for d in v:
        d = d.rstrip(".").lower()
        if not is_hostname(d):
            raise ValueError(f"{d!r} is not a domain")
        out.append(d)
    return out


def in_domains(domain: str | None, domains: list[str]) -> bool:
    """`domain` is one of `domains` or below one of them."""
    d = (domain or "").rstrip(".").lower()
    return bool(d) and any(d == x or d.endswith("." + x) for x in domains)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay: Duration = 300.0  # a retry passes this long after the first try
    retry_window: Duration = 2 * 86400.0  # ... and no later than this
    lifetime: Duration = 35 * 86400.0  # a triplet that passed is remembered this long after its last pass
    networks: list[str] = []  # CIDRs never greylisted
    sender_domains: list[str] = []  # never greylisted when SPF passed for one of these (or below)
    dkim_domains: list[str] = []  # decided at data: a DKIM pass of one of these lets the message in
    dnswl: bool = True  # a client on a dnsbl check's allow list is not greylisted
    max_entries: int = Field(100_000, ge=1)  # triplets the memory store keeps (not the file)
    store_file: str | None = None  # an SQLite file shared by this machine's processes (workers > 1)
    # (without store_file, and with [redis] configured: Redis, shared by every node)

    @field_validator("networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_network(n, strict=False)) for n in v]
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("sender_domains", "dkim_domains")
    @classmethod
    def _domain_list(cls, v: list[str]) -> list[str]:
        return _domains(v)


def triplet(ip, sender: str | None, recipient: str | None) -> str:
    """The store key: "<network> <len>:<sender> <recipient>" (the length keeps a sender with
    spaces from running into the recipient)."""
    net = ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 64}", strict=False)
    s = (sender or "").lower()
    return f"{net} {len(s)}:{s} {(recipient or '').lower()}"


def greylisted(seconds: int) -> str:
    return f"Greylisted, try again in {seconds} second{'' if seconds == 1 else 's'}"


class GreylistCheck(Check):
    Options = Options

    def __init__(self, options, context, store: GreylistStore | None = None,
                 clock: Callable[[], float] = time.time):
        super().__init__(options, context)
        self.clock = clock
        if store is None:
            path = options.get("store_file")
            if path:
                store = FileGreylistStore(path, context.run, clock)
            elif context.redis is not None and context.redis_greylist:
                store = RedisGreylistStore(context.redis)
            else:
                store = MemoryGreylistStore(options["max_entries"], clock)
        self.store = store
        self.networks = [ipaddress.ip_network(n) for n in options["networks"]]
        self.delay = options["delay"]
        self.retry_window = options["retry_window"]
        self.lifetime = options["lifetime"]
        if not options["dkim_domains"]:  # nothing to decide at data: the engine skips the phase
            self.data = None

    def wait(self, key: str) -> int:
        """Seconds the triplet must still wait (0: it passes now), remembering this try."""
        now = self.clock()
        entry = self.store.get(key)
        if entry is not None and entry.passed is not None:
            self.store.put(key, GreyEntry(entry.first_seen, now), self.lifetime)
            return 0
        if entry is None or now - entry.first_seen > self.retry_window:
            self.store.put(key, GreyEntry(now), self.retry_window)
            return math.ceil(self.delay)
        elapsed = now - entry.first_seen
        if elapsed < self.delay:
            return max(1, math.ceil(self.delay - elapsed))
        self.store.put(key, GreyEntry(entry.first_seen, now), self.lifetime)
        return 0

    def _exempt(self, facts: Facts) -> str | None:
        """Why this transaction is never greylisted, or None."""
        if any(facts.ip in net for net in self.networks):
            return "network"
        spf = facts.results.get("spf") or {}
        if spf.get("result") == "pass" and in_domains(spf.get("domain"), self.options["sender_domains"]):
            return f"spf pass for {spf.get('domain')}"
        if self.options["dnswl"] and (facts.results.get("dnsbl") or {}).get("allowed"):
            return "dnswl"
        return None

    def rcpt(self, facts: Facts) -> Verdict | None:
        if self._exempt(facts) is not None:
            return None
        seconds = self.wait(triplet(facts.ip, facts.sender, facts.recipient))
        if seconds == 0:
            return None
        if self.options["dkim_domains"]:
            state = dict(facts.results.get("greylist") or {})
            state["pending"] = [*state.get("pending", ()), facts.recipient]
            state["wait"] = max(state.get("wait", 0), seconds)
            return Verdict.accept(results={"greylist": state})
        logger.info("greylist: [{}] <{}> -> <{}>: deferred {}s", facts.ip, safe_text(facts.sender or "", 200),
                    safe_text(facts.recipient or "", 200), seconds)
        return Verdict.defer(greylisted(seconds), 451, "4.7.1")

    def data(self, facts: Facts) -> Verdict | None:
        state = facts.results.get("greylist") or {}
        if not state.get("pending"):
            return None
        for sig in facts.results.get("dkim") or ():
            if sig.get("result") == "pass" and in_domains(sig.get("domain"), self.options["dkim_domains"]):
                logger.info("greylist: [{}] not greylisted: DKIM pass for {}", facts.ip,
                            safe_text(sig.get("domain"), 200))
                return None
        seconds = max(1, int(state.get("wait", 1)))
        logger.info("greylist: [{}] <{}>: message deferred {}s ({} greylisted recipient(s), no DKIM pass "
                    "of a listed domain)", facts.ip, safe_text(facts.sender or "", 200), seconds,
                    len(state["pending"]))
        return Verdict.defer(greylisted(seconds), 451, "4.7.1")
