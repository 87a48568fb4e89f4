"""Where a server's CPU goes, from a system-wide `perf record`: each process's share in
CPU-ms a message, and within the server's processes the system calls and user-space
libraries the samples fell in.

Used by bench/cpu_per_message.py --perf (perf from Debian's linux-perf package, run as
root). perf samples every CPU at a fixed frequency, so a count of samples divided by the
frequency is CPU time; every sample's call stack (-g) names the system call it was made in,
if any (`__x64_sys_<name>` on the way up), and its innermost frame's object file tells
Python's interpreter from numpy, libc or the kernel.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess

FREQUENCY = 1999  # samples a second on each CPU
_SYSCALL = re.compile(r"__(?:x64|ia32)_sys_(\w+)")


def record(out: str) -> subprocess.Popen:
    """Start sampling every CPU into `out`; stop() ends it."""
    return subprocess.Popen(["perf", "record", "-a", "-g", "-F", str(FREQUENCY), "-o", out, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: perf writes its file and exits
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, -2, 130):
        raise SystemExit(f"perf record failed ({proc.returncode}): {err.strip()[-300:]}")


def samples(data: str):
    """(pid, comm, frames) per sample, frames innermost first as (symbol, object file)."""
    script = subprocess.run(["perf", "script", "-i", data, "-F", "pid,comm,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    pid = comm = None
    frames: list[tuple[str, str]] = []
    for line in script.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if pid is not None:
                yield pid, comm, frames
            comm, _, number = line.strip().rpartition(" ")  # "comm pid": a comm may hold spaces
            pid, comm, frames = int(number), comm.strip(), []
            continue
        parts = line.split()
        frames.append((parts[1] if len(parts) > 2 else "?", os.path.basename(parts[-1].strip("()"))))
    if pid is not None:
        yield pid, comm, frames


def where(frames: list[tuple[str, str]]) -> str:
    """sys_<call> for a sample inside a system call, else the innermost frame's object."""
    for symbol, _ in frames:
        if m := _SYSCALL.match(symbol):
            return "sys_" + m.group(1)
    if not frames:
        return "?"
    obj = frames[0][1]
    if obj.startswith("[kernel"):
        return "kernel, no system call (interrupts, page faults, softirq)"
    return re.sub(r"(\.cpython-\d+.*|\.so[.\d]*)$", "", obj)


def report(data: str, roles: dict[int, str], messages: int, top: int = 12) -> str:
    """A text table: CPU-ms a message per process role, then per place within each role
    of the server. `roles` names the server's pids (master, worker); others go by comm."""
    by_role: collections.Counter = collections.Counter()
    by_place: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for pid, comm, frames in samples(data):
        role = roles.get(pid) or ("kernel threads" if comm.startswith(("kworker", "ksoftirq")) else
                                  "idle" if pid == 0 else comm)
        by_role[role] += 1
        if pid in roles:
            by_place[role][where(frames)] += 1

    def ms(count: int) -> str:
        return f"{count / FREQUENCY / messages * 1000:7.3f}"

    lines = [f"CPU-ms a message, from perf samples at {FREQUENCY} Hz on every CPU ({messages} messages)", ""]
    for role, count in by_role.most_common():
        lines.append(f"{ms(count)}  {role}")
    for role in sorted(by_place):
        lines += ["", f"{role}:"]
        places = by_place[role]
        for place, count in places.most_common(top):
            lines.append(f"{ms(count)}  {place}")
        rest = sum(places.values()) - sum(c for _, c in places.most_common(top))
        if rest:
            lines.append(f"{ms(rest)}  (the rest)")
    return "\n".join(lines)
