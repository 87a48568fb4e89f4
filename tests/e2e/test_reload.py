"""End to end: SIGHUP reloads the configuration file (mailboxes, aliases, limits, policy)
without dropping sessions; a bad file is refused with a log line and the old one stays."""
from __future__ import annotations

import signal

from geosmtp import replies
from tests.support import toml
from tests.support.e2e import connect, expect
from tests.support.server import ServerProcess


def rewrite(srv: ServerProcess, text: str | None = None) -> None:
    srv.config_path.write_text(text if text is not None else toml.dumps(srv.config))
    srv.proc.send_signal(signal.SIGHUP)


def test_reload_applies_mailboxes_aliases_and_limits_to_new_sessions(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        old = connect(srv.port)  # a session open across the reload
        assert old.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        with connect(srv.port) as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            expect(c.cmd("RCPT TO:<dave@example.test>"), replies.UNKNOWN_USER)
        srv.config["local"]["users"].append("dave@example.test")
        srv.config["local"]["aliases"]["crew@example.test"] = ["dave@example.test"]
        srv.config["relay"]["trusted_networks"] = ["127.0.0.3/32"]  # 127.0.0.2 no longer may relay
        rewrite(srv)
        srv.wait_for(lambda: "reload: configuration from" in srv.log())
        with connect(srv.port, source="127.0.0.2") as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            assert c.code("RCPT TO:<dave@example.test>") == "250 2.1.5"
            assert c.code("RCPT TO:<crew@example.test>") == "250 2.1.5"
            expect(c.cmd("RCPT TO:<someone@remote.test>"), replies.RELAY_DENIED)
        # the session opened before the reload is still there and still works
        assert old.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        assert old.code("QUIT") == "221 2.0.0"
    finally:
        srv.stop()


def test_bad_config_is_refused_and_the_old_one_stays(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        good = srv.config_path.read_text()
        rewrite(srv, good + "\n[limits]\nmax_recipients = -5\n")
        srv.wait_for(lambda: "reload refused" in srv.log())
        with connect(srv.port) as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            assert c.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        # a key file that cannot be read is refused as a whole too
        srv.config["dkim"] = {"key": [{"domain": "example.test", "selector": "s",
                                       "key_file": str(tmp_path / "missing.key")}]}
        srv.config["local"]["users"].append("erin@example.test")
        rewrite(srv)
        srv.wait_for(lambda: srv.log().count("reload refused") >= 2)
        with connect(srv.port) as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            expect(c.cmd("RCPT TO:<erin@example.test>"), replies.UNKNOWN_USER)
        assert srv.proc.poll() is None
    finally:
        srv.stop()
