"""[server] user and group: started as root, geosmtp binds a privileged port, takes the spool,
becomes `nobody` before it accepts a connection, and neither the workers nor the queue manager
ever run as root. A process that cannot switch refuses to start.

The server must be run by an interpreter `nobody` can reach (this machine's Python may live
under /root, mode 0700): the test links geosmtp and its packages into a world-readable
directory and picks the first interpreter of the same version that nobody can start with it.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.support import toml
from tests.support.e2e import connect, queue_id, send_message
from tests.support.server import ServerProcess, children, users_file_text

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
REPO = Path(__file__).resolve().parents[2]
NOT_RUNTIME = shutil.ignore_patterns("pip", "pip-*", "setuptools", "setuptools-*", "_distutils_hack", "*.pth",
                                     "__editable__*", "hypothesis", "pygments", "pytest*", "_pytest")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def as_nobody(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def runtime():
    """(interpreter, environment, a world-readable directory to work in)."""
    assert os.geteuid() == 0, "this test starts geosmtp as root, as an operator would (CI runs as root)"
    base = Path(tempfile.mkdtemp(prefix="geosmtp-priv-"))
    base.chmod(0o755)
    shutil.copytree(REPO / "geosmtp", base / "code" / "geosmtp", copy_function=_link_or_copy)
    shutil.copytree(sysconfig.get_paths()["purelib"], base / "site", copy_function=_link_or_copy, ignore=NOT_RUNTIME)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{base / 'code'}:{base / 'site'}", "PYTHONDONTWRITEBYTECODE": "1"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(python):
            try:
                probe = as_nobody([python, "-c", "import geosmtp.server"], env)
            except PermissionError as exc:  # not even executable for nobody
                tried.append(f"{python}: {exc.strerror}")
                continue
            if probe.returncode == 0:
                break
            tried.append(f"{python}: {probe.stderr.strip().splitlines()[-1:]}")
    else:
        pytest.fail(f"no {version} interpreter that uid {NOBODY.pw_uid} may run with geosmtp's packages: {tried}")
    work = base / "run"
    work.mkdir(mode=0o755)
    yield python, env, work
    shutil.rmtree(base, ignore_errors=True)


def privileged_port() -> int:
    """A free port below 1024 (only root may bind it)."""
    for port in range(900, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 900-999")


def server(runtime, name: str, **server) -> ServerProcess:
    python, env, work = runtime
    root = work / name
    root.mkdir(mode=0o755)
    srv = ServerProcess(root, {"server": {"user": "nobody", "group": NOGROUP, "spool_dir": str(root / "var" / "spool"),
                                          **server},
                               "local": {"maildir_root": str(root / "var" / "mail")}})
    srv.port = privileged_port()
    srv.config["listener"][0]["address"] = f"127.0.0.1:{srv.port}"
    srv.config_path.write_text(toml.dumps(srv.config))
    srv.config_path.chmod(0o644)  # workers and SIGHUP read it as nobody
    users = root / "users"  # AUTH secrets: readable by the server's user only
    os.chown(users, NOBODY.pw_uid, NOBODY.pw_gid)
    srv.python, srv.env = python, env
    return srv


def ids(pid: int) -> dict[str, list[int]]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    return {key: [int(v) for v in fields[key].split()] for key in ("Uid", "Gid", "Groups")}


def test_root_binds_then_becomes_the_user_workers_included(runtime):
    srv = server(runtime, "drop", workers=2).start()
    try:
        workers = srv.wait_for(lambda: len(children(srv.proc.pid)) == 2 and children(srv.proc.pid))
        nobody = {"Uid": [NOBODY.pw_uid] * 4, "Gid": [NOBODY.pw_gid] * 4, "Groups": [NOBODY.pw_gid]}
        for pid in (srv.proc.pid, *workers):  # real, effective, saved and filesystem ids
            assert ids(pid) == nobody, pid
        assert f"running as nobody (uid {NOBODY.pw_uid}" in srv.log()
        with connect(srv.port) as c:  # port 900-999: bound as root, served as nobody
            qid = queue_id(send_message(c, "x@remote.test", ["alice@example.test"], b"Subject: hi\r\n\r\nbody"))
        srv.wait_for(lambda: srv.messages("alice@example.test"))
        # the directories root made for it, and what it wrote since, are nobody's
        for path in (srv.spool, srv.spool / "lock", srv.spool / "queue", srv.maildir_root,
                     *(srv.maildir("alice@example.test") / "new").iterdir()):
            assert path.stat().st_uid == NOBODY.pw_uid, path
        srv.wait_for(lambda: not (srv.spool / "msg" / qid).exists())  # done: removed by the queue manager
        srv.proc.send_signal(signal.SIGHUP)  # nobody can read what a reload reads
        srv.wait_for(lambda: "reload: configuration" in srv.log())
        assert "reload refused" not in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_process_that_cannot_switch_refuses(runtime):
    python, env, _ = runtime
    srv = server(runtime, "refuse", user="root", group="root")
    # as nobody, told to be root: it cannot, and says so instead of running as nobody
    result = as_nobody([python, "-m", "geosmtp", "start", "-c", str(srv.config_path)], env, cwd=srv.root)
    assert result.returncode == 2, result
    assert "cannot become root (uid 0" in result.stderr

    srv.config["server"].update(user="no-such-user")
    srv.config["server"].pop("group")
    srv.config_path.write_text(toml.dumps(srv.config))
    result = subprocess.run([python, "-m", "geosmtp", "check-config", "-c", str(srv.config_path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "server.user: no such user 'no-such-user'" in result.stderr, result


def test_files_the_user_cannot_read_are_named_before_start(runtime):
    python, env, _ = runtime
    srv = server(runtime, "unreadable")
    users = srv.root / "users"
    os.chown(users, 0, 0)  # mode 0600, root's: the server, as nobody, could not reload it
    users.write_text(users_file_text())
    result = subprocess.run([python, "-m", "geosmtp", "start", "-c", str(srv.config_path)], env=env,
                            capture_output=True, text=True, timeout=60, cwd=srv.root)
    assert result.returncode == 2, result
    assert f"auth.users_file: {users}: not readable by uid {NOBODY.pw_uid}" in result.stderr
