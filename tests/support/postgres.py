"""A real PostgreSQL for tests: Debian's postgresql 15 (apt-get install postgresql), a cluster
made by initdb in a temporary folder, serving on a loopback port and a socket in that folder.

initdb and postgres refuse to run as root: as root (CI), both run as `nobody`, which owns the
folder. Trust authentication for the user "postgres" on loopback only; fsync off (a test's
data need not survive a power cut). stop() and start() again keep the data: a test stops the
database under a running geosmtp and brings it back.

    with Postgres() as pg:
        pg.sql("INSERT INTO domains VALUES ('example.test')")
        ... [directory] url = pg.url ...
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.ports import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
UNPRIVILEGED = "nobody"


class Postgres:
    def __init__(self, dbname: str = "geosmtp"):
        self.dbname = dbname
        self.dir: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def _as_owner(self) -> list[str]:
        """The command prefix that runs a program as the cluster's owner."""
        if os.geteuid() != 0:
            return []
        user = pwd.getpwnam(UNPRIVILEGED)
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]

    def _run(self, *cmd: str, timeout: float = 60.0) -> None:
        result = subprocess.run([*self._as_owner(), *cmd], capture_output=True, text=True, timeout=timeout,
                                cwd=self.dir)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")

    def start(self, timeout: float = 30.0) -> "Postgres":
        """The first start makes the cluster and the database; later ones reuse them."""
        if not (BIN / "postgres").exists():
            raise RuntimeError("PostgreSQL 15 is not installed (Debian package postgresql: apt-get install postgresql)")
        first = self.dir is None
        if first:
            self.dir = Path(tempfile.mkdtemp(prefix="geosmtp-pg-"))
            if os.geteuid() == 0:
                user = pwd.getpwnam(UNPRIVILEGED)
                os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.dir.chmod(0o700)
            self._run(str(BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            self.port = free_port()
        log = open(self.dir / "log", "ab")
        self.proc = subprocess.Popen(
            [*self._as_owner(), str(BIN / "postgres"), "-D", str(self.dir / "data"), "-k", str(self.dir),
             "-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "max_connections=60"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        self._wait_ready(timeout)
        if first:
            self.sql(f"CREATE DATABASE {self.dbname}", dbname="postgres")
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {self.log()}")
            try:
                self.sql("SELECT 1", dbname="postgres")
                return
            except Exception:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not answer within {timeout:g}s: {self.log()}")

    def log(self) -> str:
        path = self.dir / "log" if self.dir else None
        return path.read_text(errors="replace")[-4000:] if path and path.exists() else ""

    def sql(self, statement: str, params: tuple = (), dbname: str | None = None) -> list[tuple]:
        """Run one statement (autocommit) with a fresh connection; its rows, if any."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/{dbname or self.dbname}",
                             autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open connections are cut, as when the database goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def remove(self) -> None:
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
