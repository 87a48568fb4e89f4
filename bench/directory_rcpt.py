#!/usr/bin/env python3
"""What the directory in SQL costs: acceptance (1 KB, c=20, one message per connection) with
the recipient looked up in PostgreSQL or SQLite, beside the same server reading it from the
TOML file, in one invocation (issue 17's benchmark; Linux, Debian's postgresql 15).

Servers, side by side from configs written here (MX listener, `hold = true`: accepted mail
waits in queue/hold/, one local domain and mailbox, rcpt@bench.test, which every message is
sent to): `toml` ([local] users), `postgresql` (cache_ttl 5 s: after the first message the
answers come from each process's cache, the steady state of a busy MX), `postgresql-nocache`
(cache_ttl 0: every RCPT asks the database, is the domain local and what is the address: two
queries; what a stream of distinct recipients costs) and `sqlite` (cache 5 s). PostgreSQL is
a real server started here on loopback (tests/support/postgres.py: fsync off, a tmp folder).

Runs alternate between the servers so drift on a shared machine hits all; each run counts
only messages found in queue/hold/ (bench/checks.py's run_once). Prints msgs/s per run, the
medians, the ratio to toml and the milliseconds added per message (1000/rate - 1000/toml).

    .venv/bin/python bench/directory_rcpt.py                     # 3 reps of 3000 messages
    .venv/bin/python bench/directory_rcpt.py --reps 5 --workers 2
    GEOSMTP_TEST_PORTS=8000:400 .venv/bin/python bench/directory_rcpt.py   # ports beside another run
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import bench  # noqa: E402  (load generator, /proc readers)
import checks  # noqa: E402  (run_once: one timed, verified run)
from tests.support.ports import free_port  # noqa: E402  (GEOSMTP_TEST_PORTS: beside other runs)
from tests.support.postgres import Postgres  # noqa: E402

RCPT = "rcpt@bench.test"
CONFIG = """\
# written by bench/directory_rcpt.py
[server]
hostname = "geosmtp-bench.test"
spool_dir = "{spool}"
workers = {workers}

[[listener]]
name = "mx"
address = "127.0.0.1:{port}"
mode = "smtp"
hold = true

[limits]
max_connections = 20000
max_connections_per_ip = 20000

[local]
maildir_root = "{mail}"
{local}
[log]
level = "WARNING"
{directory}"""
VARIANTS = {
    "toml": ('domains = ["bench.test"]\nusers = ["rcpt@bench.test"]\n', ""),
    "postgresql": ("", '[directory]\nbackend = "postgresql"\nurl = "{url}"\ncache_ttl = "5s"\n'),
    "postgresql-nocache": ("", '[directory]\nbackend = "postgresql"\nurl = "{url}"\ncache_ttl = 0\n'),
    "sqlite": ("", '[directory]\nbackend = "sqlite"\npath = "{sqlite}"\ncache_ttl = "5s"\n'),
}


class Server(checks.Server):
    def __init__(self, name: str, scratch: str, workers: int, values: dict[str, str]):  # noqa: D107
        self.name = name
        root = os.path.join(scratch, name)
        os.makedirs(root)
        self.spool = os.path.join(root, "spool")
        self.hold = os.path.join(self.spool, "queue", "hold")
        self.port = free_port()
        local, directory = VARIANTS[name]
        self.config = os.path.join(root, "geosmtp.toml")
        with open(self.config, "w") as fh:
            fh.write(CONFIG.format(spool=self.spool, workers=workers, port=self.port, mail=os.path.join(root, "mail"),
                                   local=local, directory=directory.format(**values)))
        self.log = open(os.path.join(root, "geosmtp.log"), "ab")
        exe = os.path.join(REPO, ".venv", "bin", "geosmtp")
        self.proc = subprocess.Popen([exe, "start", "-c", self.config], cwd=root, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, preexec_fn=bench.raise_nofile,
                                     start_new_session=True)
        if not bench.wait_banner(self.port, self.proc):
            self.stop()
            with open(os.path.join(root, "geosmtp.log"), errors="replace") as fh:
                sys.exit(f"{name}: geosmtp did not answer on 127.0.0.1:{self.port}:\n{fh.read()[-3000:]}")


def fill(engine) -> None:
    from geosmtp.directory import sql

    sql.init(engine)
    sql.add_domain(engine, "bench.test")
    sql.add_mailbox(engine, RCPT)
    engine.close()


def load() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conc", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per server (default 3)")
    ap.add_argument("-n", type=int, default=3000, help="messages per run (default 3000)")
    ap.add_argument("--workers", type=int, default=1, help="[server] workers of every server (default 1)")
    ap.add_argument("--servers", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)} (toml always)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", help="write the runs here")
    a = ap.parse_args()
    names = ["toml"] + [n for n in a.servers.split(",") if n != "toml"]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown server(s): {', '.join(sorted(unknown))}")

    from geosmtp.directory.postgres import PostgresEngine
    from geosmtp.directory.sqlite import SQLiteEngine

    scratch = tempfile.mkdtemp(prefix="geosmtp-directory-bench-")
    pg = Postgres()
    servers: list[Server] = []
    try:
        pg.start()
        fill(PostgresEngine(pg.url))
        values = {"url": pg.url, "sqlite": os.path.join(scratch, "directory.sqlite")}
        fill(SQLiteEngine(values["sqlite"], create=True))
        servers = [Server(name, scratch, a.workers, values) for name in names]
        message_file = os.path.join(scratch, "message.eml")
        with open(message_file, "wb") as fh:
            fh.write(bench.build_message(a.size)[:-3])
        for srv in servers:  # untimed: every server up and its directory asked once
            warm = checks.run_once(srv, message_file, a.size, 1, 1, a.timeout)
            if not warm["ok"]:
                sys.exit(f"{srv.name}: the warm-up message was not accepted: {warm['errors']}")
        print(f"load average before: {load()}")
        runs = []
        for rep in range(a.reps):
            for srv in servers:
                r = checks.run_once(srv, message_file, a.size, a.conc, a.n, a.timeout)
                runs.append(r)
                print(f"{srv.name:20} run {rep + 1}: {r['msgs_per_s']:8.1f} msgs/s  {r['cpu_s_per_1000']:6.2f} CPU-s/1000"
                      f"{'' if r['ok'] else '  FAIL ' + str(r['errors'])}", flush=True)
        print(f"load average after: {load()}")
        print()
        print(f"{a.size} B, c={a.conc}, {a.workers} worker(s) each, median of {a.reps} runs of {a.n}")
        print()
        print("| directory | msgs/s | CPU-s / 1000 | vs toml | ms added per message |")
        print("|---|---|---|---|---|")
        base = statistics.median(r["msgs_per_s"] for r in runs if r["server"] == "toml")
        medians = {}
        for srv in servers:
            mine = [r for r in runs if r["server"] == srv.name]
            m = medians[srv.name] = statistics.median(r["msgs_per_s"] for r in mine)
            cpu = statistics.median(r["cpu_s_per_1000"] for r in mine)
            added = 1000 / m - 1000 / base if m and base else float("nan")
            print(f"| {srv.name} | {m:.0f} | {cpu:.2f} | {m / base:.2f} | {added:+.3f} |")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(dict(args=vars(a), runs=runs, median=medians, load=load()), fh, indent=1)
        return 0 if all(r["ok"] for r in runs) else 1
    finally:
        for srv in servers:
            srv.stop()
        pg.remove()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
