"""Rate and connection limits shared through Redis by every process of every node.

RedisLimiter is ratelimit.Limiter in Lua: the same two-fixed-window approximation as
MemoryLimiter (the previous window weighted by how much of it still overlaps), on Redis's
own clock (TIME: the nodes' clocks never matter), in one hash per key and window that
expires two windows after its last event. Keys are hashed (RedisStore.key), so hostile
input cannot grow the key space beyond what expires.

RedisConnections is ratelimit.ConnectionCounter across processes: a hash per client whose
fields are the processes holding its connections (field: a process's id, value: its
count), and per process a lease key that lives `lease` seconds unless renewed. Each
process renews its lease every third of it and writes its own counts again (which also
refills a Redis that restarted empty); counting takes only the fields whose lease is
alive and drops the others. So a node that dies stops counting against its clients within
`lease` seconds, and nothing needs cleaning up by hand. The process's own count is kept
locally, as the truth the renewals write.

The view (`refresh` seconds, [redis] refresh): each process keeps, per hot key, the shared
count as Redis last told it, and its own events since, applied at once. count() and
enter() answer from it while it is younger than `refresh`; an older or unknown key costs
one waited call, which also sends this process's waiting events for it. enter() refuses
only on Redis's word: the view may still count connections that have closed since. Events go out
write-behind, coalesced per key, with the store's next batch (RedisStore.dirty, every
5 ms), and each write's answer is the key's shared count, so a key this process writes
is refreshed with every batch. A new client costs one wait: entering it also reads its
messages-per-hour count (`prefetch`). So a process sees its own events at once and the
other processes' within `refresh` (within a batch for a key it writes too): a burst that
reaches P processes at once can pass a limit by what the other P - 1 admit before they
next hear from Redis. refresh = 0: every count and every enter waits for Redis (exact;
two round trips per new client). The views are LRUs of at most `max_keys` keys; what is
waiting to be written is bounded by the batch (BATCH_MAX events).

Redis down (RedisDown): `on_error` "allow" lets the client in (the connection counted
only in this process, the message uncounted); "defer" answers as if the limit were
reached (451 4.7.1 at MAIL, 421 at connect, 421 for AUTH). Events whose batch failed are
lost; the connection counts are written again by the next renewal.
"""
from __future__ import annotations

import math
import os
import secrets
import socket
from collections import Counter, OrderedDict
from typing import Callable

import gevent
from loguru import logger

from geosmtp.ratelimit import LocalConnections
from geosmtp.redisclient import RedisDown, RedisStore

# Lua shared by the scripts below. window(key, size, n, now): add n events to the counter
# hash `key` of windows of `size` seconds, return the approximate count after them as a
# string (a Lua number would come back as a truncated integer). live_others(hash, id,
# prefix): the connections of the processes other than `id` whose lease is alive; the
# fields of dead ones are dropped.
LUA_FUNCTIONS = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function window(key, size, n, now)
  local index = math.floor(now / size)
  local v = redis.call('HMGET', key, 'i', 'c', 'p')
  local i, c, p = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local changed = false
  if i ~= index then
    if i == index - 1 then p = c else p = 0 end
    c, changed = 0, true
  end
  if n > 0 then
    c, changed = c + n, true
  end
  if changed and (c > 0 or p > 0) then
    redis.call('HSET', key, 'i', index, 'c', c, 'p', p)
    redis.call('EXPIRE', key, math.ceil(2 * size) + 1)
  end
  return tostring(c + math.ceil(p * (1 - (now % size) / size)))  -- as MemoryLimiter.count
end
local function live_others(hash, id, prefix)
  local fields = redis.call('HGETALL', hash)
  local total = 0
  for n = 1, #fields, 2 do
    local field = fields[n]
    if field ~= id then
      if redis.call('EXISTS', prefix .. field) == 1 then
        total = total + tonumber(fields[n + 1])
      else
        redis.call('HDEL', hash, field)
      end
    end
  end
  return total
end
"""

# KEYS[1] the counter hash; ARGV[1] the window in seconds, ARGV[2] events to add first.
WINDOW_SCRIPT = LUA_FUNCTIONS + """
return window(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), clock())
"""

# KEYS[1] the client's hash, KEYS[2] our lease, KEYS[3] (optional) a rate counter to read;
# ARGV[1] our id, ARGV[2] the limit, ARGV[3] the lease in seconds, ARGV[4] the lease key
# prefix, ARGV[5] our connections now, ARGV[6] the rate counter's window.
# ARGV[5] counts our connections open and those being entered by other greenlets (it may
# pass what Redis then holds: a leave not yet written is not counted). Returns {1 entered
# or 0, the others' connections, our count as Redis now holds it, the rate count or false}.
ENTER_SCRIPT = LUA_FUNCTIONS + """
local others = live_others(KEYS[1], ARGV[1], ARGV[4])
local rate = false
if KEYS[3] then rate = window(KEYS[3], tonumber(ARGV[6]), 0, clock()) end
local mine = tonumber(ARGV[5])
if others + mine >= tonumber(ARGV[2]) then return {0, others, mine, rate} end
redis.call('HSET', KEYS[1], ARGV[1], mine + 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return {1, others, mine + 1, rate}
"""

# KEYS[1] the client's hash, KEYS[2] our lease; ARGV[1] our id, ARGV[2] our connections
# now, ARGV[3] the lease, ARGV[4] the lease key prefix. Returns the others' connections.
# The lease is set too: a Redis that restarted empty counts ours again at once.
SYNC_SCRIPT = LUA_FUNCTIONS + """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return live_others(KEYS[1], ARGV[1], ARGV[4])
"""

REFUSE = math.inf  # what count() says when "defer" applies: over any limit
MAX_KEYS = 10_000  # keys a view keeps, the least recently used forgotten first


class View:
    """A bounded LRU of entries (`make()` for a new one), fresh while younger than
    `refresh`, and the entries with events waiting to be written (`dirty`)."""

    def __init__(self, make: Callable[[], object], refresh: float, max_keys: int, clock: Callable[[], float]):
        self.make, self.refresh, self.max_keys, self.clock = make, refresh, max_keys, clock
        self.entries: OrderedDict = OrderedDict()
        self.dirty: dict = {}  # key -> entry: bounded by the batch, kept even if evicted

    def get(self, key):
        entry = self.entries.get(key)
        if entry is None:
            entry = self.dirty.get(key) or self.make()
            self.entries[key] = entry
            if len(self.entries) > self.max_keys:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return entry

    def fresh(self, entry, refresh: float | None = None) -> bool:
        return self.clock() - entry.heard < (self.refresh if refresh is None else refresh)


class _Count:
    """A rate counter as this process sees it: `base` as Redis last said, plus events in
    a batch in flight (`sent`) and events not yet sent (`waiting`)."""
    __slots__ = ("base", "sent", "waiting", "heard")

    def __init__(self):
        self.base, self.sent, self.waiting, self.heard = 0.0, 0, 0, -math.inf

    def seen(self) -> float:
        return self.base + self.sent + self.waiting


class RedisLimiter:
    """ratelimit.Limiter in Redis, with a view (module docstring); `on_error`: "allow" or
    "defer"."""

    use = "limits"

    def __init__(self, store: RedisStore, on_error: str = "allow", refresh: float = 0.0, max_keys: int = MAX_KEYS):
        self.store = store
        self.on_error = on_error
        self._script = store.script(WINDOW_SCRIPT)
        self.view = View(_Count, refresh, max_keys, store.clock)

    def _key(self, key: str, window: float) -> str:
        return self.store.key("rate", f"{window:g} {key}")

    def count(self, key: str, window: float) -> float:
        entry = self.view.get((key, window))
        # a short window fades noticeably within `refresh`: its view lives a tenth of it
        if self.view.fresh(entry, min(self.view.refresh, window / 10)):
            return entry.seen()
        n, entry.waiting = entry.waiting, 0  # our waiting events go with the question
        self.view.dirty.pop((key, window), None)
        try:
            answer = self.store.call("limits", self._script, keys=[self._key(key, window)],
                                     args=[f"{window:g}", n])
        except RedisDown:
            return REFUSE if self.on_error == "defer" else 0.0
        entry.base, entry.heard = float(answer), self.store.clock()
        return entry.seen()

    def add(self, key: str, window: float) -> None:
        entry = self.view.get((key, window))
        entry.waiting += 1
        self.view.dirty[(key, window)] = entry
        self.store.dirty(self)

    def heard(self, key: str, window: float, answer) -> None:
        """A count Redis gave someone else's question (RedisConnections' prefetch)."""
        entry = self.view.get((key, window))
        entry.base, entry.heard = float(answer), self.store.clock()

    def drain(self) -> list:
        dirty, self.view.dirty = self.view.dirty, {}
        commands = []
        for (key, window), entry in dirty.items():
            if entry.waiting:
                n, entry.waiting = entry.waiting, 0
                entry.sent += n
                commands.append((self._script, [self._key(key, window)], [f"{window:g}", n],
                                 self._landed(entry, n)))
        return commands

    def _landed(self, entry: _Count, n: int) -> Callable:
        def done(answer):
            entry.sent -= n  # in `base` now, or lost with a failed batch
            if not isinstance(answer, Exception):
                entry.base, entry.heard = float(answer), self.store.clock()
        return done


class _Clients:
    """A client's connections in the other processes, as Redis last said."""
    __slots__ = ("others", "heard")

    def __init__(self):
        self.others, self.heard = 0, -math.inf


class RedisConnections:
    """ratelimit.ConnectionCounter across processes and nodes, with a view (module
    docstring). `prefetch(key)` -> (limiter, its key, window) or None: the rate count a new
    client is about to be asked for, read with its entering."""

    use = "connections"

    def __init__(self, store: RedisStore, lease: float = 30.0, on_error: str = "allow", refresh: float = 0.0,
                 max_keys: int = MAX_KEYS, prefetch: Callable[[str], tuple | None] = lambda key: None):
        self.store = store
        self.lease = max(1, math.ceil(lease))
        self.on_error = on_error
        self.prefetch = prefetch
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.local = LocalConnections()
        self._entering: Counter[str] = Counter()  # greenlets waiting for Redis to enter a key
        self.view = View(_Clients, refresh, max_keys, store.clock)
        self._lease_prefix = f"{store.prefix}lease:"
        self._lease_key = self._lease_prefix + self.id
        self._enter = store.script(ENTER_SCRIPT)
        self._sync = store.script(SYNC_SCRIPT)
        self._renewer: gevent.Greenlet | None = None

    def _hash(self, key: str) -> str:
        return self.store.key("conn", key)

    def enter(self, key: str, limit: int) -> bool:
        mine = self.local.open[key]
        if mine >= limit:
            return False
        entry = self.view.get(key)
        # the view lets in; a refusal is Redis's (connections the view counts may have closed)
        if self.view.fresh(entry) and entry.others + mine < limit:
            self.local.enter(key, limit)
            self._changed(key, entry)
            return True
        entering = self._entering[key]
        keys, args = [self._hash(key), self._lease_key], [self.id, limit, self.lease, self._lease_prefix,
                                                          mine + entering]
        rate = self.prefetch(key)
        if rate is not None:
            keys.append(rate[0]._key(rate[1], rate[2]))
            args.append(f"{rate[2]:g}")
        self._entering[key] += 1
        try:
            entered, others, held, counted = self.store.call("connections", self._enter, keys=keys, args=args)
        except RedisDown:
            if self.on_error == "defer":
                return False
            self.local.enter(key, limit)  # counted here only; the next renewal shares it
            return True
        finally:
            self._entering[key] -= 1
            if not self._entering[key]:
                del self._entering[key]
        entry.others, entry.heard = int(others), self.store.clock()
        if rate is not None and counted is not None:
            rate[0].heard(rate[1], rate[2], counted)
        if entered:
            self.local.enter(key, limit)
        if int(held) != self.local.open[key]:  # other greenlets entered or left meanwhile
            self._changed(key, entry)
        return bool(entered)

    def leave(self, key: str) -> None:
        self.local.leave(key)
        self._changed(key, self.view.get(key))

    def _changed(self, key: str, entry: _Clients) -> None:
        self.view.dirty[key] = entry
        self.store.dirty(self)

    def drain(self) -> list:
        dirty, self.view.dirty = self.view.dirty, {}
        return [(self._sync, [self._hash(key), self._lease_key], [self.id, self.local.open[key], self.lease, self._lease_prefix],
                 self._synced(entry)) for key, entry in dirty.items()]

    def _synced(self, entry: _Clients) -> Callable:
        def done(answer):
            if not isinstance(answer, Exception):
                entry.others, entry.heard = int(answer), self.store.clock()
        return done

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
