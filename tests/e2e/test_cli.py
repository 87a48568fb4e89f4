"""The commands an operator types: geosmtp check-config / start, geosmtp-queue list."""
import json
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
QUEUE_TOOL = [sys.executable, str(ROOT / "bin" / "geosmtp-queue")]


def geosmtp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "geosmtp", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def test_shipped_config_is_valid():
    result = geosmtp("check-config", "-c", str(ROOT / "conf" / "geosmtp.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_bad_config_lists_every_problem_and_exits_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[server]\nhostname = "bad host"\nspool_dirr = "x"\n'
        '[[listener]]\nname = "smtp"\naddress = "127.0.0.1"\n'
        '[limits]\nmax_recipients = 10\ncommand_timeout = "soon"\n'
    )
    for command in ("check-config", "start"):
        result = geosmtp(command, "-c", str(cfg))
        assert result.returncode == 2
        for key in ("server.hostname", "server.spool_dirr: unknown key", "listener[0].address",
                    "limits.max_recipients", "limits.command_timeout"):
            assert key in result.stderr, (key, result.stderr)


def test_unreadable_toml_exits_2(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[server\n")
    result = geosmtp("check-config", "-c", str(cfg))
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    assert geosmtp("check-config", "-c", str(tmp_path / "missing.toml")).returncode == 2


def test_sigterm_and_sigint_stop_cleanly(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        srv = ServerProcess(tmp_path / sig.name).start()
        srv.proc.send_signal(sig)
        assert srv.proc.wait(20) == 0
        assert "stopped" in srv.log()


def test_log_lines_carry_the_session_id(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice@example.test"], b"Subject: log\r\n\r\nhi\r\n")
    queued = server.wait_for(lambda: [l for l in server.log().splitlines() if " queued " in l])
    sid = queued[-1].split("[", 1)[1].split("]", 1)[0]
    assert len(sid) == 10
    session_lines = server.wait_for(
        lambda: [l for l in server.log().splitlines() if f"[{sid}]" in l and "disconnect from" in l]
        and [l for l in server.log().splitlines() if f"[{sid}]" in l])
    assert any("connect from [127.0.0.1]" in l for l in session_lines)
    assert any("MAIL FROM" in l or "from=<x@remote.test>" in l for l in session_lines)


def test_queue_list_shows_a_deferred_message(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("sender@example.test", ["far@remote.test", "alice@example.test"], b"Subject: q\r\n\r\nhi\r\n")
    server.wait_for(lambda: server.queue_files("deferred"))
    env = {**os.environ, "GEOSMTP_CONFIG": str(server.config_path)}
    text = subprocess.run([*QUEUE_TOOL, "list"], capture_output=True, text=True, timeout=30, env=env)
    assert text.returncode == 0, text.stderr
    assert "deferred" in text.stdout and "<sender@example.test>" in text.stdout
    assert "pending   <far@remote.test>" in text.stdout
    assert "delivered <alice@example.test>" in text.stdout
    rows = subprocess.run([*QUEUE_TOOL, "-c", str(server.config_path), "list", "--json"],
                          capture_output=True, text=True, timeout=30)
    entries = [json.loads(line) for line in rows.stdout.splitlines()]
    entry = next(e for e in entries if e["sender"] == "sender@example.test")
    assert entry["state"] == "deferred" and entry["next_attempt"] > entry["arrival"]
    assert {r["address"]: r["status"] for r in entry["recipients"]} == {
        "far@remote.test": "pending", "alice@example.test": "delivered"}
    assert entry["size"] > 0 and entry["age"] >= 0


def test_queue_tool_with_bad_config_exits_2(tmp_path):
    result = subprocess.run([*QUEUE_TOOL, "-c", str(tmp_path / "none.toml"), "list"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2


def test_hold_listener_parks_mail_until_released(make_server):
    srv = make_server({"listeners": {"smtp": {"hold": True}}})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice@example.test"], b"Subject: held\r\n\r\nwait\r\n")
    held = srv.wait_for(lambda: srv.queue_files("hold"))
    assert not srv.messages("alice@example.test")
    tool = [*QUEUE_TOOL, "-c", str(srv.config_path)]
    assert subprocess.run([*tool, "release", "NOSUCHID0000000000"], capture_output=True,
                          timeout=30).returncode == 1
    out = subprocess.run([*tool, "release", "--all"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and f"{held[0]}: released" in out.stdout
    msgs = srv.wait_for(lambda: srv.messages("alice@example.test"), timeout=15)
    assert b"Subject: held" in msgs[0]


# -- pre-flight: check-config and start open what the configuration names ------------------
def broken_setup(tmp_path):
    """A config whose every file is wrong in its own way: a key from another certificate,
    a users file with a bad line, a DKIM key that is a certificate, a password file others
    may read, and a spool where a file stands in the way."""
    from tests.support.certs import ServerCert

    pki = tmp_path / "pki"
    pki.mkdir()
    ours, other = ServerCert(), ServerCert()
    ours.write(pki / "cert.pem", pki / "key.pem")
    (pki / "other-key.pem").write_bytes(other.key_pem)
    (pki / "secret").write_text("hunter2\n")
    (pki / "secret").chmod(0o644)
    (tmp_path / "in-the-way").write_text("not a directory\n")
    srv = ServerProcess(tmp_path / "srv", {
        "tls": {"cert_file": str(pki / "cert.pem"), "key_file": str(pki / "other-key.pem")},
        "listeners": {"smtp": {"tls": "starttls"}},
        "server": {"spool_dir": str(tmp_path / "in-the-way" / "spool")},
        "relay": {"smarthost": "127.0.0.1:2525", "smarthost_user": "relay",
                  "smarthost_password_file": str(pki / "secret")},
    })
    users = srv.root / "users"
    users.write_text(users.read_text() + "carol@example.test:plain-text-password\n")
    with open(srv.config_path, "a") as fh:  # tests.support.toml writes no [[dkim.key]]
        fh.write(f'\n[[dkim.key]]\ndomain = "example.test"\nselector = "s1"\n'
                 f'key_file = "{pki / "cert.pem"}"\nalgorithm = "rsa-sha256"\n')
    return srv, pki


def test_check_config_and_start_open_every_named_file(tmp_path):
    srv, pki = broken_setup(tmp_path)
    expected = [
        f"tls.key_file: {pki / 'other-key.pem'}: does not match the certificate in {pki / 'cert.pem'}",
        f"auth.users_file: {srv.root / 'users'}: line 3: expected address:$scrypt$... hash",
        f"dkim.key[0].key_file: {pki / 'cert.pem'}: no PEM private key in it",
        f"relay.smarthost_password_file: {pki / 'secret'}: readable by others (mode 644); chmod 600 it",
        f"server.spool_dir: {tmp_path / 'in-the-way' / 'spool'}: does not exist and cannot be made: "
        f"{tmp_path / 'in-the-way'}: not a directory",
    ]
    for command in ("check-config", "start"):
        result = geosmtp(command, "-c", str(srv.config_path))
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.splitlines()
        assert lines[0] == f"geosmtp: {srv.config_path}: cannot start with this configuration:"
        assert [line.strip() for line in lines[1:]] == expected, command
        assert "hunter2" not in result.stderr and "plain-text-password" not in result.stderr
        assert result.stdout == ""


def test_users_file_that_is_not_utf8_names_its_line(tmp_path):
    srv = ServerProcess(tmp_path / "srv")
    users = srv.root / "users"
    users.write_bytes(users.read_bytes() + b"# caf\xe9 (Latin-1)\n")
    result = geosmtp("check-config", "-c", str(srv.config_path))
    assert result.returncode == 2
    assert f"auth.users_file: {users}: line 3: not UTF-8" in result.stderr


def test_start_refuses_a_spool_it_cannot_write(tmp_path):
    """Before: the server started on it, then answered 451 to every message after its whole
    DATA. msg/ is bind-mounted read-only (the tests run as root, whom mode bits never stop)."""
    srv = ServerProcess(tmp_path / "srv").start()  # makes the spool's directories
    srv.stop()
    msg = srv.spool / "msg"
    subprocess.run(["mount", "--bind", str(msg), str(msg)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(msg)], check=True)
        result = geosmtp("start", "-c", str(srv.config_path))
        assert result.returncode == 2
        assert result.stderr.splitlines()[1:] == [f"  server.spool_dir: {msg}: on a read-only filesystem"]
    finally:
        subprocess.run(["umount", "-l", str(msg)], check=False)
    assert geosmtp("check-config", "-c", str(srv.config_path)).returncode == 0


def test_a_file_in_place_of_a_spool_directory_is_named(tmp_path):
    srv = ServerProcess(tmp_path / "srv").start()  # makes the spool's directories
    srv.stop()
    (srv.spool / "queue" / "deferred").rmdir()
    (srv.spool / "queue" / "deferred").write_text("")
    result = geosmtp("check-config", "-c", str(srv.config_path))
    assert result.returncode == 2
    assert f"server.spool_dir: {srv.spool / 'queue' / 'deferred'}: not a directory" in result.stderr
    (srv.spool / "queue" / "deferred").unlink()
    ok = geosmtp("check-config", "-c", str(srv.config_path))
    assert ok.returncode == 0, ok.stderr
