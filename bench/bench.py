#!/usr/bin/env python3
"""Throughput benchmark of geosmtp itself (stdlib only; Linux).

What it does
  1. writes a temporary config into a scratch dir: one smtp listener on 127.0.0.1:<port>,
     spool in the scratch dir, trusted_networks 127.0.0.0/8, no local domains, log level
     WARNING, connection limits raised so c=200 from one address is not refused;
  2. starts `geosmtp start -c <config>` as a subprocess (its own session; only that PID is
     ever signalled);
  3. for every (size, concurrency) cell: a probe run sizes N (about --target-secs of work),
     then --reps timed runs of N messages, one message per connection (connect, banner,
     EHLO/HELO, MAIL, RCPT, DATA, QUIT) to rcpt@bench.test, a non-local domain, so each
     accepted message stays queued in <spool>/queue/ (incoming -> active -> deferred);
  4. counts only messages really found in the spool: the set of envelope files under
     <spool>/queue/ (recursive, tmp ignored) must grow by exactly N new ids, and the load
     generator must report N x 250-after-DATA, or the run is marked FAIL;
  5. reports msgs/s (accepted / load-generator wall time), server CPU-seconds per 1000
     messages (utime+stime+cutime+cstime of the server's process tree, /proc) and peak RSS
     (tree sum, sampled every 0.1 s), as a markdown table (and --json).

Between runs the envelopes under queue/ are deleted (untimed), as the shared harness does;
msg/ files are left behind unless --clear-msg (they go with the scratch dir at the end).

Load generator: Postfix's smtp-source when installed (the shared harness uses it; HELO,
no pipelining), otherwise a built-in Python one (threads, raw sockets, EHLO) that runs in a
separate process, so its CPU is never counted as the server's. Force with --load.

Two CPU figures per run: "server CPU-s / 1000" is read as soon as the spool shows all N
(what the shared harness reports); "incl. queue drain" is read once the queue manager has
also moved every message of the run incoming -> active -> deferred (a rewrite of the
envelope + fsyncs), which is work a real server does for each accepted remote message.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin"
SMTP_SOURCE = shutil.which("smtp-source")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
STATES = ("incoming", "active", "deferred", "hold", "corrupt")

CONFIG_TEMPLATE = """\
# written by bench/bench.py for one benchmark run
[server]
hostname = "geosmtp-bench.test"
spool_dir = "{spool}"
workers = {workers}                  # 1: one process; N: N SMTP processes and a queue master
{spool_flush}
[[listener]]
name = "smtp"
address = "127.0.0.1:{port}"
mode = "smtp"
hold = {hold}                  # true: like postfix-hold, accepted mail waits in queue/hold/

[limits]
# the load generator connects from 127.0.0.1 only: the default 20 per address would
# refuse most of a c=200 run with 421 4.7.0
max_connections = 20000
max_connections_per_ip = 20000

[local]
domains = []                 # bench.test is not local: mail is relayed, i.e. queued
maildir_root = "{mail}"

[relay]
trusted_networks = ["127.0.0.0/8"]
# a DNS server nobody answers on: every attempt times out and defers (this machine's own
# resolver may answer NXDOMAIN for bench.test, which would bounce the mail and empty the
# queue the benchmark counts)
dns_servers = ["127.0.0.1:9"]
dns_timeout = "1s"

[queue]
concurrency = {queue_concurrency}

[log]
level = "{log_level}"
format = "text"
"""


# ------------------------------------------------------------------------------------------
# /proc readers
def _children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def proc_tree(root):
    """root and all its descendants that are alive now."""
    if root is None:
        return []
    kids = _children_map()
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids):
    """utime+stime+cutime+cstime (all threads; children that exited and were reaped)."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        total += sum(int(x) for x in fields[11:15])  # fields 14-17 of stat(5)
    return total / CLK_TCK


def rss_bytes(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


class Sampler(threading.Thread):
    """Peak RSS of the server's process tree, sampled every `period` seconds."""

    def __init__(self, root, period=0.1):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_rss = 0
        self._halt = threading.Event()

    def snap(self):
        self.peak_rss = max(self.peak_rss, rss_bytes(proc_tree(self.root)))

    def run(self):
        while not self._halt.wait(self.period):
            self.snap()

    def finish(self):
        self._halt.set()
        self.join()
        self.snap()


# ------------------------------------------------------------------------------------------
# the spool as the acceptance counter
def queue_ids(qdir):
    """Names of the regular files under qdir (recursive, 'tmp' dirs skipped). A set, so an
    envelope caught in two directories by a concurrent rename is counted once."""
    ids, stack = set(), [qdir]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != "tmp":
                            stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        ids.add(e.name)
        except FileNotFoundError:
            pass
    return ids


def state_counts(qdir):
    out = {}
    for s in STATES:
        try:
            out[s] = sum(1 for e in os.scandir(os.path.join(qdir, s)) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            out[s] = 0
    return out


def clear_spool(spool, msg=False):
    """Delete every envelope (and with msg=True every message file) between runs, untimed."""
    for sub in [f"queue/{s}" for s in STATES] + (["msg"] if msg else []):
        d = os.path.join(spool, sub)
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        try:
                            os.unlink(e.path)
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------
def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 1 << 20), hard))


_HANDED_OUT = set()  # ports given to servers not started yet


def free_port():
    """A free port below the ephemeral range (2640-2699) if there is one, else any."""
    for port in [*range(2640, 2700), 0]:
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(s.getsockname()[1])
            return s.getsockname()[1]
    raise OSError("no free port")


def wait_banner(port, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def geosmtp_command(a):
    if a.geosmtp:
        return a.geosmtp
    for cand in (os.path.join(REPO, ".venv", "bin", "geosmtp"), shutil.which("geosmtp")):
        if cand and os.access(cand, os.X_OK):
            return cand
    sys.exit("geosmtp not found: create the venv (see README) or pass --geosmtp PATH")


class GeoServer:
    def __init__(self, a, scratch, workers=1):
        os.makedirs(scratch, exist_ok=True)
        self.scratch = scratch
        self.workers = workers
        self.port = (a.port + workers - 1 if a.port else 0) or free_port()
        self.spool = os.path.join(scratch, "spool")
        self.qdir = os.path.join(self.spool, "queue")
        self.config = os.path.join(scratch, "geosmtp-bench.toml")
        self.logpath = os.path.join(scratch, "geosmtp.log")
        with open(self.config, "w") as f:
            f.write(CONFIG_TEMPLATE.format(spool=self.spool, port=self.port, mail=os.path.join(scratch, "mail"),
                                           queue_concurrency=a.queue_concurrency, log_level=a.log_level,
                                           hold="true" if a.hold else "false", workers=workers,
                                           spool_flush=f'spool_flush = "{a.spool_flush}"\n' if a.spool_flush else ""))
        self.cmd = [geosmtp_command(a), "start", "-c", self.config]
        self.proc = None
        self._log = None

    def start(self):
        self._log = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=self.scratch, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, preexec_fn=raise_nofile, start_new_session=True)
        if not wait_banner(self.port, self.proc):
            self.stop()
            sys.exit(f"geosmtp did not answer 220 on 127.0.0.1:{self.port}; log:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # only the PID we started
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc, self.proc = self.proc.returncode, None
        self._log.close()
        return rc

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_size(self):
        try:
            return os.path.getsize(self.logpath)
        except OSError:
            return 0

    def log_since(self, offset):
        with open(self.logpath, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def log_tail(self, n=4000):
        with open(self.logpath, "rb") as f:
            f.seek(max(0, os.path.getsize(self.logpath) - n))
            return f.read().decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------
# load generators
def smtp_source_cmd(port, size, conc, n):
    return [SMTP_SOURCE, "-s", str(conc), "-m", str(n), "-l", str(size), "-M", "bench.test",
            "-f", "sender@bench.test", "-t", "rcpt@bench.test", f"127.0.0.1:{port}"]


def python_loadgen_cmd(port, size, conc, n, timeout, message=None, sender=None, sources=0):
    """The built-in load generator; `message` (a file: the DATA payload as is, CRLF lines)
    and `sender` replace the generated message and sender@bench.test (bench/checks.py);
    `sources` > 0: the connections come from that many loopback addresses in turn."""
    cmd = [sys.executable, os.path.abspath(__file__), "_loadgen", "--port", str(port), "--size", str(size),
           "--conc", str(conc), "-n", str(n), "--io-timeout", str(min(timeout, 60))]
    return (cmd + (["--message", message] if message else []) + (["--sender", sender] if sender else [])
            + (["--sources", str(sources)] if sources else []))


def build_message(size):
    """About `size` octets of DATA payload (headers + lines of 76 'x'), dot-free, CRLF."""
    head = (b"From: <sender@bench.test>\r\nTo: <rcpt@bench.test>\r\nSubject: geosmtp bench\r\n"
            b"Message-Id: <bench@bench.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    if len(body) < size:
        body += b"y" * max(0, size - len(body) - 2) + b"\r\n"
    return bytes(body) + b".\r\n"


def _read_reply(f):
    lines = []
    while True:
        line = f.readline(1024)
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), b"".join(lines).decode("utf-8", "replace").strip()


def loadgen_main(argv):
    """Hidden subcommand: one message per connection, `conc` threads, `n` messages.
    Prints one JSON line; exit status 0 only if every message got 250 after DATA."""
    ap = argparse.ArgumentParser(prog="bench.py _loadgen")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--conc", type=int, default=1)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--io-timeout", type=float, default=60)
    ap.add_argument("--message", help="send this file's octets as the message (dot-free, CRLF)")
    ap.add_argument("--sender", default="sender@bench.test")
    ap.add_argument("--sources", type=int, default=0,
                    help="connect from this many addresses of 127.1.0.0/16 in turn (default: 127.0.0.1 only)")
    a = ap.parse_args(argv)
    raise_nofile()
    if a.message:
        with open(a.message, "rb") as fh:
            msg = fh.read().rstrip(b"\r\n") + b"\r\n.\r\n"
    else:
        msg = build_message(a.size)
    mail_from = f"MAIL FROM:<{a.sender}>\r\n".encode()
    lock = threading.Lock()
    state = dict(next=0, ok=0, fail=0, errors=[])
    addr = ("127.0.0.1", a.port)

    def one(k):
        stage = "connect"
        source = (f"127.1.{k % a.sources // 250}.{k % a.sources % 250 + 1}", 0) if a.sources else None
        try:
            with socket.create_connection(addr, timeout=a.io_timeout, source_address=source) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                f = s.makefile("rb")
                for stage, send, want in (("banner", None, 220),
                                          ("EHLO", b"EHLO bench.test\r\n", 250),
                                          ("MAIL", mail_from, 250),
                                          ("RCPT", b"RCPT TO:<rcpt@bench.test>\r\n", 250),
                                          ("DATA", b"DATA\r\n", 354),
                                          ("end of data", msg, 250),
                                          ("QUIT", b"QUIT\r\n", 221)):
                    if send:
                        s.sendall(send)
                    code, text = _read_reply(f)
                    if code != want:
                        if stage == "QUIT" and 200 <= code < 300:
                            break
                        return f"{stage}: {text}"
                    if stage == "end of data":
                        with lock:
                            state["ok"] += 1
                return None
        except (OSError, ConnectionError, ValueError) as exc:
            return f"{stage}: {type(exc).__name__}: {exc}"

    def worker():
        while True:
            with lock:
                if state["next"] >= a.n:
                    return
                k = state["next"]
                state["next"] += 1
            err = one(k)
            if err:
                with lock:
                    state["fail"] += 1
                    if len(state["errors"]) < 5:
                        state["errors"].append(err)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(dict(ok=state["ok"], fail=state["fail"], errors=state["errors"])), flush=True)
    return 0 if state["ok"] == a.n and not state["fail"] else 1


# ------------------------------------------------------------------------------------------
def run_once(srv, a, load, size, conc, n):
    """One timed run of n messages. Verified: loadgen ok AND exactly n new spool entries."""
    clear_spool(srv.spool, msg=a.clear_msg)
    before = queue_ids(srv.qdir)
    log_off = srv.log_size()
    root = srv.proc.pid
    cpu0 = cpu_seconds(proc_tree(root))
    sam = Sampler(root)
    sam.snap()
    sam.start()
    cmd = (smtp_source_cmd(srv.port, size, conc, n) if load == "smtp-source"
           else python_loadgen_cmd(srv.port, size, conc, n, a.timeout))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=raise_nofile)
    try:
        out, err = p.communicate(timeout=a.timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        rc = "timeout"
    wall = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    # wait for the counter to reach n (stable), then for the queue manager to drain
    # incoming/ and active/ so this run's queue work is charged to this run
    deadline = time.monotonic() + a.settle
    accepted, prev, drained, cpu_count = 0, -1, False, None
    while True:
        accepted = len(queue_ids(srv.qdir) - before)
        if accepted >= n and cpu_count is None:
            # what the shared harness measures: CPU until the counter shows all n
            cpu_count = cpu_seconds(proc_tree(root)) - cpu0
        st = state_counts(srv.qdir)
        drained = st["incoming"] == 0 and st["active"] == 0
        if (accepted >= n and accepted == prev and drained) or time.monotonic() > deadline:
            break
        prev = accepted
        time.sleep(0.05)
    settle_s = time.monotonic() - t0 - wall
    sam.finish()
    cpu = cpu_seconds(proc_tree(root)) - cpu0
    if cpu_count is None:
        cpu_count = cpu
    gen = {}
    if load == "python":
        try:
            gen = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            gen = {}
    errtext = err.decode("utf-8", "replace").strip()
    if gen.get("errors"):
        errtext = "; ".join(gen["errors"]) + (" | " + errtext if errtext else "")
    logtext = srv.log_since(log_off)
    bad_lines = [ln for ln in logtext.splitlines()
                 if any(f" {lvl}" in ln[:40] for lvl in ("WARNING", "ERROR", "CRITICAL"))]
    ok = rc == 0 and accepted == n and srv.alive()
    return dict(size=size, conc=conc, n=n, accepted=accepted, rc=rc, ok=ok, load=load,
                wall_s=round(wall, 3), settle_s=round(settle_s, 3), drained=drained,
                msgs_per_s=round(accepted / wall, 1) if ok else 0.0,
                msgs_per_s_raw=round(accepted / wall, 1),
                cpu_s=round(cpu_count, 3), cpu_s_per_1000=round(cpu_count / n * 1000, 3),
                cpu_drained_s=round(cpu, 3), cpu_drained_s_per_1000=round(cpu / n * 1000, 3),
                peak_rss_mb=round(sam.peak_rss / 2**20, 1),
                client_cpu_s=round(ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime, 3),
                load_errors=errtext[-400:], server_log_problems=len(bad_lines),
                server_log_sample=bad_lines[:3])


def fmt_size(size):
    return f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"


def report(res):
    lines = [f"geosmtp throughput: one message per connection, 1 recipient, load={res['load']}, "
             f"reps={res['reps']}, {res['cpus']} CPUs (client and server share them)", "",
             "| cell | msgs/s median [min-max] | server CPU-s / 1000 msgs | CPU-s / 1000 incl. queue drain "
             "| peak RSS MB | N per run | ok runs | server log warnings+ |",
             "|---|---|---|---|---|---|---|---|"]
    keys = []
    for c in sorted(res["cells"], key=lambda c: c.get("workers", 1)):
        if (c.get("workers", 1), c["size"], c["conc"]) not in keys:
            keys.append((c.get("workers", 1), c["size"], c["conc"]))
    several = len({k[0] for k in keys}) > 1
    for workers, size, conc in keys:
        rs = [c for c in res["cells"] if (c.get("workers", 1), c["size"], c["conc"]) == (workers, size, conc)]
        ok = [c for c in rs if c["ok"]]
        if ok:
            v = [c["msgs_per_s"] for c in ok]
            rate = f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"
            cpu = f"{statistics.median(c['cpu_s_per_1000'] for c in ok):.2f}"
            cpud = f"{statistics.median(c.get('cpu_drained_s_per_1000', 0) for c in ok):.2f}"
        else:
            rate, cpu, cpud = "FAIL", "n/a", "n/a"
        rss = f"{max(c['peak_rss_mb'] for c in rs):.0f}"
        okc = f"{len(ok)}/{len(rs)}" + ("" if len(ok) == len(rs) else " FAIL")
        logs = sum(c["server_log_problems"] for c in rs)
        label = f"{fmt_size(size)} c={conc}" + (f", workers={workers}" if several else "")
        lines.append(f"| {label} | {rate} | {cpu} | {cpud} | {rss} | {rs[0]['n']} | {okc} | {logs} |")
    fails = [c for c in res["cells"] if not c["ok"]]
    if fails:
        lines += ["", "Failed runs (not counted):"]
        for c in fails:
            lines.append(f"* {fmt_size(c['size'])} c={c['conc']} workers={c.get('workers', 1)} rep={c.get('rep')}: rc={c['rc']} "
                         f"accepted={c['accepted']}/{c['n']} {c['load_errors'][:200]}")
    return "\n".join(lines)


def cmd_run(a):
    raise_nofile()
    sizes = [int(x) for x in a.sizes.split(",")]
    concs = [int(x) for x in a.conc.split(",")]
    load = a.load
    if load == "auto":
        load = "smtp-source" if SMTP_SOURCE else "python"
    if load == "smtp-source" and not SMTP_SOURCE:
        sys.exit("smtp-source not found (apt-get install postfix), use --load python")
    scratch = a.scratch or tempfile.mkdtemp(prefix="geosmtp-ownbench-")
    os.makedirs(scratch, exist_ok=True)
    workers = [int(x) for x in a.workers.split(",")]
    # one server per `workers` value, all started at once; every cell runs on each in turn
    # (interleaved), so a drift of this shared machine hits them alike
    servers = ([GeoServer(a, scratch, workers[0])] if len(workers) == 1 else
               [GeoServer(a, os.path.join(scratch, f"workers{w}"), w) for w in workers])
    res = dict(kind="geosmtp-own-bench", started=time.strftime("%Y-%m-%dT%H:%M:%S"), load=load,
               reps=a.reps, target_secs=a.target_secs, cpus=os.cpu_count(),
               cmd=[srv.cmd for srv in servers], config=[open(srv.config).read() for srv in servers],
               cells=[], probes=[])
    for srv in servers:
        print(f"geosmtp (workers={srv.workers}) on 127.0.0.1:{srv.port}, scratch {srv.scratch}, "
              f"load generator {load}", flush=True)
    t_start = time.monotonic()
    stop_rcs = []
    try:
        for srv in servers:
            srv.start()
        for size in sizes:
            for conc in concs:
                sized = {}
                for srv in servers:
                    if time.monotonic() - t_start > a.budget:
                        raise TimeoutError("time budget exhausted")
                    probe = run_once(srv, a, load, size, conc, max(2 * conc, 60))
                    probe.update(probe=True, workers=srv.workers)
                    res["probes"].append(probe)
                    if not srv.alive():
                        raise RuntimeError("server died during the probe")
                    rate = probe["msgs_per_s_raw"] or 1
                    n = max(int(rate * a.target_secs), 3 * conc, 100)
                    sized[srv] = min(n, a.max_msgs if size < 10000 else a.max_msgs // 4)
                    if not probe["ok"]:
                        print(f"  probe {fmt_size(size)} c={conc} workers={srv.workers} FAILED: rc={probe['rc']} "
                              f"accepted={probe['accepted']}/{probe['n']} {probe['load_errors'][:200]}", flush=True)
                for rep in range(a.reps):
                    for srv in servers:
                        if time.monotonic() - t_start > a.budget:
                            raise TimeoutError("time budget exhausted")
                        n = sized[srv]
                        r = run_once(srv, a, load, size, conc, n)
                        r.update(rep=rep, workers=srv.workers)
                        res["cells"].append(r)
                        print(f"{fmt_size(size):>6} c={conc:>3} w={srv.workers} rep={rep} n={n:>5} ok={r['ok']!s:5} "
                              f"{r['msgs_per_s_raw']:7.1f} msg/s cpu/1k={r['cpu_s_per_1000']:.2f}s "
                              f"(+drain {r['cpu_drained_s_per_1000']:.2f}s) "
                              f"rss={r['peak_rss_mb']:.0f}MB accepted={r['accepted']} settle={r['settle_s']}s "
                              f"log+={r['server_log_problems']} {r['load_errors'][:150]}", flush=True)
                        if not srv.alive():
                            raise RuntimeError("server died")
    except (TimeoutError, RuntimeError) as exc:
        print("STOPPED:", exc, flush=True)
        res["stopped"] = str(exc)
    finally:
        stop_rcs = [srv.stop() for srv in servers]
        res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        res["server_exit"] = stop_rcs
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        if a.keep:
            print(f"scratch dir kept: {scratch} (server logs: " + ", ".join(srv.logpath for srv in servers) + ")")
        elif res["cells"] and all(c["ok"] and not c["server_log_problems"] for c in res["cells"]):
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            # keep only the logs and configs when something went wrong
            for srv in servers:
                shutil.rmtree(srv.spool, ignore_errors=True)
            print("server logs kept: " + ", ".join(srv.logpath for srv in servers))
    for srv, stop_rc in zip(servers, stop_rcs):
        if stop_rc not in (0, None):
            print(f"note: geosmtp (workers={srv.workers}) exited with status {stop_rc} on SIGTERM")
    print()
    print(report(res))
    return 0 if res["cells"] and all(c["ok"] for c in res["cells"]) else 1


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        sys.exit(loadgen_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        for p in sys.argv[2:]:
            with open(p) as f:
                print(report(json.load(f)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Also: `bench.py report FILE.json...` prints the table again.")
    ap.add_argument("--sizes", default="1024,102400", help="message sizes in octets (default 1024,102400)")
    ap.add_argument("--conc", default="1,20,200", help="concurrent sessions (default 1,20,200)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per cell (default 3)")
    ap.add_argument("--target-secs", type=float, default=3.0, help="aim for this many seconds per run (default 3)")
    ap.add_argument("--max-msgs", type=int, default=20000, help="cap on N per run (100KB cells: cap/4)")
    ap.add_argument("--json", help="write raw per-run data here")
    ap.add_argument("--load", choices=("auto", "smtp-source", "python"), default="auto",
                    help="load generator (auto: smtp-source if installed)")
    ap.add_argument("--port", type=int, default=0, help="listener port (default: a free one)")
    ap.add_argument("--geosmtp", help="geosmtp executable (default: <repo>/.venv/bin/geosmtp)")
    ap.add_argument("--workers", default="1",
                    help="[server] workers; a list (1,2) runs one server per value, interleaved cell by cell")
    ap.add_argument("--queue-concurrency", type=int, default=20, help="[queue] concurrency (default 20)")
    ap.add_argument("--spool-flush", choices=("syncfs", "fsync"),
                    help="[server] spool_flush (default: not set, i.e. the server's default, syncfs)")
    ap.add_argument("--log-level", default="WARNING", help="[log] level (default WARNING)")
    ap.add_argument("--hold", action="store_true",
                    help="accept into queue/hold/ (like the postfix-hold anchor): no delivery attempt")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="max seconds after a run for the spool count to reach N and the queue to drain")
    ap.add_argument("--clear-msg", action="store_true",
                    help="also delete msg/ files between runs (default: like the shared harness, only "
                         "envelopes are deleted; the orphaned msg/ files go with the scratch dir)")
    ap.add_argument("--timeout", type=float, default=120.0, help="kill the load generator after this")
    ap.add_argument("--budget", type=float, default=290.0, help="start no new run after this many seconds")
    ap.add_argument("--scratch", help="scratch dir (default: a new /tmp/geosmtp-ownbench-*)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (spool, config, log)")
    a = ap.parse_args()
    sys.exit(cmd_run(a))


if __name__ == "__main__":
    main()
