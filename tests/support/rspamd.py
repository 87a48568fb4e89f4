"""A real rspamd (Debian's package) for end-to-end tests, started by the test as its own
process with a configuration it writes: only a normal worker, on a loopback port, no
controller, no proxy, no Redis; its database, run and log directories under `root`; DNS
through the test's FakeDNS (so no lookup leaves loopback); the rules and modules of the
package's /etc/rspamd (CONFDIR), none of the host's local.d or override.d (LOCAL_CONFDIR is
a directory of ours). It never touches the system service.

    rspamd = Rspamd(tmp_path, dns.address).start()   # RspamdFailed says why it could not start
    rspamd.url                                       # "http://127.0.0.1:PORT"

As root, rspamd refuses to run its workers as root unless given -u/-g or --insecure; the
test's directories belong to root (an unprivileged user could not reach them), so under root
it runs with --insecure; as any other user it runs as that user.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.server import free_port

CONFDIR = Path("/etc/rspamd")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_TIMEOUT = 90.0  # the first start compiles the regexp cache (hyperscan): 10-20 s


class RspamdFailed(Exception):
    """rspamd could not be started; the message says why (with the end of its log)."""


class Rspamd:
    def __init__(self, root: Path, nameserver: str, local: dict[str, str] | None = None):
        self.root = Path(root)
        self.nameserver = nameserver
        self.local = local or {}  # extra local.d/<file> contents (actions.conf...)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        return f"""# written by tests/support/rspamd.py: a normal worker only, everything under {self.root}
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{self.port}";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
"""

    def start(self) -> "Rspamd":
        binary = shutil.which("rspamd") or ("/usr/bin/rspamd" if os.path.exists("/usr/bin/rspamd") else None)
        if binary is None:
            raise RspamdFailed("rspamd is not installed (Debian package \"rspamd\": apt-get install -y rspamd)")
        if not (CONFDIR / "common.conf").exists():
            raise RspamdFailed(f"{CONFDIR}/common.conf is missing: the rspamd package's configuration is needed")
        for d in ("db", "run", "log", "local/local.d"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # the resolver: merged over options.inc's dns {} (a second dns {} block there is ignored)
        (self.root / "local" / "local.d" / "options.inc").write_text(
            f'dns {{ nameserver = ["{self.nameserver}"]; timeout = 1s; retransmits = 1; }}\n')
        # fuzzy_check's servers (fuzzy*.rspamd.com) are looked up by the system resolver as the
        # configuration loads, not through `nameserver`: the module is off, nothing leaves loopback
        (self.root / "local" / "local.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
        for name, text in self.local.items():
            (self.root / "local" / "local.d" / name).write_text(text)
        conf = self.root / "rspamd.conf"
        conf.write_text(self.config())
        cmd = [binary, "-f", "-c", str(conf),
               f"--var=CONFDIR={CONFDIR}", f"--var=LOCAL_CONFDIR={self.root / 'local'}",
               f"--var=DBDIR={self.root / 'db'}", f"--var=RUNDIR={self.root / 'run'}",
               f"--var=LOGDIR={self.root / 'log'}"]
        if os.geteuid() == 0:
            cmd.insert(2, "--insecure")
        self.output = open(self.root / "rspamd.out", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RspamdFailed(f"rspamd exited with status {self.proc.returncode}: {self.tail()}")
            if self.ping():
                return self
            time.sleep(0.2)
        self.stop()
        raise RspamdFailed(f"rspamd did not answer /ping on {self.url} in {START_TIMEOUT:g}s: {self.tail()}")

    def ping(self) -> bool:
        try:  # straight to loopback, whatever http_proxy says
            with _DIRECT.open(f"{self.url}/ping", timeout=1) as resp:
                return resp.read().startswith(b"pong")
        except OSError:
            return False

    def tail(self, lines: int = 15) -> str:
        out = []
        for path in (self.root / "rspamd.out", self.root / "log" / "rspamd.log"):
            if path.exists():
                out += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out) or "(no output)"

    def log(self) -> str:
        path = self.root / "log" / "rspamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # the main process stops its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        self.output.close()
