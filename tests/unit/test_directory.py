"""geosmtp.directory: the one contract, answered alike by the config backend, SQLite and a
real PostgreSQL (started by the test); the cache; what a backend that does not answer does."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from geosmtp import metrics, policy, replies
from geosmtp.auth import check, hash_password
from geosmtp.directory import DirectoryUnavailable, Entry
from geosmtp.directory import sql
from geosmtp.directory.cache import MISS, TTLCache
from geosmtp.directory.postgres import PostgresEngine, describe_url
from geosmtp.directory.sql import Health, SQLDirectory
from geosmtp.directory.sqlite import SQLiteEngine
from geosmtp.directory.static import ConfigDirectory
from geosmtp.protocol import Address, parse_forward_path
from tests.support.postgres import Postgres
from tests.unit.test_policy import STRANGER

DOMAINS = ["example.test", "other.test"]
MAILBOXES = ["alice@example.test", "bob@example.test", "keep@example.test", "carol@other.test"]
ALIASES = {
    "team@example.test": ["alice@example.test", "bob@example.test"],
    "keep@example.test": ["keep@example.test", "keep@remote.test"],  # keeps a copy
    "nested@example.test": ["team@example.test", "carol@other.test"],
    "loop1@example.test": ["loop2@example.test"],
    "loop2@example.test": ["loop1@example.test"],
    "ghost@example.test": ["nobody@example.test"],
    "alice+spam@example.test": ["bob@example.test"],
}
HASH = hash_password("alice-pw", ln=4)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def postgres():
    with Postgres() as pg:
        yield pg


def fill(engine) -> None:
    sql.init(engine)
    for domain in DOMAINS:
        sql.add_domain(engine, domain)
    for address in MAILBOXES:
        sql.add_mailbox(engine, address)
    for alias, targets in ALIASES.items():
        sql.add_alias(engine, alias, targets)
    sql.set_password(engine, "alice@example.test", HASH)


def empty_postgres(pg: Postgres) -> PostgresEngine:
    engine = PostgresEngine(pg.url, timeout=2.0)
    sql.init(engine)
    engine.write([(f"DELETE FROM {table}", ()) for table in ("domains", "mailboxes", "aliases", "users")])
    return engine


@pytest.fixture(params=["config", "sqlite", "postgresql"])
def directory(request, tmp_path):
    """The same directory from each backend."""
    if request.param == "config":
        yield ConfigDirectory(domains=frozenset(DOMAINS), users=frozenset(MAILBOXES),
                              aliases={k: tuple(v) for k, v in ALIASES.items()},
                              hashes={"alice@example.test": HASH})
        return
    if request.param == "sqlite":
        engine = SQLiteEngine(tmp_path / "directory.sqlite", create=True)
    else:
        engine = empty_postgres(request.getfixturevalue("postgres"))
    fill(engine)
    d = SQLDirectory(engine, cache_ttl=5.0)
    yield d
    d.close()


def rcpt(text: str) -> Address:
    return parse_forward_path(f"TO:<{text}>")[0]


@pytest.mark.parametrize("address, verdict", [
    ("alice@example.test", ["alice@example.test"]),
    ("Alice@Example.TEST", ["alice@example.test"]),
    ("team@example.test", ["alice@example.test", "bob@example.test"]),
    ("keep@example.test", ["keep@example.test", "keep@remote.test"]),
    ("nested@example.test", ["alice@example.test", "bob@example.test", "carol@other.test"]),
    ("alice+lists@example.test", ["alice@example.test"]),
    ("alice+spam@example.test", ["bob@example.test"]),  # the whole address first
    ("loop1@example.test", replies.UNKNOWN_USER),
    ("ghost@example.test", replies.UNKNOWN_USER),
    ("nobody@example.test", replies.UNKNOWN_USER),
    ("postmaster", replies.UNKNOWN_USER),  # postmaster@example.test: none here
    ("someone@remote.test", replies.RELAY_DENIED),
])
def test_every_backend_resolves_alike(directory, address, verdict):
    assert policy.resolve_rcpt(STRANGER, rcpt(address), directory) == verdict


def test_every_backend_answers_the_lookups(directory):
    assert directory.is_local("Example.TEST") and not directory.is_local("remote.test")
    assert directory.entry("alice@example.test") == Entry(True)
    assert directory.entry("team@example.test") == Entry(False, ("alice@example.test", "bob@example.test"))
    assert directory.entry("keep@example.test") == Entry(True, ("keep@example.test", "keep@remote.test"))
    assert directory.entry("nobody@example.test") is None
    assert directory.primary_domain() == "example.test"
    assert directory.authenticates
    assert directory.password_hash("alice@example.test") == HASH
    assert directory.password_hash("bob@example.test") is None
    assert check("alice-pw", directory.password_hash("alice@example.test"))
    assert not check("alice-pw", directory.password_hash("bob@example.test"))
    # the sender rules use the same lookups
    assert policy.check_sender("alice@example.test", Address("team", "example.test"), directory, {}) is None
    assert policy.check_sender("carol@other.test", Address("team", "example.test"), directory, {}) \
        == replies.SENDER_NOT_OWNED


def test_init_twice_keeps_the_rows(tmp_path, postgres):
    for engine in (SQLiteEngine(tmp_path / "d.sqlite", create=True), empty_postgres(postgres)):
        fill(engine)
        sql.init(engine)
        d = SQLDirectory(engine, cache_ttl=0)
        assert d.is_mailbox("alice@example.test") and d.password_hash("alice@example.test") == HASH
        assert engine.rows("SELECT version FROM directory_schema", ()) == [(sql.SCHEMA_VERSION,)]
        sql.set_password(engine, "alice@example.test", "$scrypt$new")  # an upsert
        assert d.password_hash("alice@example.test") == "$scrypt$new"
        assert sql.delete_user(engine, "alice@example.test") and not sql.delete_user(engine, "alice@example.test")
        engine.close()


def test_the_server_never_creates_an_sqlite_file(tmp_path):
    engine = SQLiteEngine(tmp_path / "missing.sqlite")
    with pytest.raises(DirectoryUnavailable, match="unable to open"):
        SQLDirectory(engine).is_local("example.test")
    assert not (tmp_path / "missing.sqlite").exists()


def test_sqlite_without_tables_is_unavailable_not_unknown(tmp_path):
    SQLiteEngine(tmp_path / "empty.sqlite", create=True).rows("SELECT 1", ())
    d = SQLDirectory(SQLiteEngine(tmp_path / "empty.sqlite"))
    with pytest.raises(DirectoryUnavailable, match="no such table"):
        policy.resolve_rcpt(STRANGER, rcpt("alice@example.test"), d)


def test_sqlite_queries_run_through_the_runner(tmp_path):
    """Each query goes to `run` (the threadpool in the server), one connection per thread."""
    ran = []
    engine = SQLiteEngine(tmp_path / "d.sqlite", create=True)
    fill(engine)

    def run(fn, *args):
        ran.append(fn.__name__)
        out = []
        t = threading.Thread(target=lambda: out.append(fn(*args)))
        t.start()
        t.join(10)
        return out[0]

    d = SQLDirectory(SQLiteEngine(tmp_path / "d.sqlite", run=run), cache_ttl=0)
    assert d.is_mailbox("bob@example.test")
    assert ran == ["_rows"]


# -- the cache -----------------------------------------------------------------------------
def test_cache_keeps_answers_for_ttl_and_no_more():
    clock = Clock()
    cache = TTLCache(5.0, 3, clock)
    cache.put("a", None)  # a negative answer is an answer
    assert cache.get("a") is None and cache.get("b") is MISS
    clock.now += 4.9
    assert cache.get("a") is None
    clock.now += 0.2
    assert cache.get("a") is MISS and len(cache) == 0


def test_cache_is_bounded_oldest_first():
    cache = TTLCache(60.0, 3, Clock())
    for key in "abcd":
        cache.put(key, key)
    assert len(cache) == 3 and cache.get("a") is MISS and cache.get("d") == "d"
    assert TTLCache(0, 10).put("a", 1) is None and len(TTLCache(0, 10)) == 0


def test_new_mailbox_is_seen_within_the_cache_time(tmp_path):
    clock = Clock()
    engine = SQLiteEngine(tmp_path / "d.sqlite", create=True)
    fill(engine)
    d = SQLDirectory(engine, cache_ttl=5.0, clock=clock)
    assert policy.resolve_rcpt(STRANGER, rcpt("dave@example.test"), d) == replies.UNKNOWN_USER
    sql.add_mailbox(engine, "dave@example.test")
    assert policy.resolve_rcpt(STRANGER, rcpt("dave@example.test"), d) == replies.UNKNOWN_USER  # cached
    clock.now += 5.0
    assert policy.resolve_rcpt(STRANGER, rcpt("dave@example.test"), d) == ["dave@example.test"]


def test_cached_lookups_do_not_ask_again(tmp_path):
    engine = SQLiteEngine(tmp_path / "d.sqlite", create=True)
    fill(engine)
    asked = []
    rows = engine.rows
    engine.rows = lambda statement, params: asked.append(params) or rows(statement, params)
    d = SQLDirectory(engine, cache_ttl=60.0)
    for _ in range(3):
        assert d.expand("nested@example.test") == ["alice@example.test", "bob@example.test", "carol@other.test"]
    first = len(asked)
    assert first == len(set(asked))  # each lookup once, the first time


# -- a database that does not answer -----------------------------------------------------------
def errors(backend: str) -> float:
    return metrics.DIRECTORY_ERRORS.labels(backend)._value.get()


def test_postgres_down_is_unavailable_then_back(postgres):
    engine = empty_postgres(postgres)
    fill(engine)
    d = SQLDirectory(engine, cache_ttl=0)
    assert d.is_mailbox("alice@example.test")
    before = errors("postgresql")
    postgres.stop()
    try:
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable):  # asks, and waits at most its timeout
            policy.resolve_rcpt(STRANGER, rcpt("alice@example.test"), d)
        assert time.monotonic() - started < engine.timeout + 1
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable, match="asked again soon"):  # the next ones at once
            policy.resolve_rcpt(STRANGER, rcpt("nobody@example.test"), d)
        with pytest.raises(DirectoryUnavailable):
            d.password_hash("alice@example.test")
        assert time.monotonic() - started < 0.5
        assert errors("postgresql") == before + 3
        assert d.health.down
    finally:
        postgres.start()
    deadline = time.monotonic() + 15
    while True:  # back without anything done: the pool connects again
        try:
            assert policy.resolve_rcpt(STRANGER, rcpt("alice@example.test"), d) == ["alice@example.test"]
            break
        except DirectoryUnavailable:
            assert time.monotonic() < deadline, "the directory did not come back"
            time.sleep(0.2)
    assert not d.health.down
    d.close()


def test_connections_from_before_a_restart_are_replaced_unseen(postgres):
    """The database restarts between two lookups: the pooled connections it cut fail at
    their next use and the lookup goes on with a new one (no error reaches the caller)."""
    engine = empty_postgres(postgres)
    fill(engine)
    d = SQLDirectory(engine, cache_ttl=0)
    assert d.is_mailbox("alice@example.test")
    postgres.stop()
    postgres.start()
    before = errors("postgresql")
    assert d.is_mailbox("alice@example.test") and d.password_hash("alice@example.test") == HASH
    assert errors("postgresql") == before
    d.close()


def test_a_silent_postgres_times_out():
    """A server that accepts and never answers: the lookup gives up within its timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        d = SQLDirectory(PostgresEngine(f"postgresql://x@127.0.0.1:{port}/x", timeout=0.5))
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable, match="within 0.5s"):
            d.is_local("example.test")
        assert time.monotonic() - started < 2.0
        d.close()


def test_a_backend_that_failed_is_asked_once_a_second():
    clock = Clock()
    health = Health("sqlite", clock=clock)
    assert health.probe() and health.probe()  # answering: always asked
    health.failed(DirectoryUnavailable("down"))
    assert not health.probe()
    clock.now += 1.0
    assert health.probe() and not health.probe()  # one lookup takes the turn
    health.answered()
    assert health.probe() and health.probe()


def test_health_logs_once_a_minute_and_when_back():
    from loguru import logger

    clock = Clock()
    health = Health("postgresql", every=60.0, clock=clock)
    sink = []
    handle = logger.add(sink.append, format="{message}")
    try:
        for _ in range(5):
            health.failed(DirectoryUnavailable("down"))
            clock.now += 10
        clock.now += 20  # 70 s after the first
        health.failed(DirectoryUnavailable("down"))
        health.answered()
        health.answered()
    finally:
        logger.remove(handle)
    assert [m.split(" (")[0] for m in sink] == ["directory: postgresql lookup failed"] * 2 + \
        ["directory: postgresql answers again"]
    assert "after 6 failed lookups" in sink[-1]


def test_urls_are_described_without_password():
    assert describe_url("postgresql://geo:s3cret@db.test:6432/mail") == "postgresql db.test:6432/mail as geo"
    assert "s3cret" not in describe_url("host=db.test password=s3cret dbname=mail")
    assert "s3cret" not in describe_url("postgresql://geo:s3cret@[bad")


# -- the delivery side: a directory down defers, never bounces --------------------------------
def unavailable(_key: str) -> bool:
    raise DirectoryUnavailable("down")


def test_router_defers_what_it_cannot_place():
    from geosmtp.delivery.target import DIRECTORY_DOWN, Message, Router

    local = object()
    router = Router(local, unavailable, remote=object())
    target = router.target("example.test")
    assert target.kind == "directory"
    outcomes = target.deliver(target.destination("example.test"), Message("", ("a@example.test", "b@x.test")), None)
    assert [o.reply for o in outcomes] == [DIRECTORY_DOWN, DIRECTORY_DOWN]
    assert (DIRECTORY_DOWN.code, DIRECTORY_DOWN.enhanced) == (451, "4.3.0")
    assert Router(local, {"example.test"}.__contains__).target("Example.Test") is local


def test_maildir_defers_when_it_cannot_ask_for_the_mailbox(tmp_path):
    from geosmtp.delivery.local import MaildirDelivery
    from geosmtp.delivery.target import DIRECTORY_DOWN, Message

    maildir = MaildirDelivery(tmp_path / "mail", "mx.example.test", unavailable)
    msg = Message("x@remote.test", ("alice@example.test",), id="Q1", created=1.0, slots=(0,))
    assert [o.reply for o in maildir.deliver("maildir", msg, None)] == [DIRECTORY_DOWN]
    assert not (tmp_path / "mail").exists()
