"""The directory in an SQLite file: the embedded choice for one node whose users and aliases
outgrew the configuration file (`geosmtp directory init` makes the file).

A query reads a local file, so it runs in gevent's threadpool (`run`), never on the hub.
Each thread of the pool opens its own connection once (an sqlite3 connection belongs to the
thread that uses it). `geosmtp directory init` puts the file in WAL mode, so lookups never
wait for a writer such as `geosmtp passwd`; `timeout` bounds how long a statement waits for
a lock. The server opens the file
read-write but never creates it: a missing file is an error, not an empty directory.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Callable

from geosmtp.directory import DirectoryUnavailable


def _real_thread_id() -> Callable[[], int]:
    # under gevent's monkey patching threading.get_ident names the greenlet; the connection
    # belongs to the OS thread
    try:
        from gevent import monkey

        return monkey.get_original("_thread", "get_ident")
    except ImportError:  # pragma: no cover - gevent is a dependency
        import _thread

        return _thread.get_ident


def _direct(fn, *args):
    return fn(*args)


class SQLiteEngine:
    name = "sqlite"

    def __init__(self, path: str | os.PathLike, *, timeout: float = 2.0, run: Callable = _direct,
                 create: bool = False):
        self.path = os.path.abspath(path)
        self.timeout = timeout
        self.run = run
        self.create = create  # `geosmtp directory init` makes the file; the server never does
        self._thread = _real_thread_id()
        self._connections: dict[int, sqlite3.Connection] = {}  # OS thread → its connection

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _connection(self) -> sqlite3.Connection:
        me = self._thread()
        conn = self._connections.get(me)
        if conn is None:
            mode = "rwc" if self.create else "rw"
            conn = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, timeout=self.timeout,
                                   isolation_level=None, check_same_thread=False)
            if self.create:  # WAL is kept in the file: readers never wait for a writer
                conn.execute("PRAGMA journal_mode=WAL")
            self._connections[me] = conn
        return conn

    def _rows(self, sql: str, params: tuple) -> list[tuple]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise DirectoryUnavailable(f"sqlite {self.path}: {exc}") from None

    def rows(self, sql: str, params: tuple) -> list[tuple]:
        return self.run(self._rows, sql, params)

    def _write(self, statements: list[tuple[str, tuple]]) -> list[int]:
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                counts = [conn.execute(sql, params).rowcount for sql, params in statements]
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return counts
        except sqlite3.Error as exc:
            raise DirectoryUnavailable(f"sqlite {self.path}: {exc}") from None

    def write(self, statements: list[tuple[str, tuple]]) -> list[int]:
        return self.run(self._write, statements)

    def close(self) -> None:
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()
