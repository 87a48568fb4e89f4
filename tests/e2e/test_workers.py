"""[server] workers = N: N processes accept on the same ports, one master runs the queue."""
import os
import signal
import smtplib
import subprocess
import sys
import time

from tests.support.server import ServerProcess


def children(pid: int) -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    data = fh.read()
            except OSError:
                continue
            if int(data[data.rindex(")") + 2:].split()[1]) == pid:
                out.add(int(name))
    return out


def send(port, n, tag):
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("x@remote.test", ["alice@example.test"], f"Subject: {tag}-{i}\r\n\r\nbody\r\n".encode())


def test_workers_share_the_port_and_one_queue_delivers(tmp_path):
    srv = ServerProcess(tmp_path / "w", {"server": {"workers": 2}, "log": {"level": "INFO"}}).start()
    try:
        workers = srv.wait_for(lambda: len(children(srv.proc.pid)) == 2 and children(srv.proc.pid))
        # both bound: start() returns as soon as the first worker answers
        srv.wait_for(lambda: len({l.split()[3] for l in srv.log().splitlines()
                                  if f"listening on 127.0.0.1:{srv.port}" in l}) == 2)
        send(srv.port, 30, "a")
        srv.wait_for(lambda: len(srv.messages("alice@example.test")) == 30)
        # both workers accepted connections (the kernel spreads them over the sockets)
        pids = {line.split()[3] for line in srv.log().splitlines() if "connect from" in line}
        assert {str(p) for p in workers} <= pids | {str(srv.proc.pid)}
        assert len(pids & {str(p) for p in workers}) == 2
        # only the master delivers: every delivery line carries its pid
        deliveries = [line for line in srv.log().splitlines() if "status=sent" in line]
        assert {line.split()[3] for line in deliveries} == {str(srv.proc.pid)}

        # a worker killed outright is replaced, and service goes on
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        srv.wait_for(lambda: victim not in children(srv.proc.pid) and len(children(srv.proc.pid)) == 2,
                     timeout=15)
        send(srv.port, 10, "b")
        srv.wait_for(lambda: len(srv.messages("alice@example.test")) == 40)
    finally:
        assert srv.stop() == 0
    assert not children(srv.proc.pid)


def test_a_second_server_on_the_same_spool_is_refused(tmp_path):
    first = ServerProcess(tmp_path / "one").start()
    try:
        clash = ServerProcess(tmp_path / "two", {"server": {"spool_dir": str(first.spool)}})
        result = subprocess.run([sys.executable, "-m", "geosmtp", "start", "-c", str(clash.config_path)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert "another geosmtp is running on the spool" in result.stderr
    finally:
        first.stop()


def test_master_stops_workers_on_sigterm(tmp_path):
    srv = ServerProcess(tmp_path / "t", {"server": {"workers": 3}}).start()
    workers = srv.wait_for(lambda: len(children(srv.proc.pid)) == 3 and children(srv.proc.pid))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}/stat") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]
                   for p in workers)
