"""[server] workers = N: N processes accept on the same ports, one master runs the queue."""
import os
import signal
import smtplib
import subprocess
import sys
import time

from tests.support import toml
from tests.support.e2e import readyz
from tests.support.server import ServerProcess, alive, children, free_port


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
        assert f"another geosmtp (pid {first.proc.pid}) is running on the spool" in result.stderr
    finally:
        first.stop()


def test_master_stops_workers_on_sigterm(tmp_path):
    srv = ServerProcess(tmp_path / "t", {"server": {"workers": 3}}).start()
    workers = srv.wait_for(lambda: len(children(srv.proc.pid)) == 3 and children(srv.proc.pid))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    srv.wait_for(lambda: not any(alive(p) for p in workers), timeout=10)



def test_failing_workers_back_off_and_readyz_says_so(tmp_path):
    """Workers that cannot start (here: the file became invalid) are restarted after a
    doubling pause, /readyz is 503 while none runs, and service resumes once they can."""
    mport = free_port()
    srv = ServerProcess(tmp_path / "b", {"server": {"workers": 2}, "metrics": {"address": f"127.0.0.1:{mport}"}})
    srv.start()
    try:
        workers = srv.wait_for(lambda: len(children(srv.proc.pid)) == 2 and children(srv.proc.pid))
        good = srv.config_path.read_text()
        srv.config_path.write_text(good + "\n[broken\n")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        srv.wait_for(lambda: readyz(mport) == 503, timeout=10)
        srv.wait_for(lambda: "restarting in 4s" in srv.log(), timeout=20)  # 2 s, then 4 s, ...
        assert srv.proc.poll() is None  # the master stays, and says why it is not ready
        srv.config_path.write_text(good)
        srv.wait_for(lambda: readyz(mport) == 200, timeout=30)
        send(srv.port, 3, "back")
        srv.wait_for(lambda: len(srv.messages("alice@example.test")) == 3)
    finally:
        assert srv.stop() == 0


def test_the_port_is_the_masters_and_a_second_server_cannot_share_it(tmp_path):
    srv = ServerProcess(tmp_path / "m", {"server": {"workers": 2}}).start()
    try:
        other = ServerProcess(tmp_path / "o")
        other.config["listener"][0]["address"] = f"127.0.0.1:{srv.port}"
        other.config_path.write_text(toml.dumps(other.config))
        result = subprocess.run([sys.executable, "-m", "geosmtp", "start", "-c", str(other.config_path)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert "cannot start" in result.stderr and "in use" in result.stderr
        send(srv.port, 2, "still")
        srv.wait_for(lambda: len(srv.messages("alice@example.test")) == 2)
    finally:
        assert srv.stop() == 0
