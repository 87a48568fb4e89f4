"""Two geosmtp nodes, each with workers = 2, behind a real HAProxy (round robin, PROXY v2),
sharing one real Redis (issue 17): the hourly message limit and the connection limit hold
for the fleet, a greylisted triplet retried through the other node passes after the delay,
an MX answer is asked of DNS once for both nodes, and a Redis killed mid-run costs no 5xx and
no message, and is used again once it is back, without restarting geosmtp.

Every test's client comes from its own loopback address (HAProxy passes it on), so each
counts alone; 127.0.0.2 is the trusted network that may relay.
"""
from __future__ import annotations

import time

import pytest

from geosmtp import replies
from tests.support.e2e import delivered_ids, expect, greeted, queue_id
from tests.support.fakedns import FakeDNS
from tests.support.fakemx import FakeMX, pick_port
from tests.support.haproxy import LOCAL_HEADER, HAProxy
from tests.support.redis import RedisServer
from tests.support.server import ServerProcess, children
from tests.support.smtp import RawClient

PER_HOUR = 5  # messages_per_hour_per_ip
PER_IP = 3  # max_connections_per_ip
MX = "127.0.0.10"
GREY_DELAY = 2
REFRESH = 0.5  # [redis] refresh, the default: how old a process's view of a count may be
# an event counted after a 250 reaches Redis with its process's next batch (5 ms later, and
# later on a machine this busy), and the other processes see it when their view is older
# than REFRESH: the next message of a client waits that long
BATCHED = REFRESH + 0.3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(root / "redis").start()
    dns = FakeDNS().start()
    mx = FakeMX(MX, pick_port([MX]), name="mx1.remote.test").start()
    dns.mx("remote.test", [(10, "mx1.remote.test")], ttl=300)
    dns.a("mx1.remote.test", MX, ttl=300)
    nodes, balancer = [], None
    try:
        for n in range(2):
            node = ServerProcess(root / f"node{n}", {
                "server": {"workers": 2},
                "listeners": {"smtp": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"]}},
                "limits": {"messages_per_hour_per_ip": PER_HOUR, "max_connections_per_ip": PER_IP},
                "redis": {"url": redis.url, "timeout": "0.5s", "refresh": f"{REFRESH}s"},
                "relay": {"dns_servers": [dns.address], "port": mx.port},
                # every client but those of the greylisting test is let through at once
                "check": [{"type": "greylist", "delay": f"{GREY_DELAY}s", "networks": ["127.0.0.0/25"]}],
                "log": {"level": "INFO"},
            })
            node.probe_prefix = LOCAL_HEADER
            nodes.append(node.start(timeout=60))  # 6 processes on a shared 2-core machine
        for node in nodes:  # start() returns when the first worker answers: wait for both
            node.wait_for(lambda: len(children(node.proc.pid)) == 2 and node.log().count(
                f"listening on 127.0.0.1:{node.port}") == 2, timeout=60)
        balancer = HAProxy(root / "haproxy", [node.port for node in nodes]).start()
        yield balancer, nodes, redis, dns, mx
    finally:
        if balancer is not None:
            balancer.stop()
        for node in nodes:
            node.stop()
        mx.stop()
        dns.stop()
        redis.stop()


def client(balancer: HAProxy, source: str) -> RawClient:
    return greeted(RawClient(balancer.port, timeout=10, source=source))


def settled_client(balancer: HAProxy, source: str) -> RawClient:
    """A greeted client once the fleet no longer counts the client's closed connections:
    a process's leave reaches Redis with its next batch, so on a loaded machine a client
    that reconnects at once may still meet 421 4.7.0 for a moment (bounded retries)."""
    for _ in range(50):
        c = RawClient(balancer.port, timeout=10, source=source)
        reply = c.reply()
        if reply[0] == 220:
            assert c.cmd("EHLO client.test")[0] == 250
            return c
        c.close()
        expect(reply, replies.TOO_MANY_FROM_YOU)
        time.sleep(0.1)
    raise AssertionError(f"{source} still refused as too many connections after 5 s")


def send(balancer: HAProxy, source: str, rcpt: str = "alice@example.test", sender: str = "x@remote.test"):
    """One message on a connection of its own: the reply to MAIL if it was refused, else to
    DATA. The connection ends with QUIT and the server's close, so that a loaded machine
    does not count it against the client's next one (max_connections_per_ip)."""
    with settled_client(balancer, source) as c:
        reply = c.cmd(f"MAIL FROM:<{sender}>")
        if reply[0] == 250:
            assert c.code(f"RCPT TO:<{rcpt}>") == "250 2.1.5"
            assert c.cmd("DATA")[0] == 354
            c.send(b"Subject: fleet\r\n\r\nhello\r\n.\r\n")
            reply = c.reply()
        assert c.cmd("QUIT")[0] == 221 and c.closed()
        return reply


def log_pids(node: ServerProcess, text: str) -> set[int]:
    """The processes (the log's pid column) that logged a line containing `text`."""
    return {int(line.split()[3]) for line in node.log().splitlines() if text in line}


def test_the_hourly_limit_holds_on_every_node_and_worker(fleet):
    balancer, nodes, *_ = fleet
    source = "127.0.0.3"
    for _ in range(PER_HOUR):
        queue_id(send(balancer, source))  # spread over both nodes by the round robin
    time.sleep(BATCHED)
    workers = {pid for node in nodes for pid in children(node.proc.pid)}
    refused_by: set[int] = set()
    for attempt in range(40):  # until each of the 4 workers has refused at least once
        expect(send(balancer, source), replies.RATE_LIMITED)
        refused_by = {pid for node in nodes for pid in log_pids(node, f"-> {replies.RATE_LIMITED}")}
        if refused_by >= workers:
            break
    # counted per worker, each would have let PER_HOUR through (4 x 5 messages)
    assert refused_by == workers, (refused_by, workers)


def test_the_connection_limit_holds_for_the_fleet(fleet):
    balancer, nodes, *_ = fleet
    source = "127.0.0.4"
    held = [client(balancer, source) for _ in range(PER_IP)]  # on both nodes
    time.sleep(BATCHED)  # every process's view of the client as old as REFRESH: it asks Redis
    try:
        with RawClient(balancer.port, timeout=10, source=source) as extra:
            expect(extra.reply(), replies.TOO_MANY_FROM_YOU)
        held.pop().close()
        nodes[0].wait_for(lambda: _can_connect(balancer, source), timeout=5)
    finally:
        for c in held:
            c.close()


def _can_connect(balancer: HAProxy, source: str) -> bool:
    with RawClient(balancer.port, timeout=10, source=source) as c:
        return c.reply()[0] == 220


def test_a_greylisted_triplet_passes_through_the_other_node(fleet):
    balancer, nodes, *_ = fleet
    source = "127.0.0.200"  # outside the greylist's exempt networks
    with client(balancer, source) as c:
        assert c.code("MAIL FROM:<grey@remote.test>") == "250 2.1.0"
        first = c.cmd("RCPT TO:<bob@example.test>")
        assert first[0] == 451 and "Greylisted" in first[1][0], first
    (first_node,) = [n for n in nodes if f"connect from [{source}]" in n.log()]
    time.sleep(GREY_DELAY + 0.2)
    qid = queue_id(send(balancer, source, rcpt="bob@example.test", sender="grey@remote.test"))
    (other,) = [n for n in nodes if n is not first_node]
    # " connect": not the "disconnect from" summary the session may have logged already
    assert other.log().count(f" connect from [{source}]") == 1  # the retry went through the other node
    other.wait_for(lambda: qid in delivered_ids(other, "bob@example.test"))


def test_an_mx_answer_is_asked_of_dns_once_for_the_fleet(fleet):
    balancer, nodes, _, dns, mx = fleet
    for n in range(2):  # round robin: one message through each node, each node's master delivers
        queue_id(send(balancer, "127.0.0.2", rcpt=f"user{n}@remote.test"))
        mx.wait_for_messages(n + 1, timeout=20)
    delivering = {node.root.name for node in nodes if "status=sent" in node.log()}
    assert delivering == {"node0", "node1"}
    assert dns.queries.count(("remote.test", "MX")) == 1
    assert dns.queries.count(("mx1.remote.test", "A")) == 1


def test_redis_killed_and_restarted_costs_no_5xx_and_no_message(fleet):
    balancer, nodes, redis, *_ = fleet
    queued: list[str] = []

    def burst(first: int, count: int) -> None:
        for i in range(first, first + count):  # each client once: no limit is reached
            reply = send(balancer, f"127.0.0.{i}")
            assert reply[0] == 250, reply
            queued.append(queue_id(reply))

    burst(20, 4)
    redis.kill()
    burst(24, 6)  # Redis down: on_redis_error = "allow"
    redis.start()  # empty (no persistence), on the same port
    time.sleep(1.2)  # geosmtp tries again a second after a failure
    burst(30, 4)
    delivered = lambda: {q for node in nodes for q in delivered_ids(node, "alice@example.test")}  # noqa: E731
    nodes[0].wait_for(lambda: set(queued) <= delivered(), timeout=20)
    assert any("redis redis://127.0.0.1" in node.log() and "failed" in node.log() for node in nodes)
    # shared counting is back: the fleet refuses a client past its limit again
    source = "127.0.0.40"
    for _ in range(PER_HOUR):
        queue_id(send(balancer, source))
    time.sleep(BATCHED)
    for _ in range(4):  # both nodes, by the round robin
        expect(send(balancer, source), replies.RATE_LIMITED)
    for node in nodes:  # no 5xx to anyone, from the start of the module
        assert "-> 5" not in node.log()
