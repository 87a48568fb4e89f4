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
