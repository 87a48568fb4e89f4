"""A real Dovecot (Debian's dovecot-core, -lmtpd, -imapd) for the LMTP and Maildir tests.

Each instance writes its own dovecot.conf in a directory of its own and runs `dovecot -F -c`
as root: its own base_dir, state_dir and log, a passwd-file of a few users, their mail in
Maildirs under the same directory, LMTP on a unix socket and on a loopback port, IMAP on a
loopback port. The system's dovecot service and /etc/dovecot are never touched.

The directory is not pytest's tmp_path: that one's ancestors are 0700, and Dovecot's
processes run as unprivileged users (dovenull, dovecot, and the mail user, nobody) that must
reach it. The mail users' mail is owned by nobody; MaildirDelivery tests chown what they write
(as an operator runs geosmtp as the mail user).

Users (all with password PASSWORD), on example.test:
  alice, bob, erin   no quota to speak of
  carol        quota of 1 KiB, and quota_full_tempfail: a delivery over it gets 452 4.2.2
  dave         quota of 1 KiB, Dovecot's default: 552 5.2.2
"""
from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import ports

DOVECOT = "/usr/sbin/dovecot"
SERVICES = ("/usr/lib/dovecot/lmtp", "/usr/lib/dovecot/imap")  # dovecot-lmtpd, dovecot-imapd
PASSWORD = "secret-imap-pass"
DOMAIN = "example.test"
USERS = {
    "alice": "",
    "bob": "",
    "erin": "",
    # userdb extra fields: a per-user quota rule, and (carol) the setting that turns "over
    # quota" from a permanent 552 into a temporary 452 (Dovecot's quota_full_tempfail)
    "carol": "userdb_quota_rule=*:storage=1K userdb_quota_full_tempfail=yes",
    "dave": "userdb_quota_rule=*:storage=1K",
}
MAIL_USER = pwd.getpwnam("nobody")

CONF = """\
# written by tests/support/dovecot.py for one test
instance_name = {instance}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_username_format = %Lu
first_valid_uid = {uid}
last_valid_uid = {uid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {root}/users
}}
mail_location = maildir:{root}/mail/%Ld/%Ln
mail_plugins = quota
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
lda_mailbox_autocreate = yes
lmtp_rcpt_check_quota = no
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=1G
}}
log_timestamp = "%Y-%m-%d %H:%M:%S "
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class Dovecot:
    def __init__(self):
        assert all(os.path.exists(p) for p in (DOVECOT, *SERVICES)), \
            "Dovecot is not installed (.ci/run installs Debian's dovecot-core, dovecot-lmtpd and dovecot-imapd)"
        self.root = Path(tempfile.mkdtemp(prefix="geosmtp-dovecot-"))
        self.root.chmod(0o755)
        self.mail_root = self.root / "mail"
        self.lmtp_port = ports.free_port()
        self.imap_port = ports.free_port()
        self.lmtp_socket = self.root / "run" / "lmtp"
        self.conf = self.root / "dovecot.conf"
        self.proc: subprocess.Popen | None = None

    @property
    def lmtp_unix(self) -> str:
        return f"unix:{self.lmtp_socket}"

    @property
    def lmtp_tcp(self) -> str:
        return f"127.0.0.1:{self.lmtp_port}"

    def mailbox(self, user: str) -> Path:
        """Where Dovecot keeps `user`'s INBOX: what MaildirDelivery(mail_root) writes to."""
        return self.mail_root / DOMAIN / user

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> Dovecot:
        uid, gid = MAIL_USER.pw_uid, MAIL_USER.pw_gid
        self.mail_root.mkdir(mode=0o700)
        os.chown(self.mail_root, uid, gid)
        users = "".join(f"{name}@{DOMAIN}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{self.mailbox(name)}::{extra}\n"
                        for name, extra in USERS.items())
        (self.root / "users").write_text(users)
        self.conf.write_text(CONF.format(instance=self.root.name, root=self.root, uid=uid,
                                         lmtp_port=self.lmtp_port, imap_port=self.imap_port))
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its children in a group of its own
        self._wait_ready(10.0)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode("utf-8", "replace")
                raise AssertionError(f"dovecot exited with {self.proc.returncode}: {out}\n{self.log()}")
            if self.lmtp_socket.exists() and _answers(self.lmtp_port) and _answers(self.imap_port):
                return
            time.sleep(0.05)
        raise AssertionError(f"dovecot not ready within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the master stops its children
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- looking at it -----------------------------------------------------------------------
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def imap(self, user: str) -> imaplib.IMAP4:
        """An IMAP session logged in as `user` (the caller logs out)."""
        session = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        session.login(f"{user}@{DOMAIN}", PASSWORD)
        return session

    def messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Every message in one of `user`'s mailboxes, in full, as IMAP gives it."""
        session = self.imap(user)
        try:
            status, _ = session.select(f'"{mailbox}"', readonly=True)
            assert status == "OK", f"no mailbox {mailbox!r} for {user}"
            status, data = session.uid("SEARCH", None, "ALL")
            assert status == "OK", data
            out = []
            for uid in data[0].split():
                status, parts = session.uid("FETCH", uid, "(BODY.PEEK[])")
                assert status == "OK", parts
                out.append(parts[0][1])
            return out
        finally:
            session.logout()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
