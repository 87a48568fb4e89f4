"""Limits, greylist triplets and DNS answers in a real redis-server the tests start
(tests/support/redis.py): geosmtp.redislimits, geosmtp.redisclient, the Redis greylist
store and geosmtp.relay.dnscache."""
import math
import subprocess
import sys
import textwrap
import time

import dns.resolver
import gevent
import pytest

from geosmtp import metrics, redisclient
from geosmtp.checks.greylist import GreyEntry, RedisGreylistStore
from geosmtp.ratelimit import MemoryLimiter
from geosmtp.redisclient import RedisDown, connect, redact_url
from geosmtp.redislimits import RedisConnections, RedisLimiter
from geosmtp.relay.dnscache import SharedCache
from geosmtp.relay.mx import MXResolver, make_resolver
from tests.support.fakedns import FakeDNS
from tests.support.redis import RedisServer
from tests.support.server import free_port

HOUR = 3600.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def store(server, request):
    """A client with a prefix of this test's own, on a Redis that answers."""
    if server.proc.poll() is not None:
        server.start()
    s = connect(server.url, prefix=f"t{abs(hash(request.node.name)) % 10**8}:")
    yield s
    s.close()


def errors(use: str) -> float:
    return metrics.REDIS_ERRORS.labels(use)._value.get()


def test_counts_as_the_memory_limiter_does(store):
    redis_limiter, memory = RedisLimiter(store), MemoryLimiter()
    for lim in (redis_limiter, memory):
        for _ in range(3):
            lim.add("ip:192.0.2.1", HOUR)
        lim.add("ip:192.0.2.2", HOUR)
        lim.add("ip:192.0.2.1", 60.0)
    store.flush()  # adds go out in batches (RedisStore.later)
    for key, window in [("ip:192.0.2.1", HOUR), ("ip:192.0.2.2", HOUR), ("ip:192.0.2.1", 60.0), ("user:x", HOUR)]:
        # the same fixed windows (the first of an hour has no previous one): the same counts
        assert redis_limiter.count(key, window) == pytest.approx(memory.count(key, window)), key


def test_the_previous_window_fades_on_redis_time(store):
    """Two fixed windows of 1 s on Redis's clock: events of the last window count for the
    part of it that still overlaps, and nothing two windows on."""
    lim = RedisLimiter(store)
    t = store.client.time()
    now = t[0] + t[1] / 1e6
    time.sleep(math.ceil(now) - now + 0.05)  # just after a window starts
    for _ in range(10):
        lim.add("k", 1.0)
    store.flush()
    assert lim.count("k", 1.0) == pytest.approx(10)
    time.sleep(1.25)  # the next window, ~30 % in: 7 of the 10 (the share rounded up)
    faded = lim.count("k", 1.0)
    assert 5 < faded < 10 and faded == int(faded)
    time.sleep(1.0)
    assert lim.count("k", 1.0) == 0


def test_keys_are_hashed_and_expire(store):
    """Hostile keys (long, odd bytes) become fixed-size hashed keys, each with an expiry of
    two windows, so the key space is bounded by what expires."""
    lim = RedisLimiter(store)
    for i in range(50):
        lim.add(f"user:{'x' * 500}{i}\r\n\0@example.test", 60.0)
    store.flush()
    keys = store.client.keys(store.prefix + "*")
    assert len(keys) == 50
    assert {len(k) for k in keys} == {len(store.prefix) + len("rate:") + 32}
    assert all(0 < store.client.ttl(k) <= 121 for k in keys)
    # counting alone writes nothing
    lim.count("never-added", 60.0)
    assert len(store.client.keys(store.prefix + "*")) == 50


def test_the_script_is_loaded_again_after_noscript(store):
    lim = RedisLimiter(store)
    lim.add("k", HOUR)
    store.flush()
    store.client.script_flush()  # as a restarted or failed-over Redis has no scripts
    lim.add("k", HOUR)  # in a batch
    store.flush()
    store.client.script_flush()
    assert lim.count("k", HOUR) == 2  # alone


def test_writes_nobody_waits_for_go_out_together(store):
    """add() and leave() wait for the next batch: one round trip for all of them, sent
    BATCH_DELAY later by a greenlet (or at once when BATCH_MAX wait), coalesced per key.
    `other` is another process, asking Redis every time (refresh 0)."""
    lim, other = RedisLimiter(store), RedisLimiter(store)
    for _ in range(20):
        lim.add("k", HOUR)
    assert other.count("k", HOUR) == 0  # not yet sent
    gevent.sleep(redisclient.BATCH_DELAY * 4)
    assert other.count("k", HOUR) == 20
    for _ in range(redisclient.BATCH_MAX):
        lim.add("k", HOUR)
    assert other.count("k", HOUR) == 20 + redisclient.BATCH_MAX


def test_redis_down_allows_or_defers_counts_and_logs_once(server, store):
    allow, defer = RedisLimiter(store, "allow"), RedisLimiter(store, "defer")
    allow.add("k", HOUR)
    store.flush()
    before = errors("limits")
    server.kill()
    started = time.monotonic()
    assert allow.count("k", HOUR) == 0
    assert defer.count("k", HOUR) == math.inf  # as over any limit: the session answers 4xx
    defer.add("k", HOUR)
    store.flush()  # dropped, never raised
    assert time.monotonic() - started < 0.5  # refused at once, then not tried for a second
    assert errors("limits") - before == 3
    server.start()  # empty: no persistence
    time.sleep(redisclient.RETRY_AFTER + 0.1)
    allow.add("k", HOUR)
    store.flush()
    assert allow.count("k", HOUR) == 1  # back, without a new client


def test_a_slow_redis_is_a_failure_within_the_timeout(server, store):
    slow = connect(server.url, timeout=0.2, prefix=store.prefix)
    lim = RedisLimiter(slow, "defer")
    blocker = server.stall(1)
    try:
        time.sleep(0.1)
        started = time.monotonic()
        assert lim.count("k", HOUR) == math.inf
        assert time.monotonic() - started < 0.5
    finally:
        assert blocker.recv(10) == b"+OK\r\n"
        blocker.close()
        slow.close()


def test_connections_are_counted_across_processes(store):
    """Two counters (two workers, or two nodes) share one limit per client."""
    a, b = RedisConnections(store, lease=30), RedisConnections(store, lease=30)
    assert a.enter("192.0.2.1", 3) and a.enter("192.0.2.1", 3)
    assert b.enter("192.0.2.1", 3)
    assert not b.enter("192.0.2.1", 3) and not a.enter("192.0.2.1", 3)
    assert b.enter("192.0.2.9", 3)  # another client
    a.leave("192.0.2.1")
    store.flush()
    assert b.enter("192.0.2.1", 3)
    assert a.local.open == {"192.0.2.1": 1} and b.local.open == {"192.0.2.1": 2, "192.0.2.9": 1}


def test_a_dead_process_stops_counting_within_its_lease(store):
    dead, alive = RedisConnections(store, lease=1), RedisConnections(store, lease=1)
    assert dead.enter("192.0.2.1", 2) and dead.enter("192.0.2.1", 2)
    assert not alive.enter("192.0.2.1", 2)
    time.sleep(1.3)  # `dead` never renews: its lease lapses
    assert alive.enter("192.0.2.1", 2) and alive.enter("192.0.2.1", 2)
    assert not alive.enter("192.0.2.1", 2)


def test_renewal_keeps_long_sessions_and_refills_an_empty_redis(store):
    a, b = RedisConnections(store, lease=1), RedisConnections(store, lease=30)
    a.start()
    try:
        assert a.enter("192.0.2.1", 1)
        gevent.sleep(1.5)  # past the first lease: renewed meanwhile (by a greenlet)
        assert not b.enter("192.0.2.1", 1)
        store.client.flushdb()  # Redis restarted empty
        gevent.sleep(0.6)  # a renewal (every third of the lease) writes a's count again
        assert not b.enter("192.0.2.1", 1)
    finally:
        a.close()
    assert b.enter("192.0.2.1", 1)  # a gave its lease back


def test_connections_when_redis_is_down(server, store):
    allow, defer = RedisConnections(store, on_error="allow"), RedisConnections(store, on_error="defer")
    server.kill()
    assert allow.enter("192.0.2.1", 2) and allow.enter("192.0.2.1", 2)
    assert not allow.enter("192.0.2.1", 2)  # this process's own count still holds
    assert not defer.enter("192.0.2.1", 2)
    allow.leave("192.0.2.1")
    assert allow.local.open == {"192.0.2.1": 1}


def test_greylist_store(store):
    grey = RedisGreylistStore(store)
    assert grey.get("127.0.0.0/24 1:a b") is None
    grey.put("127.0.0.0/24 1:a b", GreyEntry(1700000000.25), 60)
    assert grey.get("127.0.0.0/24 1:a b") == GreyEntry(1700000000.25)
    grey.put("127.0.0.0/24 1:a b", GreyEntry(1700000000.25, 1700000300.5), 1)
    assert grey.get("127.0.0.0/24 1:a b") == GreyEntry(1700000000.25, 1700000300.5)
    (key,) = store.client.keys(store.prefix + "*")
    assert b"127.0.0.0" not in key and store.client.ttl(key) == 1
    time.sleep(1.1)
    assert grey.get("127.0.0.0/24 1:a b") is None


def test_greylist_store_raises_when_redis_is_down(server, store):
    server.kill()
    with pytest.raises(RedisDown):  # the engine applies the check's on_error
        RedisGreylistStore(store).get("k")


def test_dns_answers_are_shared_with_their_ttl(store):
    """Two resolvers (two nodes) with the shared cache: the second asks Redis, not DNS, and
    gets the answer with the expiration the first had (its TTL not restarted)."""
    with FakeDNS() as fake:
        fake.mx("remote.test", [(10, "mx.remote.test")], ttl=300)
        fake.a("mx.remote.test", "192.0.2.25", ttl=120)
        first, second = make_resolver([("127.0.0.1", fake.port)], 2), make_resolver([("127.0.0.1", fake.port)], 2)
        first.cache, second.cache = SharedCache(store), SharedCache(store)
        hosts = MXResolver(first).hosts("remote.test")
        asked = list(fake.queries)
        assert MXResolver(second).hosts("remote.test") == hosts
        assert fake.queries == asked  # nothing more asked of DNS
        key = (dns.name.from_text("mx.remote.test"), dns.rdatatype.A, dns.rdataclass.IN)
        assert second.cache.get(key).expiration == pytest.approx(first.cache.get(key).expiration, abs=0.01)
        assert 0 < store.client.ttl(store.key("dns", "mx.remote.test. 1 1")) <= 120
        # a name that does not exist: cached (and shared) as dnspython caches NXDOMAIN
        with pytest.raises(dns.resolver.NXDOMAIN):
            first.resolve("nowhere.test", "MX")
        asked = len(fake.queries)
        with pytest.raises(dns.resolver.NXDOMAIN):
            second.resolve("nowhere.test", "MX")
        assert len(fake.queries) == asked


def test_dns_cache_asks_dns_when_redis_is_down(server, store):
    with FakeDNS() as fake:
        fake.a("mx.remote.test", "192.0.2.25", ttl=120)
        resolver = make_resolver([("127.0.0.1", fake.port)], 2)
        resolver.cache = SharedCache(store)
        server.kill()
        assert MXResolver(resolver).addresses("mx.remote.test") == ("192.0.2.25",)


def test_urls_are_logged_without_their_password():
    assert redact_url("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redact_url("rediss://geo:s3cret@redis.example:6380/1") == "rediss://geo:***@redis.example:6380/1"
    assert redact_url("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"


def test_password_and_sentinel(tmp_path):
    """A Redis with a password, found through a real Sentinel."""
    with RedisServer(tmp_path / "r", password="pw-123") as r:
        port = r.sentinel("geosmtp")
        s = connect("redis://:pw-123@unused/0", sentinel=[("127.0.0.1", port)], sentinel_master="geosmtp")
        try:
            lim = RedisLimiter(s, "defer")
            lim.add("k", HOUR)
            s.flush()
            assert lim.count("k", HOUR) == 1
        finally:
            s.close()
        bad = connect(r.url.replace("pw-123", "wrong"))
        assert RedisLimiter(bad, "defer").count("k", HOUR) == math.inf  # refused: a failure like any
        assert "pw-123" not in bad.where and "wrong" not in bad.where


def test_the_blocking_pool_under_gevent(server):
    """Under monkey.patch_all (as geosmtp runs), 40 greenlets share a pool of 2: they wait
    for a free connection instead of failing, and no more than 2 are ever opened."""
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import gevent
        from geosmtp.redisclient import connect
        from geosmtp.redislimits import RedisLimiter
        store = connect({server.url!r}, pool_size=2, timeout=2, prefix="pool:")
        lim = RedisLimiter(store, "defer")
        def work():
            for _ in range(10):
                lim.add("k", 60.0)
                assert lim.count("k", 60.0) < 1000  # 400 of these wait for their answer
        gevent.joinall([gevent.spawn(work) for _ in range(40)], raise_error=True, timeout=20)
        store.flush()
        print(lim.count("k", 60.0), len(store.client.connection_pool._connections))
    """)
    if server.proc.poll() is not None:
        server.start()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["400.0", "2"]


# -- the view ([redis] refresh) -------------------------------------------------------------
REFRESH = 0.3


def scripts_run(store) -> int:
    """Scripts Redis ran since the last CONFIG RESETSTAT: every command of the limits is one,
    so this counts the commands sent (and the commands inside them count apart)."""
    stats = store.client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def reset_stats(store) -> None:
    store.flush()
    store.client.config_resetstat()


def test_a_view_counts_its_own_events_at_once_and_the_others_within_refresh(store):
    a, b = RedisLimiter(store, refresh=REFRESH), RedisLimiter(store, refresh=REFRESH)  # two processes
    for _ in range(3):
        a.add("ip:192.0.2.1", HOUR)
    assert a.count("ip:192.0.2.1", HOUR) == 3  # its own at once (not yet sent: they go with this)
    assert b.count("ip:192.0.2.1", HOUR) == 3  # b asks: a cold key
    a.add("ip:192.0.2.1", HOUR)
    a.add("ip:192.0.2.1", HOUR)
    store.flush()
    b.add("ip:192.0.2.1", HOUR)
    assert b.count("ip:192.0.2.1", HOUR) == 4  # its view, plus its own event
    asked = time.monotonic()
    while b.count("ip:192.0.2.1", HOUR) == 4:  # until b asks again: within REFRESH
        assert time.monotonic() - asked < REFRESH + 0.2
        time.sleep(0.02)
    assert b.count("ip:192.0.2.1", HOUR) == 6
    store.flush()
    assert RedisLimiter(store).count("ip:192.0.2.1", HOUR) == 6  # Redis has every event once


def test_a_write_refreshes_the_view_of_its_key(store):
    """What a batch writes comes back as the shared count: a key a process writes stays as
    fresh as its batches."""
    a, b = RedisLimiter(store, refresh=60), RedisLimiter(store, refresh=60)
    assert a.count("k", HOUR) == 0
    for _ in range(4):
        b.add("k", HOUR)
    store.flush()
    assert a.count("k", HOUR) == 0  # fresh for a minute
    a.add("k", HOUR)
    store.flush()
    assert a.count("k", HOUR) == 5


def test_a_new_client_costs_one_round_trip(store):
    """Entering a client unknown to the view reads its messages-per-hour count with it (one
    EVALSHA); within refresh the next connections and counts of that client ask nothing,
    and what they change goes out in one batch."""
    limiter = RedisLimiter(store, refresh=60)
    conns = RedisConnections(store, refresh=60, prefetch=lambda key: (limiter, f"ip:{key}", HOUR))
    limiter.add("ip:192.0.2.1", HOUR)
    store.flush()
    assert conns.enter("198.51.100.1", 5)
    conns.leave("198.51.100.1")
    store.flush()  # every script loaded: EVALSHA alone from now on
    reset_stats(store)
    assert conns.enter("192.0.2.1", 5)
    assert limiter.count("ip:192.0.2.1", HOUR) == 1  # prefetched
    assert scripts_run(store) == 1
    for _ in range(3):
        assert conns.enter("192.0.2.1", 5)
        assert limiter.count("ip:192.0.2.1", HOUR) >= 1
        limiter.add("ip:192.0.2.1", HOUR)
        conns.leave("192.0.2.1")
    assert scripts_run(store) == 1  # nothing waited for
    store.flush()
    assert scripts_run(store) == 3  # one write per key: the client, its count
    assert RedisLimiter(store).count("ip:192.0.2.1", HOUR) == 4
    assert store.client.hget(conns._hash("192.0.2.1"), conns.id) == b"1"


def test_views_are_bounded(store):
    limiter = RedisLimiter(store, refresh=60, max_keys=50)
    conns = RedisConnections(store, refresh=60, max_keys=50)
    for i in range(300):
        limiter.add(f"user:{i}", HOUR)
        assert limiter.count(f"user:{i}", HOUR) == 1
        assert conns.enter(f"192.0.2.{i % 250}", 5)
    assert len(limiter.view.entries) == len(conns.view.entries) == 50
    store.flush()  # events of forgotten keys are still written
    assert {limiter.count(f"user:{i}", HOUR) for i in range(300)} == {1}
    assert len(limiter.view.dirty) == len(conns.view.dirty) == 0


def test_connection_views_share_the_limit_within_refresh(store):
    """A fresh view lets a client in (the bound: what others let in since it heard), an old
    one asks; a refusal is always Redis's, so closed connections never refuse anyone."""
    a, b, c = (RedisConnections(store, refresh=REFRESH) for _ in range(3))  # three processes
    assert a.enter("192.0.2.1", 3)
    store.flush()
    assert b.enter("192.0.2.1", 3)  # b asks: a holds 1
    assert c.enter("192.0.2.1", 3)  # c asks: a and b hold 2
    store.flush()
    assert b.enter("192.0.2.1", 3)  # b's view (a holds 1) lets a fourth in: the view's bound
    store.flush()
    time.sleep(REFRESH)
    assert not b.enter("192.0.2.1", 3)  # its view old: Redis counts 4
    a.leave("192.0.2.1")
    c.leave("192.0.2.1")
    store.flush()
    assert b.enter("192.0.2.1", 3)  # its fresh view says full: Redis is asked, and says 2
    held = {k: int(v) for k, v in store.client.hgetall(a._hash("192.0.2.1")).items()}
    assert held == {b.id.encode(): 3}


def test_views_when_redis_is_down_and_back(server, store):
    limiter = RedisLimiter(store, "allow", refresh=REFRESH)
    deferring = RedisLimiter(store, "defer", refresh=REFRESH)
    conns = RedisConnections(store, refresh=REFRESH)
    limiter.add("k", HOUR)
    assert limiter.count("k", HOUR) == 1 and deferring.count("k", HOUR) == 1
    assert conns.enter("192.0.2.1", 3)
    server.kill()
    assert limiter.count("k", HOUR) == 1  # the view, while fresh
    limiter.add("k", HOUR)
    assert conns.enter("192.0.2.1", 3)  # the view too; its write fails
    store.flush()
    time.sleep(REFRESH + 0.05)
    assert limiter.count("k", HOUR) == 0  # old: Redis is asked, and "allow" applies
    assert deferring.count("k", HOUR) == math.inf
    assert conns.enter("192.0.2.1", 3)  # counted here only
    server.start()  # empty
    time.sleep(redisclient.RETRY_AFTER + 0.1)
    limiter.add("k", HOUR)
    assert limiter.count("k", HOUR) == 1  # back: the event before the restart went with it
    assert not conns.enter("192.0.2.1", 3)  # this process's own count holds
    conns.leave("192.0.2.1")
    store.flush()  # the write says all this process holds
    assert store.client.hget(conns._hash("192.0.2.1"), conns.id) == b"2"
    other = RedisConnections(store)
    assert other.enter("192.0.2.1", 3) and not other.enter("192.0.2.1", 3)


def test_clients_entering_at_once_under_gevent(server):
    """Twelve greenlets enter one client unknown to the view at once (each waits for
    Redis, all sending the same count of ours): exactly the limit gets in."""
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import gevent
        from geosmtp.redisclient import connect
        from geosmtp.redislimits import RedisConnections
        store = connect({server.url!r}, pool_size=12, timeout=2, prefix="burst:")
        conns = RedisConnections(store, refresh=60)
        got = gevent.joinall([gevent.spawn(conns.enter, "192.0.2.1", 3) for _ in range(12)], timeout=20)
        store.flush()
        print(sum(g.value for g in got), conns.local.open["192.0.2.1"],
              int(store.client.hget(conns._hash("192.0.2.1"), conns.id)))
    """)
    if server.proc.poll() is not None:
        server.start()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "3", "3"]


def test_redis_py_uses_hiredis():
    """requirements.txt pins hiredis: redis-py packs and parses in C (half a call's CPU)."""
    import redis.utils

    assert redis.utils.HIREDIS_AVAILABLE
    store = connect("redis://127.0.0.1:1/0")
    assert type(store.client.connection_pool.make_connection()._command_packer).__name__ == "HiredisRespSerializer"


def test_tls_to_a_redis_that_speaks_only_tls(tmp_path):
    """rediss:// (and tls = true) to a real redis-server serving TLS with a certificate of a
    CA made here: counted there with `ca_file`; refused with a CA that did not sign it
    (a failure like any other: on_error applies, nothing is sent in the clear)."""
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem", "other.pem")}
    cert.cert_chain_pems[0].write_to_path(files["cert.pem"])
    cert.private_key_pem.write_to_path(files["key.pem"])
    ca.cert_pem.write_to_path(files["ca.pem"])
    other.cert_pem.write_to_path(files["other.pem"])
    tls_port = free_port()
    extra = (f"tls-port {tls_port}\ntls-cert-file {files['cert.pem']}\ntls-key-file {files['key.pem']}\n"
             f"tls-ca-cert-file {files['ca.pem']}\ntls-auth-clients no\n")
    with RedisServer(tmp_path / "r", extra=extra):
        for url, kw in ((f"rediss://127.0.0.1:{tls_port}/0", {}), (f"redis://127.0.0.1:{tls_port}/0", {"tls": True})):
            store = connect(url, ca_file=str(files["ca.pem"]), **kw)
            try:
                lim = RedisLimiter(store, "defer")
                lim.add("tls", HOUR)
                store.flush()
                assert lim.count("tls", HOUR) >= 1
            finally:
                store.close()
        untrusted = connect(f"rediss://127.0.0.1:{tls_port}/0", ca_file=str(files["other.pem"]))
        try:
            assert RedisLimiter(untrusted, "defer").count("tls", HOUR) == math.inf
        finally:
            untrusted.close()
