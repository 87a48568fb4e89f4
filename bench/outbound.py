#!/usr/bin/env python3
"""Outbound throughput of geosmtp: queued messages delivered per second to a local MX.

For each (size, DKIM) cell:
  1. a scratch dir with a config: one listener with hold = true, the relay's DNS pointed at
     a fake DNS server in this process (MX bench.test → sink.bench.test → 127.0.0.20) and
     the relay port at the sink; with DKIM, an RSA-2048 or Ed25519 key for bench.test (the
     From: domain of every message), made with openssl;
  2. the sink: Postfix's smtp-sink when installed (C, PIPELINING, answers 250 to all),
     otherwise a small gevent sink in a separate process (bench/sink.py);
  3. N messages are submitted (bench.py's load generator, 20 connections) and land in
     queue/hold/; the server is stopped and everything is released (untimed);
  4. the server starts and runs until the spool's queue is empty; every entry must have
     left by delivery (nothing in deferred/ or corrupt/, and the server log shows N
     "status=sent" lines). msgs/s is taken between the first and the last delivery (the
     log's millisecond stamps), so the server's start-up is outside it; CPU is the
     server's (utime+stime, /proc) less what a start-up on an empty spool costs.
With DKIM, two figures more: what signing adds to a message's CPU (the median of the runs'
CPU figures less the median without DKIM, same size), and what geosmtp.dkim's sign() costs alone,
in this process, on the message as the spool holds it, with the RSA (or Ed25519) operation
alone beside it: where a signature's CPU goes.
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
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import bench as inbound  # noqa: E402  (the /proc readers and the load generator)
from geosmtp.dkim import Signer, load_key  # noqa: E402
from tests.support.fakedns import FakeDNS  # noqa: E402

SINK_ADDRESS = "127.0.0.20"
# other benchmarks on this machine pick their ports from the same few: a banner with this
# name is ours, and the load goes to no one else's server
HOSTNAME = f"geosmtp-bench-{os.getpid()}.test"
SMTP_SINK = shutil.which("smtp-sink", path=os.environ["PATH"] + ":/usr/sbin")

CONFIG = """\
[server]
hostname = "{hostname}"
spool_dir = "{spool}"

[[listener]]
name = "smtp"
address = "127.0.0.1:{port}"
hold = true

[limits]
max_connections = 20000
max_connections_per_ip = 20000

[local]
domains = []
maildir_root = "{scratch}/mail"

[relay]
trusted_networks = ["127.0.0.0/8"]
dns_servers = ["{dns}"]
port = {sink_port}

[queue]
concurrency = {concurrency}
scan_interval = "1s"

[log]
level = "INFO"
file = "{scratch}/geosmtp.log"
{dkim}"""

DKIM = """
[[dkim.key]]
domain = "bench.test"
selector = "bench"
key_file = "{key}"
algorithm = "{algorithm}"
"""


def start_sink(port: int) -> subprocess.Popen:
    if SMTP_SINK:
        cmd = [SMTP_SINK, "-u", "nobody", f"{SINK_ADDRESS}:{port}", "1024"]
    else:
        cmd = [sys.executable, os.path.join(HERE, "sink.py"), SINK_ADDRESS, str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with inbound.socket.create_connection((SINK_ADDRESS, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("the sink did not start")


def queue_count(spool: str) -> dict[str, int]:
    return inbound.state_counts(os.path.join(spool, "queue"))


class Cell:
    startup_cpu = 0.0  # CPU seconds a start-up costs, taken off each run's figure

    def __init__(self, a, scratch: str, dns: FakeDNS, sink_port: int, dkim: str):
        self.scratch = scratch
        self.spool = os.path.join(scratch, "spool")
        self.port = inbound.free_port()
        self.config = os.path.join(scratch, "geosmtp.toml")
        dkim_text = ""
        if dkim != "off":
            key = os.path.join(scratch, "bench.key")
            make_key(key, dkim)
            dkim_text = DKIM.format(key=key, algorithm=f"{dkim}-sha256")
        with open(self.config, "w") as fh:
            fh.write(CONFIG.format(hostname=HOSTNAME, spool=self.spool, port=self.port, scratch=scratch,
                                   dns=dns.address, sink_port=sink_port, concurrency=a.concurrency,
                                   dkim=dkim_text))
        self.geosmtp = inbound.geosmtp_command(a)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.geosmtp, "start", "-c", self.config], cwd=self.scratch,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=inbound.raise_nofile,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def fill(self, size: int, n: int) -> None:
        self.start()
        if not inbound.wait_banner(self.port, self.proc):
            sys.exit(f"geosmtp did not start; see {self.scratch}/geosmtp.log")
        with inbound.socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if HOSTNAME.encode() not in s.recv(512) or self.proc.poll() is not None:
                sys.exit(f"another server answers on port {self.port}; run again")
            s.sendall(b"QUIT\r\n")
        load = subprocess.run(inbound.python_loadgen_cmd(self.port, size, 20, n, 120),
                              capture_output=True, text=True, timeout=600)
        if load.returncode != 0:
            sys.exit(f"load generator failed: {load.stdout} {load.stderr}")
        self.stop()
        held = queue_count(self.spool)["hold"]
        if held != n:
            sys.exit(f"expected {n} held messages, found {held}")
        subprocess.run([os.path.join(os.path.dirname(self.geosmtp), "geosmtp-queue"), "-c", self.config,
                        "release", "--all"], check=True, capture_output=True, timeout=600)

    def drain(self, n: int, timeout: float) -> dict:
        log = os.path.join(self.scratch, "geosmtp.log")
        log_start = os.path.getsize(log)
        t0 = time.monotonic()
        self.start()
        pid = self.proc.pid
        peak = 0
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            counts = queue_count(self.spool)
            if not any(counts.values()):
                break
            peak = max(peak, inbound.rss_bytes(inbound.proc_tree(pid)))
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = inbound.cpu_seconds(inbound.proc_tree(pid))
        counts = queue_count(self.spool)
        self.stop()
        with open(log, "rb") as fh:
            fh.seek(log_start)
            stamps = [line[:23] for line in fh.read().splitlines() if b"status=sent" in line]
        sent = len(stamps)
        ok = sent == n and not any(counts.values())
        # the rate between the first and the last delivery, from the log's millisecond
        # stamps: the server's start-up is outside it
        first, last = (datetime.strptime(s.decode(), "%Y-%m-%d %H:%M:%S.%f") for s in (stamps[0], stamps[-1]))
        span = max((last - first).total_seconds(), 1e-3)
        return dict(n=n, secs=elapsed, span=span, msgs_per_s=(n - 1) / span,
                    cpu_per_1000=max(cpu - self.startup_cpu, 0) / n * 1000,
                    peak_rss_mb=peak / 2**20, sent=sent, left=counts, ok=ok)


def make_key(path: str, mode: str) -> None:
    algorithm = ["-algorithm", "ed25519"] if mode == "ed25519" else \
        ["-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048"]
    subprocess.run(["openssl", "genpkey", *algorithm, "-out", path], check=True, capture_output=True)


def sign_cost(mode: str, size: int) -> dict:
    """CPU ms of one Signer.sign() on a message of `size` as the spool holds it (a Received
    field in front, no final dot), and of the private-key operation alone."""
    scratch = tempfile.mkdtemp(prefix="geosmtp-signcost-")
    try:
        path = os.path.join(scratch, "key.pem")
        make_key(path, mode)
        key = load_key("bench.test", "bench", path, f"{mode}-sha256")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    signer = Signer([key])
    message = (b"Received: from localhost (localhost [127.0.0.1])\r\n\tby geosmtp-bench.test with ESMTP id "
               b"0123456789ABCDEF\r\n\tfor <rcpt@bench.test>; Wed, 2 Dec 2026 05:00:00 +0000\r\n"
               + inbound.build_message(size)[:-3])
    digest = bytes(32)
    if mode == "rsa":
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, utils
        private_op = lambda: key.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))  # noqa: E731
    else:
        private_op = lambda: key.private.sign(digest)  # noqa: E731
    out = {}
    for name, fn in (("sign_ms", lambda: signer.sign(message, "sender@bench.test")), ("private_key_ms", private_op)):
        fn()
        n = max(50, 2000 * 1024 // max(size, 1024))
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        out[name] = (time.thread_time() - t0) / n * 1000
    return out


def startup_cost(a, dns: FakeDNS, sink_port: int) -> tuple[float, float]:
    """(seconds, CPU seconds) from exec to the first 220 on an empty spool."""
    scratch = tempfile.mkdtemp(prefix="geosmtp-outbench-")
    try:
        cell = Cell(a, scratch, dns, sink_port, dkim="off")
        t0 = time.monotonic()
        cell.start()
        inbound.wait_banner(cell.port, cell.proc)
        secs = time.monotonic() - t0
        cpu = inbound.cpu_seconds(inbound.proc_tree(cell.proc.pid))
        cell.stop()
        return secs, cpu
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument("--dkim", default="off,rsa,ed25519",
                    help="signing modes: off, rsa (RSA-2048) and/or ed25519 (default all three)")
    ap.add_argument("-n", type=int, default=3000, help="messages per run at 1 KB (100 KB: n/3)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=20, help="[queue] concurrency")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--geosmtp", help="geosmtp executable (default: <repo>/.venv/bin/geosmtp)")
    ap.add_argument("--json", help="write the per-run figures here")
    a = ap.parse_args()
    sink_port = inbound.free_port()
    sink = start_sink(sink_port)
    results = []
    try:
        with FakeDNS() as dns:
            dns.mx("bench.test", [(10, "sink.bench.test")])
            dns.a("sink.bench.test", SINK_ADDRESS)
            startup, Cell.startup_cpu = startup_cost(a, dns, sink_port)
            for size in (int(s) for s in a.sizes.split(",")):
                n = a.n if size <= 10240 else max(a.n // 3, 100)
                for mode in a.dkim.split(","):
                    runs = []
                    for _ in range(a.reps):
                        scratch = tempfile.mkdtemp(prefix="geosmtp-outbench-")
                        try:
                            cell = Cell(a, scratch, dns, sink_port, dkim=mode)
                            cell.fill(size, n)
                            run = cell.drain(n, a.timeout)
                        finally:
                            shutil.rmtree(scratch, ignore_errors=True)
                        runs.append(run)
                        print(f"  {size} B dkim={mode}: {run['msgs_per_s']:.0f} msg/s "
                              f"{run['cpu_per_1000']:.2f} CPU-s/1000 ok={run['ok']}", file=sys.stderr, flush=True)
                    cell = dict(size=size, dkim=mode, runs=runs)
                    if mode != "off":
                        cell.update(sign_cost(mode, size))
                    results.append(cell)
    finally:
        os.killpg(sink.pid, signal.SIGTERM)
        sink.wait(10)
    print(f"sink: {'smtp-sink (Postfix)' if SMTP_SINK else 'bench/sink.py'}; msgs/s between the first and "
          f"the last delivery (log stamps); CPU of the server less its start-up ({Cell.startup_cpu:.2f} "
          f"CPU-s, {startup:.2f} s); median of {a.reps}\n")
    print("| size | DKIM | msgs | msgs/s | CPU-s / 1000 | peak RSS MB | all delivered |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        runs = sorted(r["runs"], key=lambda x: x["msgs_per_s"])
        med = runs[len(runs) // 2]
        print(f"| {inbound.fmt_size(r['size'])} | {r['dkim']} | {med['n']} | {med['msgs_per_s']:.0f} | "
              f"{med['cpu_per_1000']:.2f} | {med['peak_rss_mb']:.0f} | {all(x['ok'] for x in runs)} |")
    medians = {(r["size"], r["dkim"]): statistics.median(x["cpu_per_1000"] for x in r["runs"]) for r in results}
    signed = [r for r in results if r["dkim"] != "off"]
    if signed:
        print("\n| size | DKIM | CPU ms a message over off | sign() alone, ms | of which the key operation, ms |")
        print("|---|---|---|---|---|")
    for r in signed:
        off = medians.get((r["size"], "off"))
        over = f"{medians[(r['size'], r['dkim'])] - off:.2f}" if off is not None else "-"
        print(f"| {inbound.fmt_size(r['size'])} | {r['dkim']} | {over} | {r['sign_ms']:.3f} | {r['private_key_ms']:.3f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(startup=startup, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
