#!/usr/bin/env python3
"""What shared limits cost: acceptance with the limits counted in Redis against the same
server counting in its own memory, in one invocation (issue 17's benchmark; Linux).

Two geosmtp servers from bench/checks.py's config (one MX listener, `hold = true`, one
local mailbox, no checks), both with a per-IP limit (`messages_per_hour_per_ip`, high
enough never to refuse) and the per-IP connection limit: "memory" counts in the process,
"redis" has a [redis] section (refresh as given, 0.5 s by default), so every connection is
entered and left in Redis and every message is counted at MAIL and added after its 250
there, one message per connection: a client new to the process's view costs one waited
round trip (its entering, which reads its message count too), a known one none, and the
writes go out in 5 ms batches. All connections come from 127.0.0.1 (one hot client) unless
--sources N spreads them over N addresses (127.1.0.0/16, in turn: with N >= -n every
connection is a new client). Redis is a real redis-server started here on loopback
(tests/support/redis.py). The load is bench.py's Python load generator, 1 KB messages at
c=20 by default; runs alternate between the two servers so drift on a shared machine hits
both, and a run counts only messages found in queue/hold/.

Prints each run, the medians, the throughput ratio (target >= 0.9) and the time Redis adds
per message: in latency (c / rate, redis minus memory; target <= 0.3 ms), in geosmtp's CPU
and in redis-server's CPU (both per message). The machine's load average before and after
is printed: the machine is shared, say what else ran.

    .venv/bin/python bench/redis_limits.py                 # 1 KB, c=20, 3 runs of 3000 each
    .venv/bin/python bench/redis_limits.py --reps 5 -n 5000 --workers 2
    .venv/bin/python bench/redis_limits.py --sources 3000       # every client new: the cold path
    .venv/bin/python bench/redis_limits.py --refresh 0          # every check waits (exact)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

import bench  # noqa: E402  (bench/bench.py: /proc readers)
import checks  # noqa: E402  (bench/checks.py: the server, one timed run)
from tests.support.fakedns import FakeDNS  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402

import redis as redis_py  # noqa: E402

LIMITS = "messages_per_hour_per_ip = 1000000000\n"


def plain_message(size: int) -> bytes:
    head = (f"From: <{checks.SENDER}>\r\nTo: <{checks.RCPT}>\r\nSubject: geosmtp redis limits bench\r\n"
            "Message-ID: <redis-bench@sender.test>\r\n\r\n").encode()
    body = bytearray(head)
    while len(body) + 78 <= size:
        body += b"x" * 76 + b"\r\n"
    return bytes(body)


def commands_sent(client) -> int:
    """The scripts Redis has run (EVALSHA and EVAL: every command of the limits is one; the
    renewals' SET/HSET are not counted)."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--conc", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3, help="timed runs per server (default 3)")
    ap.add_argument("-n", type=int, default=3000, help="messages per run (default 3000)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--sources", type=int, default=0, help="client addresses (default: 127.0.0.1 alone)")
    ap.add_argument("--refresh", default="0.5s", help="[redis] refresh (default 0.5s)")
    ap.add_argument("--json", help="write the runs here")
    a = ap.parse_args()

    scratch = tempfile.mkdtemp(prefix="geosmtp-redis-bench-")
    load_before = os.getloadavg()
    dns = FakeDNS().start()
    redis = RedisServer(Path(scratch) / "redis-server").start()
    servers: list[checks.Server] = []
    try:
        client = redis_py.Redis.from_url(redis.url)
        section = f'[redis]\nurl = "{redis.url}"\nrefresh = "{a.refresh}"\n'
        servers = [checks.Server("memory", scratch, dns.port, "", a.workers, LIMITS),
                   checks.Server("redis", scratch, dns.port, section, a.workers, LIMITS)]
        message_file = os.path.join(scratch, "message.eml")
        with open(message_file, "wb") as fh:
            fh.write(plain_message(a.size))
        for srv in servers:
            warm = checks.run_once(srv, message_file, a.size, 1, 1, a.timeout, a.sources)
            if not warm["ok"]:
                sys.exit(f"{srv.name}: the warm-up message was not accepted: {warm['errors']}")
        runs = []
        for rep in range(a.reps):
            for srv in servers:
                redis_cpu, sent = bench.cpu_seconds([redis.proc.pid]), commands_sent(client)
                r = checks.run_once(srv, message_file, a.size, a.conc, a.n, a.timeout, a.sources)
                r["redis_cpu_ms_per_msg"] = round((bench.cpu_seconds([redis.proc.pid]) - redis_cpu) / a.n * 1000, 4)
                r["redis_commands_per_msg"] = round((commands_sent(client) - sent) / a.n, 3)
                runs.append(r)
                print(f"{srv.name:7} run {rep + 1}: {r['msgs_per_s']:8.1f} msgs/s  {r['cpu_s_per_1000']:6.2f} "
                      f"CPU-s/1000  redis {r['redis_cpu_ms_per_msg']:.3f} ms CPU/msg, "
                      f"{r['redis_commands_per_msg']:.3f} scripts/msg"
                      f"{'' if r['ok'] else '  FAIL ' + str(r['errors'])}", flush=True)
        load_after = os.getloadavg()
        if not all(r["ok"] for r in runs):
            print("some runs failed: no figures")
            return 1
        med = {name: {k: statistics.median(r[k] for r in runs if r["server"] == name)
                      for k in ("msgs_per_s", "cpu_s_per_1000", "redis_cpu_ms_per_msg", "redis_commands_per_msg")}
               for name in ("memory", "redis")}
        mem, red = med["memory"], med["redis"]
        ratio = red["msgs_per_s"] / mem["msgs_per_s"]
        latency = (a.conc / red["msgs_per_s"] - a.conc / mem["msgs_per_s"]) * 1000
        print()
        print(f"{a.size} B, c={a.conc}, workers={a.workers}, refresh={a.refresh}, "
              f"{a.sources or 1} client address(es), median of {a.reps} runs of {a.n}")
        print()
        print("| limits | msgs/s | geosmtp CPU ms/msg | redis-server CPU ms/msg |")
        print("|---|---|---|---|")
        for name in ("memory", "redis"):
            print(f"| {name} | {med[name]['msgs_per_s']:.0f} | {med[name]['cpu_s_per_1000']:.3f} | "
                  f"{med[name]['redis_cpu_ms_per_msg'] if name == 'redis' else 0:.3f} |")
        print()
        print(f"throughput ratio redis/memory: {ratio:.3f} (target >= 0.9)")
        print(f"added latency per message: {latency:.3f} ms (target <= 0.3)")
        pairs = [b["cpu_s_per_1000"] - m["cpu_s_per_1000"] for m, b in zip(runs[::2], runs[1::2])]
        print(f"added geosmtp CPU per message: {red['cpu_s_per_1000'] - mem['cpu_s_per_1000']:.3f} ms "
              f"(run by run: {', '.join(f'{d:+.2f}' for d in pairs)}); "
              f"redis-server CPU per message: {red['redis_cpu_ms_per_msg']:.3f} ms; "
              f"scripts sent per message: {red['redis_commands_per_msg']:.3f}")
        print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"runs": runs, "medians": med, "ratio": ratio, "added_latency_ms": latency,
                           "load": [load_before, load_after]}, fh, indent=1)
        return 0
    finally:
        for srv in servers:
            srv.stop()
        redis.stop()
        dns.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
