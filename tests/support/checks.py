"""A geosmtp server with inbound checks, for end-to-end tests: the fake DNS as its resolver
and an extra MX listener ("mx") behind a trusted balancer, so a test can be any client
address (IPv4 or IPv6) from loopback by sending a PROXY v1 header first.

    dns = FakeDNS().start()
    srv = checks_server(tmp_path, dns, [{"type": "spf"}]).start()
    c = client_from(srv, "192.0.2.10", ehlo="mail.sender.test")   # greeted, EHLO done
"""
from __future__ import annotations

from pathlib import Path

from tests.support.e2e import greeted
from tests.support.server import ServerProcess, free_port
from tests.support.smtp import RawClient

BALANCER = "127.0.0.1"


def checks_server(root: Path, dns, checks: list[dict], overrides: dict | None = None) -> ServerProcess:
    """A ServerProcess (not started) whose [[check]] tables are `checks`, asking `dns`."""
    overrides = dict(overrides or {})
    relay = {"dns_servers": [dns.address], "dns_timeout": 2, **overrides.pop("relay", {})}
    srv = ServerProcess(root, {"check": checks, "relay": relay, **overrides})
    srv.mx_port = free_port()
    srv.config["listener"].append({"name": "mx", "address": f"127.0.0.1:{srv.mx_port}", "mode": "smtp",
                                   "proxy_protocol": True, "proxy_trusted": [f"{BALANCER}/32"],
                                   **(overrides.get("listeners", {}).get("mx", {}))})
    from tests.support import toml
    srv.config_path.write_text(toml.dumps(srv.config))
    return srv


def proxy_v1(ip: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in ip else "TCP4"
    ours = "::1" if ":" in ip else "127.0.0.1"
    return f"PROXY {family} {ip} {ours} {port} 25\r\n".encode()


def client_from(srv: ServerProcess, ip: str, ehlo: str | None = "client.test", timeout: float = 10.0,
                expect_greeting: bool = True) -> RawClient:
    """A client on the "mx" listener that the server sees as `ip`: greeted, EHLO done
    (ehlo=None: not sent; expect_greeting=False: the greeting is left unread)."""
    c = RawClient(srv.mx_port, timeout=timeout, source=BALANCER)
    c.send(proxy_v1(ip))
    return greeted(c, ehlo) if expect_greeting else c
