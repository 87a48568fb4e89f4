"""geosmtp.preflight: access judged for the user the server will run as, not for whoever
runs the check (the tests run as root, whom mode bits never stop: uids are given here)."""
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from geosmtp import preflight
from geosmtp.config import validate
from geosmtp.preflight import R, W, X, RunAs

NOBODY = RunAs(65534, 65534, frozenset({65534}))


@pytest.fixture
def tmp_path():
    """A directory others may search, as the way to a server's files must be (pytest's own
    tmp_path is under a 0700 directory: every path there is out of reach for NOBODY)."""
    with tempfile.TemporaryDirectory(prefix="geosmtp-preflight-", dir="/tmp") as name:
        os.chmod(name, 0o755)
        yield Path(name)


class Inode:
    def __init__(self, uid, gid, mode):
        self.st_uid, self.st_gid, self.st_mode = uid, gid, mode


@pytest.mark.parametrize("user, inode, want, allowed", [
    (RunAs(0, 0, frozenset({0})), Inode(5, 5, 0o000), R | W | X, True),   # root
    (RunAs(5, 9, frozenset({9})), Inode(5, 7, 0o700), R | W | X, True),   # owner
    (RunAs(5, 9, frozenset({9})), Inode(5, 9, 0o070), R, False),          # owner bits rule the owner
    (RunAs(6, 9, frozenset({9, 7})), Inode(5, 7, 0o750), R | X, True),    # a supplementary group
    (RunAs(6, 9, frozenset({9, 7})), Inode(5, 7, 0o750), W, False),
    (RunAs(6, 9, frozenset({9})), Inode(5, 7, 0o755), W | X, False),      # others
    (RunAs(6, 9, frozenset({9})), Inode(5, 7, 0o757), W | X, True),
])
def test_mode_bits(user, inode, want, allowed):
    assert user.may(inode, want) is allowed


def test_a_directory_only_root_may_write(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    assert preflight.writable_dir(spool, RunAs.of()) is None  # root
    assert preflight.writable_dir(spool, NOBODY) == f"{spool}: not writable by uid 65534 (owner 0, mode 755)"
    os.chown(spool, 65534, 65534)
    assert preflight.writable_dir(spool, NOBODY) is None
    assert preflight.writable_dir(spool / "a" / "b", NOBODY) is None  # it can make them


def test_a_missing_directory_under_one_it_cannot_write(tmp_path):
    (tmp_path / "var").mkdir(mode=0o755)
    assert preflight.writable_dir(tmp_path / "var" / "spool", NOBODY) == (
        f"{tmp_path / 'var' / 'spool'}: does not exist and cannot be made: "
        f"{tmp_path / 'var'}: not writable by uid 65534 (owner 0, mode 755)")


def test_a_file_behind_a_directory_it_cannot_search(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "users").write_text("")
    assert preflight.readable_file(private / "users", RunAs.of()) is None
    assert preflight.readable_file(private / "users", NOBODY) == f"{private} is not searchable by uid 65534"
    private.chmod(0o711)
    (private / "users").chmod(0o600)
    assert preflight.readable_file(private / "users", NOBODY) == (
        f"{private / 'users'}: not readable by uid 65534 (owner 0, mode 600)")
    assert preflight.readable_file(private, NOBODY) == f"{private}: not a regular file"
    assert preflight.readable_file(private / "none", NOBODY) == f"{private / 'none'}: No such file or directory"


def test_check_for_another_uid(tmp_path):
    """What `check` says for a server to run as uid 65534 on files root made."""
    (tmp_path / "users").write_text("# nobody yet\n")
    (tmp_path / "users").chmod(0o600)
    (tmp_path / "spool").mkdir(mode=0o700)
    (tmp_path / "mail").mkdir(mode=0o755)
    config = validate({
        "server": {"spool_dir": str(tmp_path / "spool")},
        "listener": [{"name": "smtp", "address": "127.0.0.1:2525"}],
        "auth": {"users_file": str(tmp_path / "users")},
        "local": {"maildir_root": str(tmp_path / "mail")},
    })
    assert preflight.check(config) == []  # as root
    assert preflight.check(config, uid=65534, gid=65534) == [
        f"auth.users_file: {tmp_path / 'users'}: not readable by uid 65534 (owner 0, mode 600)",
        f"server.spool_dir: {tmp_path / 'spool'}: not writable by uid 65534 (owner 0, mode 700)",
        f"local.maildir_root: {tmp_path / 'mail'}: not writable by uid 65534 (owner 0, mode 755)",
    ]
    for path in ("users", "spool", "mail"):
        os.chown(tmp_path / path, 65534, 65534)
    assert preflight.check(config, uid=65534, gid=65534) == []


def test_run_as_takes_the_users_groups():
    me = RunAs.of()
    assert (me.uid, me.gid) == (os.geteuid(), os.getegid()) and me.gid in me.groups
    assert RunAs.of(4242424).groups == frozenset({4242424})  # no passwd entry: its own group
    assert RunAs.of(4242424, 7).gid == 7


def test_certificate_and_key(tmp_path):
    from tests.support.certs import ServerCert

    ours, other = ServerCert(), ServerCert()
    ours.write(tmp_path / "cert.pem", tmp_path / "key.pem")
    (tmp_path / "other.key").write_bytes(other.key_pem)
    (tmp_path / "junk").write_text("not PEM\n")

    def problems(cert, key, sni=None):
        tls = {"cert_file": str(tmp_path / cert), "key_file": str(tmp_path / key)}
        if sni is not None:  # one more certificate, for a name
            tls["certificate"] = [{"cert_file": str(tmp_path / sni[0]), "key_file": str(tmp_path / sni[1]),
                                   "names": ["mail.other.test"]}]
        config = validate({
            "server": {"spool_dir": str(tmp_path / "spool")},
            "listener": [{"name": "smtp", "address": "127.0.0.1:2525", "tls": "starttls"}],
            "local": {"maildir_root": str(tmp_path / "mail")},
            "tls": tls,
        })
        return preflight.check(config)

    assert problems("cert.pem", "key.pem", sni=("cert.pem", "key.pem")) == []
    assert problems("cert.pem", "key.pem", sni=("cert.pem", "other.key")) == [
        f"tls.certificate[0].key_file: {tmp_path / 'other.key'}: does not match the certificate in "
        f"{tmp_path / 'cert.pem'}"]

    assert problems("cert.pem", "key.pem") == []
    assert problems("cert.pem", "other.key") == [
        f"tls.key_file: {tmp_path / 'other.key'}: does not match the certificate in {tmp_path / 'cert.pem'}"]
    assert problems("cert.pem", "cert.pem") == [
        f"tls.key_file: {tmp_path / 'cert.pem'}: not a PEM private key"]
    encrypted = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "key.pem"), "-aes256", "-passout",
                                "pass:secret"], capture_output=True, check=True).stdout
    (tmp_path / "encrypted.key").write_bytes(encrypted)
    assert problems("cert.pem", "encrypted.key") == [f"tls.key_file: {tmp_path / 'encrypted.key'}: the key is "
                                                     "encrypted; give geosmtp a key without a passphrase"]
    assert problems("junk", "key.pem") == [  # the key cannot be matched: only the certificate is named
        f"tls.cert_file: {tmp_path / 'junk'}: no PEM certificate in it (NO_CERTIFICATE_OR_CRL_FOUND)"]
    assert problems("key.pem", "gone.pem") == [
        f"tls.cert_file: {tmp_path / 'key.pem'}: no PEM certificate in it (NO_CERTIFICATE_OR_CRL_FOUND)",
        f"tls.key_file: {tmp_path / 'gone.pem'}: No such file or directory"]
