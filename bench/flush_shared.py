#!/usr/bin/env python3
"""What a busy neighbour on the spool's filesystem does to the group commit (stdlib only).

The spool's commit (geosmtp/groupcommit.py) flushes with syncfs(), which writes out every
dirty page of the whole filesystem, whoever dirtied it. On a filesystem of its own that is
only the spool's own files; shared with a busy writer (a database, a backup, a log
shipper), each flush also waits for the neighbour's data. This measures both, beside the
per-file alternative (fdatasync of each message file, then one of the directory), with the
spool's commit pattern: a batch of files written, flushed, hard-linked into a queue
directory, flushed again.

    python3 bench/flush_shared.py [--dir DIR] [--secs 3] [--batches 1,20] [--sizes 1024,102400]
        [--writer-mb-s 0,50,200] [--json out.json]

The neighbour writes a file in 1 MiB chunks at the given rate (0: no neighbour; "max": as
fast as it can), never fsyncing: the kernel's writeback, or our syncfs(), pushes it out.
Printed: messages/s and the 99th percentile of a batch's commit time, per cell.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Neighbour(threading.Thread):
    """Writes `rate` MiB/s (None: flat out) into a file of its own, recycled every 1 GiB."""

    def __init__(self, folder: str, rate: float | None):
        super().__init__(daemon=True)
        self.path = os.path.join(folder, "neighbour.dat")
        self.rate = rate
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        chunk = os.urandom(1 << 20)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        began = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.written and self.written % (1 << 30) == 0:
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, chunk)
                self.written += len(chunk)
                if self.rate:
                    ahead = self.written / (self.rate * (1 << 20)) - (time.monotonic() - began)
                    if ahead > 0:
                        self.stop.wait(ahead)
        finally:
            os.close(fd)


def commit_batches(base: str, mode: str, batch: int, size: int, secs: float) -> dict:
    msg, queue = os.path.join(base, "msg"), os.path.join(base, "queue")
    for d in (msg, queue):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    root = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    qfd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    mfd = os.open(msg, os.O_RDONLY | os.O_DIRECTORY)
    payload = os.urandom(size)
    times, done, n = [], time.monotonic() + secs, 0
    try:
        while time.monotonic() < done:
            t0 = time.perf_counter()
            names = []
            for _ in range(batch):
                n += 1
                path = os.path.join(msg, str(n))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, payload)
                if mode == "fsync":
                    os.fdatasync(fd)
                os.close(fd)
                names.append(str(n))
            if mode == "syncfs":
                syncfs(root)
            else:
                os.fdatasync(mfd)
            for name in names:
                os.link(os.path.join(msg, name), os.path.join(queue, name))
            if mode == "syncfs":
                syncfs(root)
            else:
                os.fdatasync(qfd)
            times.append(time.perf_counter() - t0)
    finally:
        for fd in (root, qfd, mfd):
            os.close(fd)
    wall = sum(times)
    times.sort()
    return {"msgs": n, "msgs_s": round(n / wall), "p50_ms": round(statistics.median(times) * 1e3, 2),
            "p99_ms": round(times[int(len(times) * 0.99)] * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/geosmtp-flush-bench")
    ap.add_argument("--secs", type=float, default=3)
    ap.add_argument("--batches", default="1,20")
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument("--writer-mb-s", default="0,50,max")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    results = []
    print(f"{'neighbour':>10} {'mode':>6} {'size':>7} {'batch':>5} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'neighbour MB/s':>14}")
    for rate_text in a.writer_mb_s.split(","):
        rate = None if rate_text == "max" else float(rate_text)
        for size in map(int, a.sizes.split(",")):
            for batch in map(int, a.batches.split(",")):
                for mode in ("syncfs", "fsync"):
                    neighbour = None
                    if rate != 0:
                        neighbour = Neighbour(a.dir, rate)
                        neighbour.start()
                        time.sleep(1)  # let it build up dirty pages
                    began, before = time.monotonic(), neighbour.written if neighbour else 0
                    cell = commit_batches(os.path.join(a.dir, "spool"), mode, batch, size, a.secs)
                    mbs = ((neighbour.written - before) / (time.monotonic() - began) / (1 << 20)) if neighbour else 0
                    if neighbour:
                        neighbour.stop.set()
                        neighbour.join()
                    cell.update(neighbour=rate_text, mode=mode, size=size, batch=batch, neighbour_mb_s=round(mbs))
                    results.append(cell)
                    print(f"{rate_text:>10} {mode:>6} {size:>7} {batch:>5} {cell['msgs_s']:>8} {cell['p50_ms']:>7} "
                          f"{cell['p99_ms']:>7} {cell['neighbour_mb_s']:>14}", flush=True)
    shutil.rmtree(a.dir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
