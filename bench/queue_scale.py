#!/usr/bin/env python3
"""How geosmtp's queue scales: a spool with N deferred entries (100,000 by default,
1,000,000 with --entries 1000000), written straight into the spool directory.

  1. build: N deferred entries (msg/<id> linked into queue/deferred/<id>, the file's mtime
     the next attempt, a day away), each for one recipient at far.test; written by a few
     threads, untimed in the figures below;
  2. start-up: exec to the first 220 (recovery done), to /readyz 200, and to the queue
     manager's "deferred entries scheduled" line (its own "start-up X s" figure is printed
     too); the server's RSS (VmRSS, VmHWM) once it is scheduled;
  3. idle: the server's CPU (utime+stime from /proc/<pid>/stat) over --idle-secs, nothing due;
  4. geosmtp-queue list, summary and list --json over the whole spool while the server
     runs: wall time, time to the first line (streaming), lines, peak RSS (wait4's
     ru_maxrss), against `list --state hold` on the same spool (an empty state: the tool's
     own size);
  5. drain: the server is stopped, --drain entries due now (for sink.test: Postfix's
     smtp-sink, or bench/sink.py) are added, the server starts again; msgs/s between the
     first and the last delivery (the log's stamps), and the wall time from the schedule
     line to an empty queue (but the N future entries);
  6. fairness (--dead M): the server is stopped again, M entries due now for dead.test (a
     server that accepts connections and never says a word) and --drain more for sink.test
     are added; after a start, the sink's mail must all be delivered while dead.test holds
     at most destination_concurrency connections.

Prints a table and writes JSON (--json, default bench/results/queue-scale-<date>-<N>.json).
The machine is shared: run it when nothing else runs, or say that something did.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from geosmtp.envelope import ClientInfo, Envelope, Recipient  # noqa: E402
from geosmtp.spool import Spool, new_id  # noqa: E402
from tests.support.fakedns import FakeDNS  # noqa: E402

SINK_ADDRESS, DEAD_ADDRESS = "127.0.0.20", "127.0.0.21"
SMTP_SINK = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
PORTS = range(5380, 5400)  # this benchmark's own ports (the helper's port base is 5000)
MESSAGE = (b"From: <sender@bench.test>\r\nTo: <someone@far.test>\r\nSubject: queue scale\r\n"
           b"Message-ID: <bench@bench.test>\r\n\r\n" + b"A line of a small message.\r\n" * 16)
SCHEDULED = re.compile(rb"queue: (\d+) deferred entries scheduled \(walk ([\d.]+)s, in all ([\d.]+)s\); "
                       rb"start-up ([\d.]+)s")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
# written by bench/queue_scale.py
[server]
hostname = "geosmtp-bench.test"
spool_dir = "{spool}"

[[listener]]
name = "smtp"
address = "127.0.0.1:{port}"

[local]
domains = []
maildir_root = "{scratch}/mail"

[relay]
trusted_networks = ["127.0.0.0/8"]
dns_servers = ["{dns}"]
port = {sink_port}
connect_timeout = "30s"
command_timeout = "120s"

[queue]
concurrency = {concurrency}
destination_concurrency = {destination_concurrency}

[metrics]
address = "127.0.0.1:{metrics_port}"

[log]
level = "INFO"
file = "{scratch}/geosmtp.log"
"""


# -- the spool, written directly ------------------------------------------------------------
def write_entries(spool_dir: str, n: int, rcpt_domain: str, when: float, threads: int = 4) -> float:
    """n entries in deferred/ for one recipient each at `rcpt_domain`, due at `when`, as the
    server leaves a small message after a failed attempt; the seconds it took."""
    spool = Spool(spool_dir)
    spool.setup()
    placeholder = "0" * 23
    rcpt = f"user@{rcpt_domain}"
    template = Envelope(placeholder, time.time(), "sender@bench.test",
                        [Recipient(rcpt, rcpt, attempts=1, last_reply="451 4.4.1 bench: not yet")],
                        ClientInfo("192.0.2.1", helo="client.bench.test", listener="smtp"),
                        size=len(MESSAGE), attempts=1, last_attempt=time.time()).to_line() + MESSAGE
    head, tail = template.split(placeholder.encode())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

    def some(count: int) -> None:
        for _ in range(count):
            qid = new_id()
            msg = spool.message_path(qid)
            fd = os.open(msg, flags, 0o600)
            try:
                os.write(fd, head + qid.encode() + tail)
                os.utime(fd, (when, when))
            finally:
                os.close(fd)
            os.link(msg, spool.entry_path(qid, "deferred"))

    began = time.monotonic()
    share = [n // threads + (i < n % threads) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(some, share))
    os.sync()
    return time.monotonic() - began


def count(spool_dir: str, state: str) -> int:
    with os.scandir(os.path.join(spool_dir, "queue", state)) as it:
        return sum(1 for _ in it)


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in 5380-5399")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rindex(b")") + 2:].split()
    return sum(int(x) for x in fields[11:13]) / TICK  # utime, stime


def memory_mb(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def start_sink(port: int) -> subprocess.Popen:
    if SMTP_SINK:
        cmd = [SMTP_SINK, "-u", "nobody", f"{SINK_ADDRESS}:{port}", "1024"]
    else:
        cmd = [sys.executable, os.path.join(HERE, "sink.py"), SINK_ADDRESS, str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((SINK_ADDRESS, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("the sink did not start")


class Dead(threading.Thread):
    """A destination that accepts every connection and never says a word; counts them."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((DEAD_ADDRESS, port))
        self.listener.listen(1024)
        self.listener.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.held.append(conn)

    def open_now(self) -> int:
        """Connections still open (a closed one reads as end of file)."""
        alive = 0
        for conn in self.held:
            try:
                conn.setblocking(False)
                alive += conn.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for conn in self.held:
            conn.close()


class Server:
    def __init__(self, a, scratch: str, dns: FakeDNS, sink_port: int):
        self.scratch = scratch
        self.spool = os.path.join(scratch, "spool")
        self.port = free_port()
        self.metrics_port = next(p for p in PORTS if p != self.port and p != sink_port and _free(p))
        self.config = os.path.join(scratch, "geosmtp.toml")
        self.log = os.path.join(scratch, "geosmtp.log")
        with open(self.config, "w") as fh:
            fh.write(CONFIG.format(spool=self.spool, port=self.port, scratch=scratch, dns=dns.address,
                                   sink_port=sink_port, metrics_port=self.metrics_port,
                                   concurrency=a.concurrency, destination_concurrency=a.destination_concurrency))
        self.bin = os.path.dirname(a.geosmtp)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> dict:
        """Start, and time exec → 220, → /readyz 200, → the schedule's log line."""
        log_start = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        t0 = time.monotonic()
        self.proc = subprocess.Popen([os.path.join(self.bin, "geosmtp"), "start", "-c", self.config],
                                     cwd=self.scratch, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        out: dict = {}
        deadline = t0 + timeout
        while time.monotonic() < deadline and len(out) < 3:
            if self.proc.poll() is not None:
                sys.exit(f"geosmtp exited with {self.proc.returncode}; see {self.log}")
            now = time.monotonic() - t0
            if "banner_s" not in out and _banner(self.port):
                out["banner_s"] = now
            if "readyz_s" not in out and _ready(self.metrics_port):
                out["readyz_s"] = now
            if "scheduled_s" not in out:
                found = self._scheduled(log_start)
                if found:
                    out["scheduled_s"] = now
                    out.update(found)
            time.sleep(0.05)
        if len(out) < 3:
            sys.exit(f"geosmtp did not get ready in {timeout:.0f}s: {out}; see {self.log}")
        out.update({k.lower() + "_mb": v for k, v in memory_mb(self.proc.pid).items()})
        return out

    def _scheduled(self, log_start: int) -> dict | None:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(log_start)
                m = SCHEDULED.search(fh.read())
        except FileNotFoundError:
            return None
        if not m:
            return None
        return {"scheduled": int(m[1]), "walk_s": float(m[2]), "merge_s": float(m[3]), "startup_logged_s": float(m[4])}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def sent_stamps(self, since: int) -> list[datetime]:
        with open(self.log, "rb") as fh:
            fh.seek(since)
            return [datetime.strptime(line[:23].decode(), "%Y-%m-%d %H:%M:%S.%f")
                    for line in fh.read().splitlines() if b"status=sent" in line]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if s.recv(512).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return True
    except OSError:
        pass
    return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# -- the phases -----------------------------------------------------------------------------
def idle_cpu(pid: int, secs: float) -> dict:
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    time.sleep(secs)
    t1, c1 = time.monotonic(), cpu_seconds(pid)
    return {"secs": round(t1 - t0, 2), "cpu_s": round(c1 - c0, 3), "core_pct": round(100 * (c1 - c0) / (t1 - t0), 3)}


def run_tool(srv: Server, *args: str) -> dict:
    """One geosmtp-queue command: wall time, time to its first line, lines, peak RSS."""
    t0 = time.monotonic()
    proc = subprocess.Popen([os.path.join(srv.bin, "geosmtp-queue"), "-c", srv.config, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = None
    lines = 0
    for _ in proc.stdout:
        if first is None:
            first = time.monotonic() - t0
        lines += 1
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    return {"args": " ".join(args), "secs": round(wall, 2), "first_line_s": round(first or wall, 3), "lines": lines,
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "exit": proc.returncode}


def drain(srv: Server, n_future: int, n_due: int, timeout: float, dead: Dead | None = None) -> dict:
    """Start with n_due entries due now; wait until only the n_future ones are left."""
    log_start = os.path.getsize(srv.log)
    started = srv.start(timeout)
    t_sched = time.monotonic()
    peak_dead = 0
    deadline = t_sched + timeout
    while time.monotonic() < deadline:
        if dead is not None:
            peak_dead = max(peak_dead, dead.open_now())
        sent = len(srv.sent_stamps(log_start)) if dead is not None else None
        if dead is not None and sent >= n_due:
            break
        if dead is None and count(srv.spool, "incoming") == 0 and count(srv.spool, "active") == 0 \
                and count(srv.spool, "deferred") <= n_future:
            break
        time.sleep(0.25)
    wall = time.monotonic() - t_sched
    stamps = srv.sent_stamps(log_start)
    out = {"start": started, "due": n_due, "sent": len(stamps), "wall_after_schedule_s": round(wall, 2)}
    if len(stamps) >= 2:
        span = max((stamps[-1] - stamps[0]).total_seconds(), 1e-3)
        out.update(span_s=round(span, 2), msgs_per_s=round((len(stamps) - 1) / span, 1))
    if dead is not None:
        out.update(dead_connections_peak=peak_dead, dead_connections_total=len(dead.held),
                   states={s: count(srv.spool, s) for s in ("incoming", "active", "deferred")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000, help="deferred entries due later (default 100,000)")
    ap.add_argument("--drain", type=int, default=20_000, help="entries due now, drained to the sink (0: skip)")
    ap.add_argument("--dead", type=int, default=0, help="entries due now for a dead destination (0: skip)")
    ap.add_argument("--idle-secs", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=100, help="[queue] concurrency")
    ap.add_argument("--destination-concurrency", type=int, default=20, help="[queue] destination_concurrency")
    ap.add_argument("--skip-tools", action="store_true", help="no geosmtp-queue runs")
    ap.add_argument("--timeout", type=float, default=900.0, help="per start-up or drain")
    ap.add_argument("--scratch", help="where the spool goes (default: a new dir under /tmp; kept with --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--geosmtp", default=os.path.join(REPO, ".venv", "bin", "geosmtp"))
    ap.add_argument("--json", help="default: bench/results/queue-scale-<date>-<entries>.json")
    a = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    scratch = a.scratch or tempfile.mkdtemp(prefix="geosmtp-queuescale-")
    os.makedirs(scratch, exist_ok=True)
    result: dict = {"date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                    "cpus": os.cpu_count(), "load_before": os.getloadavg(), "entries": a.entries,
                    "concurrency": a.concurrency, "destination_concurrency": a.destination_concurrency,
                    "sink": "smtp-sink" if SMTP_SINK else "bench/sink.py", "scratch": scratch}
    sink = dead = srv = None
    try:
        with FakeDNS() as dns:
            sink_port = free_port()
            sink = start_sink(sink_port)
            for domain, host, address in (("sink.test", "mx.sink.test", SINK_ADDRESS),
                                          ("far.test", "mx.far.test", SINK_ADDRESS),
                                          ("dead.test", "mx.dead.test", DEAD_ADDRESS)):
                dns.mx(domain, [(10, host)])
                dns.a(host, address)
            srv = Server(a, scratch, dns, sink_port)
            print(f"building {a.entries} deferred entries in {srv.spool} ...", flush=True)
            result["build_s"] = round(write_entries(srv.spool, a.entries, "far.test", time.time() + 86400), 1)
            result["disk_after_build"] = shutil.disk_usage(scratch)._asdict()
            print(f"  {result['build_s']} s", flush=True)

            started = srv.start(a.timeout)
            result["startup"] = started
            print(f"start-up: 220 after {started['banner_s']:.2f} s, /readyz {started['readyz_s']:.2f} s, "
                  f"scheduled {started['scheduled']} after {started['scheduled_s']:.2f} s (logged: start-up "
                  f"{started['startup_logged_s']:.2f} s, walk {started['walk_s']:.2f} s); RSS "
                  f"{started['vmrss_mb']:.0f} MB (peak {started['vmhwm_mb']:.0f} MB)", flush=True)
            time.sleep(2)  # what start-up left behind (the first walk's garbage) settles
            result["idle"] = idle_cpu(srv.proc.pid, a.idle_secs)
            print(f"idle: {result['idle']['core_pct']:.2f}% of a core over {result['idle']['secs']:.0f} s", flush=True)

            if not a.skip_tools:
                result["tools"] = []
                for args in (("list", "--state", "hold"), ("list",), ("summary",), ("list", "--json"),
                             ("summary", "--json")):
                    got = run_tool(srv, *args)
                    result["tools"].append(got)
                    print(f"geosmtp-queue {got['args']:<16} {got['secs']:>7.2f} s  first line {got['first_line_s']:.3f} s"
                          f"  {got['lines']:>8} lines  peak RSS {got['max_rss_mb']:.0f} MB  exit {got['exit']}",
                          flush=True)
            srv.stop()

            if a.drain:
                write_entries(srv.spool, a.drain, "sink.test", time.time() - 60)
                got = result["drain"] = drain(srv, a.entries, a.drain, a.timeout)
                print(f"drain: {got['sent']} of {a.drain} due entries sent, {got.get('msgs_per_s', 0):.0f} msgs/s "
                      f"(first to last delivery), {got['wall_after_schedule_s']:.1f} s after the schedule line; "
                      f"start-up {got['start']['scheduled_s']:.2f} s", flush=True)
                srv.stop()

            if a.dead:
                dead = Dead(sink_port)
                dead.start()
                live = max(a.drain, 2000)
                write_entries(srv.spool, a.dead, "dead.test", time.time() - 120)
                write_entries(srv.spool, live, "sink.test", time.time() - 60)
                got = result["fairness"] = drain(srv, a.entries + a.dead, live, a.timeout, dead)
                got["dead_entries"] = a.dead
                print(f"fairness: {a.dead} due for a dead destination; {got['sent']} of {live} others sent at "
                      f"{got.get('msgs_per_s', 0):.0f} msgs/s, {got['wall_after_schedule_s']:.1f} s after the "
                      f"schedule line; dead destination: {got['dead_connections_peak']} connections open at most "
                      f"({got['dead_connections_total']} in all); states {got['states']}", flush=True)
                srv.stop()
    finally:
        if srv is not None:
            srv.stop()
        if dead is not None:
            dead.close()
        if sink is not None:
            os.killpg(sink.pid, signal.SIGTERM)
            sink.wait(10)
        result["load_after"] = os.getloadavg()
        path = a.json or os.path.join(HERE, "results", f"queue-scale-{datetime.now():%Y-%m-%d}-{a.entries}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"results: {path}")
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
