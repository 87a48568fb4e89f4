#!/usr/bin/env python3
"""CPU per accepted message of geosmtp servers side by side: configs or versions A/B.

Each variant is a config file (bench/geosmtp-bench.toml, bench/geosmtp-bench-checks.toml,
or one of your own), optionally with environment settings for its server, among them
VENV=<a virtualenv with another geosmtp installed> to compare two versions of the code.
Runs alternate between the variants, each on a server started for it in a directory of its
own with an empty spool; smtp-source (Postfix's, Debian's postfix package) sends a warm-up
of 300 messages and then --n messages of --size octets from --conc clients, one per
connection; the figure is the CPU (user + system) of the server's process tree over those
--n messages, divided by --n. No spool is deleted before the last run has ended: on ext4 a
file created among many freshly freed inodes costs up to 40 times more (bench/README.md,
"Deleting before measuring"), which would hand the next variant a slower disk.

A config that names DNS_PORT gets the port of bench/checks_dns.py (started here), as
geosmtp-checks-harness.sh does. `--tail S` waits S seconds after the last message before
reading the CPU (for a config that delivers: the deliveries' CPU counts too). `--perf`
samples every CPU during each measured run (perf, as root) and prints each process's
CPU-ms a message and, for the server, the system calls and libraries it went to
(bench/perf_split.py); the sampling costs some CPU of its own, so the figures of a run
with --perf are not those to compare.

    .venv/bin/python bench/cpu_per_message.py plain=bench/geosmtp-bench.toml \\
        checks=bench/geosmtp-bench-checks.toml
    .venv/bin/python bench/cpu_per_message.py --reps 4 \\
        before=bench/geosmtp-bench-checks.toml:VENV=/tmp/oldvenv after=bench/geosmtp-bench-checks.toml
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib

import perf_split

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMTP_SOURCE = "/usr/sbin/smtp-source"
WARM_UP = 300


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise SystemExit(f"variant {text!r}: name=config.toml[:KEY=VALUE...]")
    path, *settings = rest.split(":")
    env = dict(s.split("=", 1) for s in settings)
    return name, path, env


def listener_port(config_text: str) -> int:
    listeners = tomllib.loads(config_text.replace("DNS_PORT", "53")).get("listener", [])
    if not listeners:
        raise SystemExit("the config has no [[listener]]")
    return int(listeners[0]["address"].rsplit(":", 1)[1])


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of pid and its children (the workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ticks = 0
    for p in [pid, *map(int, children)]:
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(512)  # the greeting: the server takes connections
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no server on port {port} after {timeout:g}s")


def send(port: int, n: int, size: int, conc: int) -> None:
    subprocess.run([SMTP_SOURCE, "-s", str(conc), "-m", str(n), "-l", str(size), "-f", "from@bench.test",
                    "-t", "rcpt@bench.test", f"127.0.0.1:{port}"], check=True, timeout=600)


def one_run(workdir: str, config_text: str, env: dict[str, str], a) -> tuple[float, float]:
    """(msgs/s, CPU-ms per message) of one server on one config."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "geosmtp.toml"), "w") as fh:
        fh.write(config_text)
    venv = env.get("VENV", os.path.join(ROOT, ".venv"))
    port = listener_port(config_text)
    try:  # a server left running on the port would take the messages and spoil the figures
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        pass
    else:
        raise SystemExit(f"port {port} is taken: stop what listens there first")
    with open(os.path.join(workdir, "server.log"), "w") as log:
        server = subprocess.Popen([os.path.join(venv, "bin", "geosmtp"), "start", "-c", "geosmtp.toml"],
                                  cwd=workdir, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        send(port, WARM_UP, a.size, a.conc)
        profile = profiling = None
        if a.perf:
            profile = os.path.join(workdir, "perf.data")
            profiling = perf_split.record(profile)
            time.sleep(0.5)  # perf has opened its events
        cpu, started = tree_cpu(server.pid), time.monotonic()
        send(port, a.n, a.size, a.conc)
        elapsed = time.monotonic() - started
        time.sleep(a.tail)
        if profiling is not None:
            perf_split.stop(profiling)
            workers = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
            roles = {server.pid: "geosmtp (master)", **{int(p): "geosmtp workers" for p in workers}}
            print(perf_split.report(profile, roles, a.n), flush=True)
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}): see {workdir}/server.log")
        return a.n / elapsed, (tree_cpu(server.pid) - cpu) / a.n * 1000
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="name=config.toml[:KEY=VALUE...]")
    ap.add_argument("-n", type=int, default=4000, help="messages measured per run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--conc", type=int, default=20)
    ap.add_argument("--tail", type=float, default=0.0, help="seconds to wait before the last CPU reading")
    ap.add_argument("--perf", action="store_true",
                    help="sample every CPU with perf during each run and print where the CPU went")
    ap.add_argument("--scratch", default=None, help="where the servers' directories go (default: a temp dir)")
    a = ap.parse_args()
    if not os.path.exists(SMTP_SOURCE):
        raise SystemExit(f"{SMTP_SOURCE} is missing: apt-get install postfix")
    variants = [parse_variant(v) for v in a.variants]
    texts = {name: open(path).read() for name, path, _ in variants}
    scratch = a.scratch or tempfile.mkdtemp(prefix="geosmtp-cpu-")
    dns = None
    if any("DNS_PORT" in t for t in texts.values()):
        dns = subprocess.Popen([os.path.join(ROOT, ".venv", "bin", "python"), os.path.join(HERE, "checks_dns.py")],
                               stdout=subprocess.PIPE, text=True)
        port = dns.stdout.readline().strip()
        texts = {name: t.replace("DNS_PORT", port) for name, t in texts.items()}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    try:
        for rep in range(a.reps):
            for name, _, env in variants:
                rate, cpu = one_run(os.path.join(scratch, f"{name}-{rep}"), texts[name], env, a)
                results[name].append((rate, cpu))
                print(f"{name:>12} run {rep + 1}: {rate:7.0f} msgs/s  {cpu:.3f} CPU-ms/message", flush=True)
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait()
        if a.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)  # after the last run: nothing measured follows
    print(f"\n{a.size} B, c={a.conc}, {a.n} messages a run, median of {a.reps} (server process tree)\n")
    print("| variant | msgs/s | CPU-ms / message |")
    print("|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(r for r, _ in runs):.0f} | {statistics.median(c for _, c in runs):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
