#!/usr/bin/env python3
"""The disk's write bandwidth on the spool's filesystem, measured the way the spool writes:
the ceiling the 100 KB cells of the shared harness are compared with (issue 16 §1).

Two figures, each the median of --reps runs of --secs seconds:
  sequential   one file written in 1 MiB blocks, fdatasync'ed at the end (what dd
               conv=fdatasync measures): the device's streaming bandwidth;
  batched      --batch files of --size octets written, then one syncfs() of the
               filesystem, again and again (what group commit does with a round of
               messages): files/s and MB/s, with the file creation and metadata costs a
               spool pays. This is the ceiling a 100 KB acceptance rate can reach.

    python3 bench/disk_bandwidth.py --dir /tmp/geosmtp-bench-disk
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import time

_libc = ctypes.CDLL(None, use_errno=True)


def sequential(directory: str, secs: float) -> float:
    block = os.urandom(1 << 20)
    path = os.path.join(directory, "stream")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written, started = 0, time.monotonic()
    while time.monotonic() - started < secs:
        os.write(fd, block)
        written += len(block)
    os.fdatasync(fd)
    elapsed = time.monotonic() - started
    os.close(fd)
    os.unlink(path)
    return written / elapsed / 1e6


def batched(directory: str, size: int, batch: int, secs: float) -> float:
    payload = os.urandom(size)
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    n, started = 0, time.monotonic()
    while time.monotonic() - started < secs:
        for _ in range(batch):
            fd = os.open(os.path.join(directory, f"m{n}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.close(fd)
            n += 1
        if _libc.syncfs(dirfd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    elapsed = time.monotonic() - started
    os.close(dirfd)
    return n / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/geosmtp-bench-disk", help="a scratch dir on the spool's filesystem")
    ap.add_argument("--size", type=int, default=102400)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    seq, files = [], []
    for _ in range(a.reps):
        for runner, out in ((lambda d: sequential(d, a.secs), seq), (lambda d: batched(d, a.size, a.batch, a.secs), files)):
            shutil.rmtree(a.dir, ignore_errors=True)
            os.makedirs(a.dir)
            out.append(runner(a.dir))
    shutil.rmtree(a.dir, ignore_errors=True)
    result = {"sequential_MBps": round(statistics.median(seq), 1), "batched_files_per_s": round(statistics.median(files), 1),
              "batched_MBps": round(statistics.median(files) * a.size / 1e6, 1), "size": a.size, "batch": a.batch,
              "runs": {"sequential": seq, "batched": files}}
    print(f"sequential: {result['sequential_MBps']} MB/s; {a.batch} files of {a.size} octets then syncfs: "
          f"{result['batched_files_per_s']} files/s = {result['batched_MBps']} MB/s (medians of {a.reps})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
