"""The directory in SQL: the schema geosmtp creates (`geosmtp directory init`), the lookups
the server makes, and the writes `geosmtp passwd` and `geosmtp directory add-*` make. The
same statements run on SQLite and PostgreSQL (geosmtp.directory.sqlite, .postgres: an Engine
each); statements use "?" placeholders.

Every answer, "no such address" too, is kept for cache_ttl seconds (geosmtp.directory.cache),
in each process: a row added to the database is used everywhere within that time, with no
reload. A lookup that fails raises DirectoryUnavailable, is counted
(geosmtp_directory_errors) and logged at most once a minute while the database stays away,
and once more when it answers again. While it is away, one lookup a second asks it again
(and may wait its timeout); the others fail at once instead of each waiting as long.

Tables (every address and domain with its ASCII letters in lower case, as geosmtp's own
commands write them: lookups compare exactly):
  domains(name)                         the local domains
  mailboxes(address)                    the addresses with a mailbox
  aliases(address, target, position)    one row per target, delivered in position order; a
                                        target is a mailbox, another alias or a remote address
  users(address, password)              AUTH users: password is an "$scrypt$..." hash
  directory_schema(version)             1
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

from loguru import logger

from geosmtp import metrics
from geosmtp.directory import Directory, DirectoryUnavailable, Entry
from geosmtp.directory.cache import MISS, TTLCache

SCHEMA_VERSION = 1
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS domains (name TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS mailboxes (address TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS aliases (address TEXT NOT NULL, target TEXT NOT NULL,"
    " position INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (address, target))",
    "CREATE TABLE IF NOT EXISTS users (address TEXT PRIMARY KEY, password TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS directory_schema (version INTEGER NOT NULL)",
    f"INSERT INTO directory_schema (version) SELECT {SCHEMA_VERSION}"
    " WHERE NOT EXISTS (SELECT 1 FROM directory_schema)",
)

DOMAIN = "SELECT 1 FROM domains WHERE name = ?"
FIRST_DOMAIN = "SELECT min(name) FROM domains"
# one round trip: a row with no target if it is a mailbox, then its alias targets in order
ENTRY = ("SELECT NULL, -1 FROM mailboxes WHERE address = ?"
         " UNION ALL SELECT target, position FROM aliases WHERE address = ? ORDER BY 2, 1")
PASSWORD = "SELECT password FROM users WHERE address = ?"

SET_PASSWORD = ("INSERT INTO users (address, password) VALUES (?, ?)"
                " ON CONFLICT (address) DO UPDATE SET password = excluded.password")
DELETE_USER = "DELETE FROM users WHERE address = ?"
ADD_DOMAIN = "INSERT INTO domains (name) VALUES (?) ON CONFLICT DO NOTHING"
ADD_MAILBOX = "INSERT INTO mailboxes (address) VALUES (?) ON CONFLICT DO NOTHING"
ADD_ALIAS = ("INSERT INTO aliases (address, target, position) VALUES (?, ?, ?)"
             " ON CONFLICT (address, target) DO UPDATE SET position = excluded.position")

Statement = tuple[str, tuple]


class Engine(Protocol):
    """One database: runs a statement within its timeout, or raises DirectoryUnavailable."""

    name: str  # "sqlite", "postgresql": in logs and metrics

    def rows(self, sql: str, params: tuple) -> list[tuple]: ...

    def write(self, statements: list[Statement]) -> list[int]:
        """All in one transaction; the rows each changed."""
        ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


RETRY_AFTER = 1.0  # seconds between lookups that ask a database which did not answer


class Health:
    """What the log and the metric say about a backend that fails: each failure counted,
    a warning at the first and then at most once per `every` seconds, a line when it is back.
    It also says when a backend that failed is asked again (probe())."""

    def __init__(self, backend: str, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self.every = every
        self.clock = clock
        self.failures = 0  # since it last answered
        self.reported = 0.0
        self.down = False
        self.retry_at = 0.0

    def probe(self) -> bool:
        """Whether to ask the backend now: always while it answers; when it does not, once
        per RETRY_AFTER seconds (this call takes the turn)."""
        if not self.down:
            return True
        now = self.clock()
        if now < self.retry_at:
            return False
        self.retry_at = now + RETRY_AFTER
        return True

    def failed(self, error: Exception) -> None:
        metrics.DIRECTORY_ERRORS.labels(self.backend).inc()
        self.failures += 1
        now = self.clock()
        self.retry_at = now + RETRY_AFTER
        if not self.down or now - self.reported >= self.every:
            self.reported = now
            logger.warning("directory: {} lookup failed ({}): RCPT and MAIL answer 451, AUTH 454 until it "
                           "answers ({} failed lookups so far)", self.backend, error, self.failures)
        self.down = True

    def answered(self) -> None:
        if self.down:
            logger.info("directory: {} answers again (after {} failed lookups)", self.backend, self.failures)
            self.down, self.failures = False, 0


class SQLDirectory(Directory):
    authenticates = True

    def __init__(self, engine: Engine, *, delimiters: str = "+", cache_ttl: float = 5.0,
                 cache_size: int = 10000, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.delimiters = delimiters
        self.cache = TTLCache(cache_ttl, cache_size, clock)
        self.health = Health(engine.name, clock=clock)

    def _cached(self, kind: str, key: str, fetch: Callable[[str], object]):
        value = self.cache.get((kind, key))
        if value is MISS:
            if not self.health.probe():
                metrics.DIRECTORY_ERRORS.labels(self.engine.name).inc()
                raise DirectoryUnavailable(f"{self.engine.name} did not answer; asked again soon")
            try:
                value = fetch(key)
            except DirectoryUnavailable as exc:
                self.health.failed(exc)
                raise
            self.health.answered()
            self.cache.put((kind, key), value)
        return value

    def is_local(self, domain: str) -> bool:
        return self._cached("domain", domain.lower(), lambda d: bool(self.engine.rows(DOMAIN, (d,))))

    def entry(self, address: str) -> Entry | None:
        return self._cached("entry", address, self._entry)

    def _entry(self, address: str) -> Entry | None:
        rows = self.engine.rows(ENTRY, (address, address))
        if not rows:
            return None
        mailbox = rows[0][0] is None
        return Entry(mailbox, tuple(target for target, _ in rows[mailbox:]))

    def password_hash(self, user: str) -> str | None:
        def fetch(key: str) -> str | None:
            rows = self.engine.rows(PASSWORD, (key,))
            return rows[0][0] if rows else None
        return self._cached("user", user, fetch)

    def primary_domain(self) -> str | None:
        return self._cached("first", "", lambda _: self.engine.rows(FIRST_DOMAIN, ())[0][0])

    def describe(self) -> str:
        return f"{self.engine.describe()} (answers kept {self.cache.ttl:g}s)"

    def close(self) -> None:
        self.engine.close()


# -- what the command line writes ----------------------------------------------------------
def init(engine: Engine) -> None:
    """Create the tables that are missing (run it again any time: it changes nothing else)."""
    engine.write([(statement, ()) for statement in SCHEMA])


def set_password(engine: Engine, user: str, encoded: str) -> None:
    engine.write([(SET_PASSWORD, (user, encoded))])


def delete_user(engine: Engine, user: str) -> bool:
    return engine.write([(DELETE_USER, (user,))])[0] > 0


def add_domain(engine: Engine, domain: str) -> None:
    engine.write([(ADD_DOMAIN, (domain,))])


def add_mailbox(engine: Engine, address: str) -> None:
    engine.write([(ADD_MAILBOX, (address,))])


def add_alias(engine: Engine, address: str, targets: list[str]) -> None:
    engine.write([(ADD_ALIAS, (address, target, position)) for position, target in enumerate(targets)])


def open_engine(backend: str, *, path: str, url: str | None, password: str | None, timeout: float,
                pool_size: int, run: Callable, create: bool = False) -> Engine:
    """The Engine for [directory] backend = "sqlite" or "postgresql" (opens nothing yet:
    connections are made at the first lookup, in the process that makes it). `create`: the
    SQLite file may be made (by `geosmtp directory init` only)."""
    if backend == "sqlite":
        from geosmtp.directory.sqlite import SQLiteEngine

        return SQLiteEngine(path, timeout=timeout, run=run, create=create)
    from geosmtp.directory.postgres import PostgresEngine

    assert url is not None  # the config model requires it
    return PostgresEngine(url, password=password, timeout=timeout, pool_size=pool_size)
