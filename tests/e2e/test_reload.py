"""End to end: SIGHUP reloads the configuration file (mailboxes, aliases, limits, policy,
per-listener PROXY settings) without dropping sessions, in one process and with workers; a bad
file is refused with a log line and the old one stays."""
from __future__ import annotations

import signal
import socket
from ipaddress import IPv4Address

from proxyprotocol.result import ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2

from geosmtp import replies
from tests.support import toml
from tests.support.e2e import connect, expect, send_message
from tests.support.server import ServerProcess
from tests.support.smtp import RawClient


def rewrite(srv: ServerProcess, text: str | None = None) -> None:
    srv.config_path.write_text(text if text is not None else toml.dumps(srv.config))
    srv.proc.send_signal(signal.SIGHUP)


def reloaded(srv: ServerProcess, n: int = 1) -> None:
    """Wait (bounded) until the log has n "configuration ... applied" lines."""
    srv.wait_for(lambda: srv.log().count("reload: configuration from") >= n)


def rcpts(c: RawClient, addresses: list[str]) -> list[str]:
    """RCPT TO each address, pipelined (PIPELINING is offered); the "250 2.1.5" style codes."""
    c.send("".join(f"RCPT TO:<{a}>\r\n" for a in addresses))
    out = []
    for _ in addresses:
        code_, lines = c.reply()
        out.append(f"{code_} {lines[-1].split(' ')[0]}")
    return out


def remote(n: int, start: int = 0) -> list[str]:
    return [f"r{i}@remote.test" for i in range(start, start + n)]


def test_reload_applies_mailboxes_aliases_and_limits_to_new_sessions(tmp_path):
    # max_recipients may not go below 100 (RFC 5321 4.5.3.1.8): start above it, reload to 100
    srv = ServerProcess(tmp_path, {"limits": {"max_recipients": 150}}).start()
    try:
        # a session open across the reload, from 127.0.0.2: trusted (may relay) before it
        old = connect(srv.port, source="127.0.0.2")
        assert old.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
        with connect(srv.port) as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            expect(c.cmd("RCPT TO:<dave@example.test>"), replies.UNKNOWN_USER)
        srv.config["local"]["users"].append("dave@example.test")
        srv.config["local"]["aliases"]["crew@example.test"] = ["dave@example.test"]
        srv.config["relay"]["trusted_networks"] = ["127.0.0.3/32"]  # 127.0.0.2 no longer may relay
        srv.config["limits"]["max_recipients"] = 100
        rewrite(srv)
        reloaded(srv)
        with connect(srv.port, source="127.0.0.2") as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            assert c.code("RCPT TO:<dave@example.test>") == "250 2.1.5"
            assert c.code("RCPT TO:<crew@example.test>") == "250 2.1.5"
            expect(c.cmd("RCPT TO:<someone@remote.test>"), replies.RELAY_DENIED)
        # a new session gets the new limit: 100 recipients, the 101st is refused
        with connect(srv.port, source="127.0.0.3") as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            assert rcpts(c, remote(100)) == ["250 2.1.5"] * 100
            expect(c.cmd("RCPT TO:<one-too-many@remote.test>"), replies.TOO_MANY_RECIPIENTS)
            assert c.code("RCPT TO:<r0@remote.test>") == "250 2.1.5"  # a repeat is not a new one
            assert c.code("QUIT") == "221 2.0.0"
        # the session opened before the reload is still there and keeps what it had: the old
        # limit (150) and its trusted address (it still relays)
        assert old.code("RCPT TO:<alice@example.test>") == "250 2.1.5"
        assert rcpts(old, remote(149)) == ["250 2.1.5"] * 149
        expect(old.cmd("RCPT TO:<one-too-many@remote.test>"), replies.TOO_MANY_RECIPIENTS)
        assert old.code("RSET") == "250 2.0.0"
        assert old.code("QUIT") == "221 2.0.0"
        old.close()
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


# -- per-listener PROXY settings -------------------------------------------------------------
def proxied(port: int, client: str, source: str) -> RawClient:
    """A connection from `source` (the balancer) that sends a PROXY v2 header for `client`.
    The header comes from an independent encoder (the proxy-protocol package)."""
    c = RawClient(port, timeout=10, source=source)
    c.send(ProxyProtocolV2().pack(ProxyResultIPv4((IPv4Address(client), 40000), (IPv4Address("127.0.0.1"), 25),
                                                  protocol=socket.SOCK_STREAM)))
    return c


def test_reload_changes_the_trusted_proxy_sources(tmp_path):
    srv = ServerProcess(tmp_path, {"listeners": {"smtp": {"proxy_protocol": True,
                                                          "proxy_trusted": ["127.0.0.1/32"]}}})
    # start() probes its port with a plain connection: let it probe the (plain) submission port
    srv.port, smtp_port = srv.submission_port, srv.port
    srv.start()
    srv.port = smtp_port
    try:
        old = proxied(srv.port, "192.0.2.20", source="127.0.0.1")  # open across the reload
        assert old.reply()[0] == 220
        with proxied(srv.port, "192.0.2.21", source="127.0.0.1") as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.code("QUIT") == "221 2.0.0"
        srv.wait_for(lambda: "connect from [192.0.2.21] via [127.0.0.1]" in srv.log())
        assert "not a trusted PROXY source" not in srv.log()

        srv.config["listener"][0]["proxy_trusted"] = ["127.0.0.9/32"]
        assert srv.config["listener"][0]["name"] == "smtp"
        rewrite(srv)
        reloaded(srv)
        with proxied(srv.port, "192.0.2.22", source="127.0.0.1") as c:
            assert c.closed()
            assert c.buf == b""  # not a word, not even a greeting
        srv.wait_for(lambda: "refused [127.0.0.1] on smtp: not a trusted PROXY source" in srv.log())
        assert "192.0.2.22" not in srv.log()
        # the newly trusted balancer is let in
        with proxied(srv.port, "192.0.2.23", source="127.0.0.9") as c:
            assert c.reply()[0] == 220
            assert c.code("QUIT") == "221 2.0.0"
        srv.wait_for(lambda: "connect from [192.0.2.23] via [127.0.0.9]" in srv.log())
        # the proxied session from before the reload was not dropped
        assert old.cmd("EHLO client.test")[0] == 250
        assert old.code("QUIT") == "221 2.0.0"
        old.close()
    finally:
        srv.stop()


# -- with workers -----------------------------------------------------------------------------
def pids_logging(srv: ServerProcess, text: str) -> set[str]:
    """The pids (field 3 of a text log line) of the processes that logged `text`."""
    return {line.split()[3] for line in srv.log().splitlines() if text in line}


def test_reload_reaches_every_worker(tmp_path):
    srv = ServerProcess(tmp_path, {"server": {"workers": 2}}).start()
    try:
        # both workers bound: start() returns as soon as the first one answers
        workers = srv.wait_for(lambda: len(p := pids_logging(srv, f"listening on 127.0.0.1:{srv.port}")) == 2 and p,
                               timeout=15)
        master = str(srv.proc.pid)
        assert master not in workers
        with connect(srv.port) as c:
            assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
            expect(c.cmd("RCPT TO:<dave@example.test>"), replies.UNKNOWN_USER)

        srv.config["local"]["users"].append("dave@example.test")
        rewrite(srv)  # to the master, which passes it on
        srv.wait_for(lambda: pids_logging(srv, "reload: configuration from") == workers | {master}, timeout=20)

        # new connections, whichever worker takes them, know dave: keep connecting until both
        # workers have served at least one (the kernel decides who accepts)
        source, served = "127.0.0.7", 0
        while served < 6 or len(pids_logging(srv, f"connect from [{source}]")) < 2:
            assert served < 60, f"one worker took every connection: {pids_logging(srv, f'connect from [{source}]')}"
            with connect(srv.port, source=source) as c:
                assert c.code("MAIL FROM:<x@remote.test>") == "250 2.1.0"
                assert c.code("RCPT TO:<dave@example.test>") == "250 2.1.5"
                assert c.code("QUIT") == "221 2.0.0"
            served += 1
            srv.wait_for(lambda: len([l for l in srv.log().splitlines()
                                      if f"disconnect from [{source}]" in l]) >= served)
        assert pids_logging(srv, f"connect from [{source}]") == workers
        # and the master, which delivers, knows dave's mailbox too
        with connect(srv.port) as c:
            body = b"Subject: after reload\r\n\r\nhello dave"
            assert send_message(c, "x@remote.test", ["dave@example.test"], body)[0] == 250
        assert b"hello dave" in srv.wait_for(lambda: srv.messages("dave@example.test"))[0]
    finally:
        srv.stop()


def test_reload_rebuilds_the_delivery_side_too(tmp_path):
    """Every part geosmtp.parts.build() makes is taken whole on SIGHUP: the relay (a
    smarthost appears: deferred mail goes there at its next attempt), the router's local
    domains and mailboxes, the sub-address delimiter."""
    from tests.support.fakemx import FakeMX, pick_port

    host = "127.0.0.61"
    smart = FakeMX(host, pick_port([host]), name="smart.invalid").start()
    srv = ServerProcess(tmp_path / "r", {"log": {"level": "INFO"}, "queue": {"retry_schedule": ["1s"]}}).start()
    try:
        with connect(srv.port, source="127.0.0.2") as c:  # a trusted network: may relay
            send_message(c, "me@example.test", ["far@remote.test"], b"Subject: first\r\n\r\nbody")
        srv.wait_for(lambda: "to=<far@remote.test>" in srv.log() and "status=deferred" in srv.log())
        with connect(srv.port) as c:
            c.code("MAIL FROM:<x@remote.test>")
            assert rcpts(c, ["alice+tag@example.test", "alice-tag@example.test"]) == ["250 2.1.5", "550 5.1.1"]
        srv.config["relay"].update(smarthost=f"{host}:{smart.port}")
        srv.config["local"].update(recipient_delimiter="-", domains=srv.config["local"]["domains"] + ["new.test"],
                                   users=srv.config["local"]["users"] + ["dan@new.test"])
        rewrite(srv)
        reloaded(srv)
        with connect(srv.port) as c:
            c.code("MAIL FROM:<x@remote.test>")
            assert rcpts(c, ["alice+tag@example.test", "alice-tag@example.test"]) == ["550 5.1.1", "250 2.1.5"]
        with connect(srv.port, source="127.0.0.2") as c:
            send_message(c, "me@example.test", ["near@remote.test", "dan@new.test"], b"Subject: second\r\n\r\nb")
        # the new relay takes the new message now and the deferred one at its next attempt
        # (a second later); the new local domain is delivered locally
        msgs = smart.wait_for_messages(2, timeout=40)
        assert sorted(r for m in msgs for r in m.rcpt_tos) == ["far@remote.test", "near@remote.test"]
        srv.wait_for(lambda: srv.messages("dan@new.test"))
    finally:
        srv.stop()
        smart.stop()
