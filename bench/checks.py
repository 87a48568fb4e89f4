#!/usr/bin/env python3
"""What inbound checks and filters cost: acceptance with checks on, beside the same server
with none, in one invocation (issue 14's and issue 15's benchmark; Linux).

One geosmtp server without checks and one per `--checks` variant run side by side from
configs written here (one listener each, MX mode, `hold = true` so accepted mail waits in
queue/hold/ as postfix-hold does, nothing trusted so every check runs, one local mailbox),
all asking a fake authoritative DNS server on loopback (tests/support/fakedns.py) through
their own caching resolver, as a real resolver would: the first message of a run pays the
queries, the rest hit the cache until the TTLs (300 s here) run out. The DNS data: SPF
`v=spf1 ip4:127.0.0.0/8 -all` for the sender's domain, its DKIM key (RSA 2048),
`v=DMARC1; p=reject`, and a DNSBL zone where 127.0.0.1 is not listed (NXDOMAIN, cached by its
SOA minimum). Filters: `rspamd` starts Debian's rspamd (a normal worker, its DNS to the same
fake) and `milter` a pass-through milter written with Debian's python3-milter. The message
(about each --sizes octets) is signed once by dkimpy; every message of a run is the same
signed message, one per connection (EHLO, MAIL, RCPT, DATA, QUIT) from bench.py's Python
load generator.

Runs alternate between the servers so drift on a shared VM hits all; each run counts only
messages found in queue/hold/ (exactly N new ones, and N x 250 from the load generator, or
the run is marked FAIL). Prints msgs/s per run, the medians and the ratio to no checks.

    .venv/bin/python bench/checks.py                                   # SPF+DNSBL+DKIM+DMARC, 1 KB, c=20
    .venv/bin/python bench/checks.py --checks spf,dkim --reps 5        # each alone
    .venv/bin/python bench/checks.py --checks rspamd,milter --sizes 1024,102400
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import bench  # noqa: E402  (bench/bench.py: load generator, /proc readers, spool counts)
from tests.support.fakedns import FakeDNS  # noqa: E402

SENDER_DOMAIN = "sender.test"
SENDER = f"bench@{SENDER_DOMAIN}"
RCPT = "rcpt@bench.test"
SELECTOR = "bench"
ZONE = "bl.bench.test"

CHECKS = {
    "spf": '[[check]]\ntype = "spf"\n',
    "dnsbl": f'[[check]]\ntype = "dnsbl"\nzones = [{{ zone = "{ZONE}", answers = ["127.0.0.2-127.0.0.11"], '
             'action = "reject" }]\n',
    "dkim": '[[check]]\ntype = "dkim"\n',
    "dmarc": '[[check]]\ntype = "dmarc"\nenforce = true\n',
    "rspamd": '[[check]]\ntype = "rspamd"\nurl = "RSPAMD_URL"\ntimeout = "60s"\nread_timeout = "50s"\n',
    "milter": '[[check]]\ntype = "milter"\naddress = "inet:127.0.0.1:MILTER_PORT"\ntimeout = "60s"\n',
}

CONFIG = """\
# written by bench/checks.py
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
{limits}

[local]
domains = ["bench.test"]
users = ["{rcpt}"]
maildir_root = "{mail}"

[relay]
dns_servers = ["127.0.0.1:{dns_port}"]
dns_timeout = "2s"

[log]
level = "WARNING"
{checks}"""


def dkim_key() -> tuple[bytes, str]:
    """A fresh RSA 2048 key: (PEM private key, the p= of its DNS record)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


def signed_message(size: int, pem: bytes) -> bytes:
    import dkim

    head = (f"From: Bench <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: geosmtp checks bench\r\n"
            f"Date: Wed, 02 Dec 2026 00:00:00 +0000\r\nMessage-ID: <checks-bench@{SENDER_DOMAIN}>\r\n\r\n").encode()
    body = bytearray(head)
    while len(body) + 78 <= size - 300:  # room for the signature
        body += b"x" * 76 + b"\r\n"
    message = bytes(body)
    signature = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), pem,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + message


class Server:
    def __init__(self, name: str, scratch: str, dns_port: int, checks: str, workers: int, limits: str = ""):
        self.name = name
        root = os.path.join(scratch, name)
        os.makedirs(root)
        self.spool = os.path.join(root, "spool")
        self.hold = os.path.join(self.spool, "queue", "hold")
        self.port = bench.free_port()
        self.config = os.path.join(root, "geosmtp.toml")
        with open(self.config, "w") as fh:
            fh.write(CONFIG.format(spool=self.spool, workers=workers, port=self.port, rcpt=RCPT,
                                   mail=os.path.join(root, "mail"), dns_port=dns_port, checks=checks,
                                   limits=limits))
        self.log = open(os.path.join(root, "geosmtp.log"), "ab")
        exe = os.path.join(REPO, ".venv", "bin", "geosmtp")
        self.proc = subprocess.Popen([exe, "start", "-c", self.config], cwd=root, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=self.log, preexec_fn=bench.raise_nofile,
                                     start_new_session=True)
        if not bench.wait_banner(self.port, self.proc):
            self.stop()
            with open(os.path.join(root, "geosmtp.log"), errors="replace") as fh:
                sys.exit(f"{name}: geosmtp did not answer on 127.0.0.1:{self.port}:\n{fh.read()[-3000:]}")

    def held(self) -> set[str]:
        try:
            return set(os.listdir(self.hold))
        except FileNotFoundError:
            return set()

    def clear(self) -> None:
        for d in (self.hold, os.path.join(self.spool, "msg")):
            for name in os.listdir(d) if os.path.isdir(d) else ():
                try:
                    os.unlink(os.path.join(d, name))
                except FileNotFoundError:
                    pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_once(srv: Server, message_file: str, size: int, conc: int, n: int, timeout: float, sources: int = 0) -> dict:
    srv.clear()
    before = srv.held()
    tree = bench.proc_tree(srv.proc.pid)
    cpu0 = bench.cpu_seconds(tree)
    cmd = bench.python_loadgen_cmd(srv.port, size, conc, n, timeout, message=message_file, sender=SENDER,
                                   sources=sources)
    started = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, timeout=timeout + 30)
    wall = time.monotonic() - started
    deadline = time.monotonic() + 10
    while len(srv.held() - before) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    accepted = len(srv.held() - before)
    cpu = bench.cpu_seconds(bench.proc_tree(srv.proc.pid)) - cpu0
    ok = p.returncode == 0 and accepted == n
    errors = p.stdout.decode(errors="replace").strip().splitlines()[-1:] if not ok else []
    return dict(server=srv.name, n=n, accepted=accepted, ok=ok, wall_s=round(wall, 3),
                msgs_per_s=round(accepted / wall, 1) if ok else 0.0, cpu_s_per_1000=round(cpu / n * 1000, 2),
                errors=errors)


def start_filters(wanted: set[str], scratch: str, dns) -> tuple[dict[str, str], list]:
    """The filter servers the variants name: a real rspamd (tests/support/rspamd.py: a normal
    worker, its DNS to the fake) and a pass-through milter (python3-milter, Debian's, run by
    /usr/bin/python3: tests/support/scripted_milter.py with no scripted answers). Returns
    the values for the check tables and what to stop."""
    values, running = {}, []
    if "rspamd" in wanted:
        from pathlib import Path

        from tests.support.rspamd import Rspamd
        rspamd = Rspamd(Path(scratch) / "rspamd-server", dns.address).start()
        running.append(rspamd)
        values["RSPAMD_URL"] = rspamd.url
    if "milter" in wanted:
        port = bench.free_port()
        script = os.path.join(scratch, "milter.json")
        with open(script, "w") as fh:
            json.dump({"port": port, "reply": {}}, fh)
        proc = subprocess.Popen(["/usr/bin/python3", "-I", os.path.join(REPO, "tests", "support", "scripted_milter.py"),
                                 script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if proc.stdout.readline().strip() != b"ready":
            sys.exit("the pass-through milter did not start (Debian's python3-milter is needed)")
        time.sleep(0.5)  # "ready" comes just before libmilter listens
        running.append(proc)
        values["MILTER_PORT"] = str(port)
    return values, running


def stop_filter(item) -> None:
    if isinstance(item, subprocess.Popen):
        item.terminate()
        try:
            item.wait(10)
        except subprocess.TimeoutExpired:
            item.kill()
    else:
        item.stop()


def variant_config(name: str, values: dict[str, str]) -> str:
    text = "\n".join(CHECKS[c] for c in name.split("+"))
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024", help="message sizes in octets (default 1024)")
    ap.add_argument("--conc", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per server and size (default 3)")
    ap.add_argument("-n", type=int, default=3000, help="messages per run (default 3000)")
    ap.add_argument("--workers", type=int, default=1, help="[server] workers of every server (default 1)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--checks", default="spf+dnsbl+dkim+dmarc",
                    help="the checked servers, one per comma, each its checks joined by + in order "
                         f"(default spf+dnsbl+dkim+dmarc; known: {', '.join(CHECKS)})")
    ap.add_argument("--json", help="write the runs here")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    variants = a.checks.split(",")
    unknown = {c for v in variants for c in v.split("+")} - set(CHECKS)
    if unknown:
        sys.exit(f"unknown check(s): {', '.join(sorted(unknown))}")

    scratch = tempfile.mkdtemp(prefix="geosmtp-checks-bench-")
    dns = FakeDNS().start()
    servers: list[Server] = []
    filters: list = []
    try:
        pem, public = dkim_key()
        dns.txt(SENDER_DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all", ttl=300)
        dns.txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", f"v=DKIM1; k=rsa; p={public}", ttl=300)
        dns.txt(f"_dmarc.{SENDER_DOMAIN}", "v=DMARC1; p=reject", ttl=300)
        dns.negative_ttl = 300  # 1.0.0.127.bl.bench.test: NXDOMAIN, cached as long
        values, filters = start_filters({c for v in variants for c in v.split("+")}, scratch, dns)
        servers = [Server("plain", scratch, dns.port, "", a.workers)]
        servers += [Server(v, scratch, dns.port, variant_config(v, values), a.workers) for v in variants]
        runs = []
        for size in sizes:
            message_file = os.path.join(scratch, f"message-{size}.eml")
            with open(message_file, "wb") as fh:
                fh.write(signed_message(size, pem))
            # one message each, untimed: every server up and the checked ones' verdicts seen
            for srv in servers:
                warm = run_once(srv, message_file, size, 1, 1, a.timeout)
                if not warm["ok"]:
                    sys.exit(f"{srv.name}: the warm-up message was not accepted: {warm['errors']}")
            n = a.n if size <= 16384 else max(200, a.n // 4)
            for rep in range(a.reps):
                for srv in servers:
                    r = run_once(srv, message_file, size, a.conc, n, a.timeout)
                    r["size"] = size
                    runs.append(r)
                    print(f"{size:>7} B {srv.name:24} run {rep + 1}: {r['msgs_per_s']:8.1f} msgs/s  "
                          f"{r['cpu_s_per_1000']:6.2f} CPU-s/1000"
                          f"{'' if r['ok'] else '  FAIL ' + str(r['errors'])}", flush=True)
        print()
        print(f"c={a.conc}, {a.workers} worker(s) each, median of {a.reps} runs (msgs/s, server CPU-s per 1000)")
        print()
        print("| checks | " + " | ".join(f"{size // 1024} KB" for size in sizes) + " | CPU-s / 1000 | vs none |")
        print("|---|" + "---|" * (len(sizes) + 2))
        medians = {}
        for srv in servers:
            cells, cpus, ratios = [], [], []
            for size in sizes:
                mine = [r for r in runs if r["server"] == srv.name and r["size"] == size]
                plain = [r for r in runs if r["server"] == "plain" and r["size"] == size]
                m = statistics.median(r["msgs_per_s"] for r in mine)
                p = statistics.median(r["msgs_per_s"] for r in plain)
                medians[f"{srv.name} {size}"] = m
                cells.append(f"{m:.0f}")
                cpus.append(f"{statistics.median(r['cpu_s_per_1000'] for r in mine):.2f}")
                ratios.append(f"{m / p:.2f}" if p else "-")
            label = "none" if srv.name == "plain" else " + ".join(c.upper() for c in srv.name.split("+"))
            print(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(cpus)} | {' / '.join(ratios)} |")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(dict(args=vars(a), runs=runs, median=medians), fh, indent=1)
        return 0 if all(r["ok"] for r in runs) else 1
    finally:
        for srv in servers:
            srv.stop()
        for item in filters:
            stop_filter(item)
        dns.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
