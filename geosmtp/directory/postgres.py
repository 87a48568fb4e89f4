"""The directory in PostgreSQL, shared by every node of a fleet: psycopg 3 over a
psycopg_pool connection pool, on the gevent hub.

psycopg 3 (3.1.14 and later) sees gevent's monkey patching when it is imported and then waits
for its sockets through the patched select module: a query yields to other greenlets instead
of blocking the process, so lookups run on the hub and need no thread. The pool's own
workers are threads, which the patching makes greenlets.

Nothing is opened until the first lookup, so each process (master and every worker) makes
its own pool after it has started, and a server whose database is down still starts (its
lookups fail until the database is back). Every lookup is bounded by `timeout`: the wait for
a pooled connection, the statement on the server (statement_timeout) and, around both, a
gevent timeout for a server that stops answering altogether. A failed connection is retried
by the pool within `timeout` and then again at the next lookup, so a database that comes
back is used again without a restart; the connections it had before are found dead at
their next use and replaced.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import gevent

from geosmtp.directory import DirectoryUnavailable

# psycopg_pool reports every failed reconnection through the logging module: the directory's
# own warning (rate-limited, in our log) says it instead
for _name in ("psycopg", "psycopg.pool"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
    logging.getLogger(_name).propagate = False


class _Deadline(Exception):
    """The whole lookup took longer than its timeout (raised by gevent.Timeout)."""


@lru_cache(maxsize=64)
def _placeholders(sql: str) -> str:
    return sql.replace("?", "%s")  # the statements hold no other "?" nor any "%"


def describe_url(url: str) -> str:
    """host:port/dbname as user, for logs: whatever the URL says of a password is left out."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:  # a malformed URL: say nothing of it but that
        return "postgresql (unparsable url)"
    host = params.get("host") or "localhost"
    where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or '-'}"
    return f"postgresql {where}" + (f" as {params['user']}" if params.get("user") else "")


class PostgresEngine:
    name = "postgresql"

    def __init__(self, url: str, *, password: str | None = None, timeout: float = 2.0, pool_size: int = 4):
        self.url = url
        self.password = password
        self.timeout = timeout
        self.pool_size = pool_size
        self._pool = None

    def describe(self) -> str:
        return describe_url(self.url)

    def _open(self):
        from psycopg_pool import ConnectionPool

        kwargs = {"autocommit": True, "connect_timeout": max(2, math.ceil(self.timeout))}
        if self.password is not None:
            kwargs["password"] = self.password
        pool = ConnectionPool(
            self.url, kwargs=kwargs, min_size=1, max_size=self.pool_size, open=False,
            timeout=self.timeout, configure=self._configure,
            # give up a failing reconnection soon: the next lookup starts a new one at once
            # (the default backs off for minutes, past the database's return)
            reconnect_timeout=self.timeout, name="geosmtp-directory",
        )
        pool.open(wait=False)
        self._pool = pool
        return pool

    def _configure(self, conn) -> None:
        conn.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")

    def _run(self, work):
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self._pool or self._open()
        try:
            with gevent.Timeout(self.timeout, _Deadline):
                # a pooled connection is not checked before use (a round trip per lookup):
                # one the database closed since (a restart) fails at once, is dropped by
                # the pool, and the next is tried
                for _ in range(self.pool_size):
                    with pool.connection(timeout=self.timeout) as conn:
                        try:
                            return work(conn)
                        except psycopg.OperationalError:
                            if not conn.broken:
                                raise
                with pool.connection(timeout=self.timeout) as conn:
                    return work(conn)
        except _Deadline:
            raise DirectoryUnavailable(f"{self.describe()}: no answer within {self.timeout:g}s") from None
        except PoolTimeout:
            raise DirectoryUnavailable(f"{self.describe()}: no connection within {self.timeout:g}s") from None
        except (psycopg.Error, OSError) as exc:
            raise DirectoryUnavailable(f"{self.describe()}: {type(exc).__name__}: {exc}".rstrip()) from None

    def rows(self, sql: str, params: tuple) -> list[tuple]:
        return self._run(lambda conn: conn.execute(_placeholders(sql), params).fetchall())

    def write(self, statements: list[tuple[str, tuple]]) -> list[int]:
        def work(conn) -> list[int]:
            with conn.transaction():
                return [conn.execute(_placeholders(sql), params).rowcount for sql, params in statements]
        return self._run(work)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=1.0)
