"""The Redis connection of one process ([redis]), and the one rule every use of it follows
when Redis is down or slow.

A process makes its client when its Server is built, so a worker (an exec'd process, never
a fork of the master) has connections of its own. Commands go through redis-py over
gevent's sockets (monkey-patched): a BlockingConnectionPool of `pool_size` connections,
whose queue is gevent's once threading is patched, so a greenlet waits for a free
connection at most `timeout`; every connect and every read has its socket timeout. A
connection found broken is retried once on a fresh one (Redis restarted); a timeout is
not retried.

Redis.call(use, fn, *args) runs one command (or script) and turns any failure into
RedisDown, counted in geosmtp_redis_errors{use} and logged at most once a minute. After a
failure the process leaves Redis alone for RETRY_AFTER seconds (calls fail at once, so an
outage costs no session a timeout per command), then tries again: when Redis is back it is
used again, without a restart. What a failure means is each use's decision (limits: the
[redis] on_redis_error; greylisting: its check's on_error; the DNS cache: a miss).

Redis.dirty(writer) is for writes nobody waits for (events counted after their 250,
connections opened or closed): a writer (redislimits' views) keeps what it has to write,
coalesced per key, and says it has some; every BATCH_DELAY seconds (or as soon as
BATCH_MAX events wait) the store asks each writer for its commands and sends them all in
one pipeline, so a busy process pays one round trip for many, and each command's answer
(or the failure) goes back to the writer: the views learn the shared counts from it.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

import gevent.lock
import redis
from loguru import logger
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from geosmtp import metrics

RETRY_AFTER = 1.0  # seconds a process leaves Redis alone after a failure
BATCH_DELAY = 0.005  # writes nobody waits for go out together this often
BATCH_MAX = 500  # ... or as soon as this many wait
LOG_EVERY = 60.0  # at most one "Redis is down" line a minute


class RedisDown(Exception):
    """Redis did not answer (refused, timed out, or an error reply); the text says how."""


# one write of a batch: the script, its keys and args, and what to call with its answer
# (the reply, or an Exception when it failed)
Command = tuple[object, list, list, Callable[[object], None]]


class Writer(Protocol):
    use: str  # names the writer in geosmtp_redis_errors

    def drain(self) -> list[Command]:
        """What to write now (what is waiting is then in flight, no longer waiting)."""


class RedisStore:
    """A process's Redis: keys under one prefix, scripts, and calls under the outage rule."""

    def __init__(self, client: redis.Redis, prefix: str, where: str, pool_size: int = 32,
                 timeout: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.prefix = prefix
        self.where = where  # for logs: the URL without its password, or the sentinel master
        self.clock = clock
        self.timeout = timeout  # the longest wait for a free connection
        # the sentinel pool does not block when full: this bounds the calls in flight the same
        self._gate = gevent.lock.BoundedSemaphore(pool_size)
        self._down_until = 0.0
        self._logged_at = -LOG_EVERY
        self._down = False
        self._writers: dict[int, Writer] = {}
        self._waiting = 0  # events noted by dirty() since the last flush
        self._flusher: gevent.Greenlet | None = None

    def key(self, kind: str, text: str) -> str:
        """A key for `text` of any length or content: a hash, so hostile input (addresses,
        names) neither grows keys nor reaches into another kind's."""
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return f"{self.prefix}{kind}:{digest}"

    def script(self, source: str):
        """A Lua script run by EVALSHA (loaded again when Redis answers NOSCRIPT)."""
        return self.client.register_script(source)

    def call(self, use: str, fn: Callable, *args, **kwargs):
        """fn(*args) against Redis, or RedisDown; `use` names the caller in the metric."""
        now = self.clock()
        if now < self._down_until:
            metrics.REDIS_ERRORS.labels(use).inc()
            raise RedisDown("not retried yet after a failure")
        try:
            if not self._gate.acquire(timeout=self.timeout):
                raise redis.ConnectionError("no connection free in the pool")
            try:
                result = fn(*args, **kwargs)
            finally:
                self._gate.release()
        except (redis.RedisError, OSError) as exc:
            self._failed(use, exc)
            raise RedisDown(f"{type(exc).__name__}: {exc}") from None
        if self._down:
            self._down = False
            logger.info("redis {}: answering again", self.where)
        return result

    def dirty(self, writer: Writer) -> None:
        """`writer` has one more event to write: its commands go with the next batch
        (module docstring)."""
        self._writers[id(writer)] = writer
        self._waiting += 1
        if self._waiting >= BATCH_MAX:
            self.flush()
        elif self._flusher is None:
            self._flusher = gevent.spawn_later(BATCH_DELAY, self.flush)

    def flush(self) -> None:
        """Send the waiting writes now, in one pipeline; each answer goes to its writer."""
        writers, self._writers, self._waiting = list(self._writers.values()), {}, 0
        if self._flusher is not None and self._flusher is not gevent.getcurrent():
            self._flusher.kill(block=False)
        self._flusher = None
        batch = [command for writer in writers for command in writer.drain()]
        if not batch:
            return
        answered = []

        def send():
            pipe = self.client.pipeline(transaction=False)
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results = pipe.execute(raise_on_error=False)
            again = [n for n, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
            if again:  # a Redis that restarted empty: load the scripts, run those once more
                pipe = self.client.pipeline(transaction=False)
                for n in again:
                    script, keys, args, _ = batch[n]
                    pipe.eval(script.script, len(keys), *keys, *args)
                for n, result in zip(again, pipe.execute(raise_on_error=False)):
                    results[n] = result
            answered.append(True)
            for (*_, done), result in zip(batch, results):
                done(result)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed

        try:
            self.call(writers[0].use, send)
        except RedisDown as exc:
            if not answered:
                for *_, done in batch:
                    done(exc)

    def _failed(self, use: str, exc: Exception) -> None:
        now = self.clock()
        self._down_until = now + RETRY_AFTER
        self._down = True
        metrics.REDIS_ERRORS.labels(use).inc()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            logger.warning("redis {}: {} failed ({}: {}); retried every {:g}s, this logged once a minute",
                           self.where, use, type(exc).__name__, exc, RETRY_AFTER)

    def close(self) -> None:
        self.flush()
        self.client.close()


def redact_url(url: str) -> str:
    """`redis://user:secret@host/0` -> `redis://user:***@host/0`: a URL as a log line may show it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def connect(url: str, *, sentinel: list[tuple[str, int]] = (), sentinel_master: str = "geosmtp",
            tls: bool = False, ca_file: str | None = None, connect_timeout: float = 0.5,
            timeout: float = 0.5, pool_size: int = 32, prefix: str = "geosmtp:") -> RedisStore:
    """The client [redis] describes (geosmtp.parts passes its keys); nothing is connected
    until the first call. With `sentinel`, the master's address comes from the Sentinels
    and `url` gives only the scheme, user, password and database."""
    options = dict(
        socket_timeout=timeout, socket_connect_timeout=connect_timeout,
        # a broken connection once more on a new one (Redis restarted); never a timeout
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )
    tls = tls or url.startswith("rediss://")
    if tls:
        options.update(ssl_cert_reqs="required", ssl_ca_certs=ca_file)
        url = "rediss://" + url.removeprefix("redis://").removeprefix("rediss://")
    if sentinel:
        parsed = redis.connection.parse_url(url)
        sentinels = Sentinel(list(sentinel), socket_timeout=timeout, socket_connect_timeout=connect_timeout)
        client = sentinels.master_for(
            sentinel_master, max_connections=pool_size, ssl=tls,
            username=parsed.get("username"), password=parsed.get("password"), db=parsed.get("db", 0),
            **options)
        where = f"sentinel master {sentinel_master!r}"
    else:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=timeout, **options)
        client = redis.Redis(connection_pool=pool)
        where = redact_url(url)
    return RedisStore(client, prefix, where, pool_size, timeout)
