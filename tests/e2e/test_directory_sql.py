"""[directory] backend = "postgresql" and "sqlite" end to end: real geosmtp processes over a
real PostgreSQL (tests/support/postgres.py) or an SQLite file, filled with `geosmtp directory`
and `geosmtp passwd` as an operator would. RCPT and AUTH from the database; the database
stopped under a running server (451 4.3.0 and 454 4.7.0, never 550 or 235) and started again;
a mailbox added once is live on two nodes of two workers each within the cache time."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from geosmtp import replies
from tests.e2e.test_auth import plain
from tests.support.e2e import code, connect, expect, queue_id, send_message, wait_delivered
from tests.support.postgres import Postgres
from tests.support.server import PASSWORDS, ServerProcess

ALICE, BOB = "alice@example.test", "bob@example.test"
CACHE_TTL = 1.0
# the database holds these; the configuration file none of them
NO_TABLES = {"local": {"domains": None, "users": None, "aliases": None}, "auth": {"users_file": None},
             "listeners": {"submission": {"allow_plaintext_auth": True}}}


def geosmtp(config_path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geosmtp", *args, "-c", str(config_path)], input=stdin,
                          capture_output=True, text=True, timeout=60)


def fill_directly(path) -> None:
    """The test directory, written straight into an SQLite file (quicker than commands)."""
    from geosmtp.auth import hash_password
    from geosmtp.directory import sql
    from geosmtp.directory.sqlite import SQLiteEngine

    engine = SQLiteEngine(path)
    for domain in ("example.test", "other.test"):
        sql.add_domain(engine, domain)
    for address in (ALICE, BOB, "postmaster@example.test", "carol@other.test"):
        sql.add_mailbox(engine, address)
    sql.add_alias(engine, "team@example.test", [ALICE, BOB])
    for user, password in PASSWORDS.items():
        sql.set_password(engine, user, hash_password(password, ln=10))
    engine.close()


def fill(config_path) -> None:
    """The test directory, made with the command line (each command must succeed)."""
    for args in (("directory", "init"),
                 ("directory", "add-domain", "example.test", "Other.TEST"),
                 ("directory", "add-mailbox", ALICE, BOB, "postmaster@example.test", "carol@other.test"),
                 ("directory", "add-alias", "team@example.test", ALICE, BOB),
                 ("directory", "add-alias", "fwd@example.test", "someone@remote.test")):
        result = geosmtp(config_path, *args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    for user, password in PASSWORDS.items():
        result = geosmtp(config_path, "passwd", user, "--stdin", stdin=password + "\n")
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr


def sql_server(root, directory: dict, **more) -> ServerProcess:
    return ServerProcess(root, {**NO_TABLES, "directory": {"cache_ttl": CACHE_TTL, **directory}, **more})


def rcpt(port: int, address: str) -> tuple[int, list[str]]:
    with connect(port) as c:
        assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        return c.cmd(f"RCPT TO:<{address}>")


def auth(srv: ServerProcess, user: str, password: str) -> tuple[int, list[str]]:
    with connect(srv.submission_port) as c:
        return c.cmd(f"AUTH PLAIN {plain(user, password)}")


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def pg():
    with Postgres() as database:
        yield database


@pytest.fixture(scope="module")
def node(pg, tmp_path_factory):
    """One server on PostgreSQL (its directory filled through its own configuration)."""
    srv = sql_server(tmp_path_factory.mktemp("pgnode"), {"backend": "postgresql", "url": pg.url, "timeout": 1})
    fill(srv.config_path)
    srv.start()
    yield srv
    srv.stop()


def assert_directory_answers(srv: ServerProcess) -> None:
    expect(rcpt(srv.port, ALICE), replies.RECIPIENT_OK)
    expect(rcpt(srv.port, "Team@Example.TEST"), replies.RECIPIENT_OK)
    expect(rcpt(srv.port, "alice+lists@example.test"), replies.RECIPIENT_OK)
    expect(rcpt(srv.port, "carol@other.test"), replies.RECIPIENT_OK)
    expect(rcpt(srv.port, "nobody@example.test"), replies.UNKNOWN_USER)
    expect(rcpt(srv.port, "someone@remote.test"), replies.RELAY_DENIED)
    expect(auth(srv, ALICE, PASSWORDS[ALICE]), replies.AUTH_OK)
    expect(auth(srv, BOB, "wrong"), replies.AUTH_FAILED)


def test_rcpt_alias_and_auth_come_from_postgres(node):
    assert_directory_answers(node)
    with connect(node.port) as c:  # the alias delivers to both mailboxes (the master asks too)
        qid = queue_id(send_message(c, "x@remote.test", ["team@example.test"], b"Subject: t\r\n\r\nteam"))
    wait_delivered(node, ALICE, qid)
    wait_delivered(node, BOB, qid)
    assert "directory: postgresql 127.0.0.1" in node.log()


def test_postgres_stopped_gives_4xx_and_comes_back(node, pg):
    expect(rcpt(node.port, ALICE), replies.RECIPIENT_OK)
    pg.stop()
    try:
        time.sleep(CACHE_TTL + 0.2)  # what the server knew has gone stale
        for address in (ALICE, "nobody@example.test", "team@example.test"):
            expect(rcpt(node.port, address), replies.LOOKUP_FAILED)
        expect(auth(node, ALICE, PASSWORDS[ALICE]), replies.AUTH_TEMPORARY)
        expect(auth(node, BOB, "wrong"), replies.AUTH_TEMPORARY)
        with connect(node.port) as c:  # the rest of the session goes on
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            expect(c.cmd(f"RCPT TO:<{ALICE}>"), replies.LOOKUP_FAILED)
            assert c.code("NOOP") == "250 2.0.0"
    finally:
        pg.start()
    # back, with no restart and no reload
    wait_until(lambda: code(rcpt(node.port, ALICE)) == "250 2.1.5", 15, "RCPT after the database came back")
    assert_directory_answers(node)
    log = node.log()
    assert log.count("directory: postgresql lookup failed") == 1, "logged once a minute at most"
    assert "directory: postgresql answers again" in log
    for secret in PASSWORDS.values():
        assert secret not in log


def test_a_new_mailbox_is_live_on_two_nodes_of_two_workers(pg, node, tmp_path):
    nodes = [sql_server(tmp_path / f"n{i}", {"backend": "postgresql", "url": pg.url, "timeout": 1},
                        server={"workers": 2}).start() for i in range(2)]
    try:
        for srv in nodes:  # every worker of each node has asked (and keeps the "no")
            wait_until(lambda: len({line.split()[3] for line in srv.log().splitlines()
                                    if f"listening on 127.0.0.1:{srv.port}" in line}) == 2, 15, "two workers")
            for _ in range(6):
                expect(rcpt(srv.port, "dave@example.test"), replies.UNKNOWN_USER)
        result = geosmtp(node.config_path, "directory", "add-mailbox", "dave@example.test")
        assert result.returncode == 0, result.stderr
        result = geosmtp(node.config_path, "passwd", "dave@example.test", "--stdin", stdin="dave-pw\n")
        assert result.returncode == 0, result.stderr
        added = time.monotonic()
        for srv in nodes:
            # live within the cache time in every worker: six connections in a row take it
            wait_until(lambda: all(code(rcpt(srv.port, "dave@example.test")) == "250 2.1.5" for _ in range(6)),
                       CACHE_TTL + 5, "the new mailbox on every worker")
            expect(auth(srv, "dave@example.test", "dave-pw"), replies.AUTH_OK)
        assert time.monotonic() - added < CACHE_TTL + 5
        for srv in nodes:
            with connect(srv.port) as c:
                qid = queue_id(send_message(c, "x@remote.test", ["dave@example.test"], b"Subject: d\r\n\r\nhi"))
            wait_delivered(srv, "dave@example.test", qid)
    finally:
        for srv in nodes:
            srv.stop()


def test_a_silent_database_does_not_stall_other_sessions(tmp_path):
    """A PostgreSQL that accepts and never answers: RCPT waits its timeout, then 451; other
    sessions are served meanwhile (the lookup yields to them)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"postgresql://geosmtp@127.0.0.1:{silent.getsockname()[1]}/geosmtp"
        srv = sql_server(tmp_path / "silent", {"backend": "postgresql", "url": url, "timeout": 2}).start()
        try:
            got = {}

            def blocked():
                started = time.monotonic()
                got["reply"], got["took"] = rcpt(srv.port, ALICE), time.monotonic() - started

            waiting = threading.Thread(target=blocked)
            waiting.start()
            time.sleep(0.5)
            started = time.monotonic()
            with connect(srv.port) as c:  # greeting, EHLO, NOOP while the lookup hangs
                assert c.code("NOOP") == "250 2.0.0"
            assert time.monotonic() - started < 1.0
            waiting.join(15)
            expect(got["reply"], replies.LOOKUP_FAILED)
            assert 1.5 < got["took"] < 5
        finally:
            srv.stop()


def test_sqlite_directory(tmp_path):
    srv = sql_server(tmp_path / "lite", {"backend": "sqlite", "path": str(tmp_path / "lite" / "directory.sqlite")})
    result = geosmtp(srv.config_path, "check-config")
    assert result.returncode == 2 and "directory.path:" in result.stderr, result.stderr
    result = geosmtp(srv.config_path, "directory", "init")
    assert result.returncode == 0 and "schema 1" in result.stdout, result.stderr
    fill_directly(tmp_path / "lite" / "directory.sqlite")
    assert geosmtp(srv.config_path, "check-config").returncode == 0
    srv.start()
    try:
        assert_directory_answers(srv)
        with connect(srv.port) as c:
            qid = queue_id(send_message(c, "x@remote.test", ["team@example.test"], b"Subject: t\r\n\r\nteam"))
        wait_delivered(srv, BOB, qid)
        result = geosmtp(srv.config_path, "directory", "add-mailbox", "erin@example.test")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: code(rcpt(srv.port, "erin@example.test")) == "250 2.1.5", CACHE_TTL + 3, "new mailbox")
        result = geosmtp(srv.config_path, "passwd", BOB, "--delete")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: code(auth(srv, BOB, PASSWORDS[BOB])) == "535 5.7.8", CACHE_TTL + 3, "user removed")
    finally:
        srv.stop()


def test_sql_backends_refuse_tables_in_the_file(tmp_path):
    srv = ServerProcess(tmp_path / "mixed", {"directory": {"backend": "sqlite"}})
    result = geosmtp(srv.config_path, "check-config")
    assert result.returncode == 2
    for key in ("local.domains", "local.users", "local.aliases", "auth.users_file"):
        assert f"{key}: not used with [directory] backend = 'sqlite'" in result.stderr, result.stderr


def test_directory_commands_need_an_sql_backend(tmp_path):
    srv = ServerProcess(tmp_path / "plain")  # backend = "config"
    for args in (("directory", "init"), ("directory", "add-mailbox", ALICE)):
        result = geosmtp(srv.config_path, *args)
        assert result.returncode == 2 and 'backend = "config"' in result.stderr, result.stderr
    result = geosmtp(srv.config_path, "directory", "add-domain", "not a domain")
    assert result.returncode == 2 and "not a domain name" in result.stderr, result.stderr
