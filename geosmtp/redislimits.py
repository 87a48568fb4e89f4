"""Rate and connection limits shared through Redis by every process of every node.

RedisLimiter is ratelimit.Limiter in one Lua script: the same two-fixed-window
approximation as MemoryLimiter (the previous window weighted by how much of it still
overlaps), on Redis's own clock (TIME: the nodes' clocks never matter), in one hash per
key and window that expires two windows after its last event. Keys are hashed
(RedisStore.key), so hostile input cannot grow the key space beyond what expires.

RedisConnections is ratelimit.ConnectionCounter across processes: a hash per client whose
fields are the processes holding its connections (field: a process's id, value: its
count), and per process a lease key that lives `lease` seconds unless renewed. Each
process renews its lease every third of it and writes its own counts again (which also
refills a Redis that restarted empty); entering counts only the fields whose lease is
alive and drops the others. So a node that dies stops counting against its clients within
`lease` seconds, and nothing needs cleaning up by hand. The process's own count is checked
first, locally, and kept as the truth the renewals write.

Redis down (RedisDown): `on_error` "allow" lets the client in (the connection counted
only in this process, the message uncounted); "defer" answers as if the limit were
reached (451 4.7.1 at MAIL, 421 at connect, 421 for AUTH).
"""
from __future__ import annotations

import math
import os
import secrets
import socket

import gevent
from loguru import logger

from geosmtp.ratelimit import LocalConnections
from geosmtp.redisclient import RedisDown, RedisStore

# KEYS[1] the counter hash; ARGV[1] the window in seconds, ARGV[2] "1" to add an event
# first. Returns the approximate count (after the event) as a string: a Lua number would
# come back as a truncated integer.
WINDOW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local index = math.floor(now / window)
local v = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local i, c, p = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
local changed = false
if i ~= index then
  if i == index - 1 then p = c else p = 0 end
  c, changed = 0, true
end
if ARGV[2] == '1' then
  c, changed = c + 1, true
end
if changed and (c > 0 or p > 0) then
  redis.call('HSET', KEYS[1], 'i', index, 'c', c, 'p', p)
  redis.call('EXPIRE', KEYS[1], math.ceil(2 * window) + 1)
end
return tostring(c + p * (1 - (now % window) / window))
"""

# KEYS[1] the client's hash, KEYS[2] our lease; ARGV[1] our id, ARGV[2] the limit,
# ARGV[3] the lease in seconds, ARGV[4] the lease key prefix. Returns 1 (entered) or 0.
ENTER_SCRIPT = """
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for n = 1, #fields, 2 do
  local id = fields[n]
  if id == ARGV[1] or redis.call('EXISTS', ARGV[4] .. id) == 1 then
    total = total + tonumber(fields[n + 1])
  else
    redis.call('HDEL', KEYS[1], id)
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return 1
"""

# KEYS[1] the client's hash; ARGV[1] our id
LEAVE_SCRIPT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

REFUSE = math.inf  # what count() says when "defer" applies: over any limit


class RedisLimiter:
    """ratelimit.Limiter in Redis; `on_error`: "allow" or "defer" (module docstring)."""

    def __init__(self, store: RedisStore, on_error: str = "allow"):
        self.store = store
        self.on_error = on_error
        self._script = store.script(WINDOW_SCRIPT)

    def _run(self, key: str, window: float, add: bool) -> float:
        return float(self.store.call("limits", self._script, keys=[self.store.key("rate", f"{window:g} {key}")],
                                     args=[f"{window:g}", "1" if add else "0"]))

    def count(self, key: str, window: float) -> float:
        try:
            return self._run(key, window, add=False)
        except RedisDown:
            return REFUSE if self.on_error == "defer" else 0.0

    def add(self, key: str, window: float) -> None:
        # with the next batch (RedisStore.later): the 250 does not wait for it; a failure is
        # counted in geosmtp_redis_errors and the event lost
        self.store.later("limits", self._script, [self.store.key("rate", f"{window:g} {key}")],
                         [f"{window:g}", "1"])


class RedisConnections:
    """ratelimit.ConnectionCounter across processes and nodes (module docstring)."""

    def __init__(self, store: RedisStore, lease: float = 30.0, on_error: str = "allow"):
        self.store = store
        self.lease = max(1, math.ceil(lease))
        self.on_error = on_error
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.local = LocalConnections()
        self._lease_prefix = f"{store.prefix}lease:"
        self._lease_key = self._lease_prefix + self.id
        self._enter = store.script(ENTER_SCRIPT)
        self._leave = store.script(LEAVE_SCRIPT)
        self._renewer: gevent.Greenlet | None = None

    def _hash(self, key: str) -> str:
        return self.store.key("conn", key)

    def enter(self, key: str, limit: int) -> bool:
        if self.local.open[key] >= limit:
            return False
        try:
            entered = self.store.call("connections", self._enter, keys=[self._hash(key), self._lease_key],
                                      args=[self.id, limit, self.lease, self._lease_prefix])
        except RedisDown:
            if self.on_error == "defer":
                return False
            entered = True  # counted here only; the next renewal shares it
        if entered:
            self.local.enter(key, limit)
        return bool(entered)

    def leave(self, key: str) -> None:
        self.local.leave(key)
        # with the next batch; lost if Redis is down, and then the next renewal writes the
        # right count
        self.store.later("connections", self._leave, [self._hash(key)], [self.id])

    # -- the lease --------------------------------------------------------------------------
    def renew(self) -> None:
        """Our lease for another `lease` seconds, and our counts as they are (one round trip)."""
        pipe = self.store.client.pipeline(transaction=False)
        pipe.set(self._lease_key, "1", ex=self.lease)
        for key, n in list(self.local.open.items()):
            pipe.hset(self._hash(key), self.id, n)
            pipe.expire(self._hash(key), self.lease)
        self.store.call("connections", pipe.execute)

    def start(self) -> None:
        """Renew the lease every third of it, in a greenlet, until close()."""
        def loop():
            while True:
                try:
                    self.renew()
                except RedisDown:
                    pass
                gevent.sleep(self.lease / 3)
        self._renewer = gevent.spawn(loop)

    def close(self) -> None:
        """Stop renewing and give the lease back (our counts stop counting at once)."""
        if self._renewer is not None:
            self._renewer.kill(block=False)
        try:
            self.store.call("connections", self.store.client.delete, self._lease_key)
        except RedisDown:
            logger.info("redis: lease {} not given back; it lapses within {}s", self.id, self.lease)
