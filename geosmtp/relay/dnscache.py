"""A dnspython answer cache shared through Redis, so a fleet asks DNS once per TTL.

SharedCache is dnspython's LRUCache (this process's answers, in front) backed by Redis
(every node's): a miss here is looked up there, and an answer put here is put there too,
with what is left of its TTL as the key's expiry. What Redis holds is the answer's
expiration time and the DNS response as wire octets; an answer read back keeps that
expiration (a TTL is never restarted by going through Redis). Negative answers (NXDOMAIN,
"no such record") are cached the same way, as dnspython caches them. Redis down or slow
is a miss (geosmtp.redisclient: counted, logged once a minute): DNS is asked, as without it.
"""
from __future__ import annotations

import math
import struct
import time

import dns.message
import dns.resolver

from geosmtp.redisclient import RedisDown, RedisStore

_EXPIRATION = struct.Struct("!d")


def _text(key) -> str:
    qname, rdtype, rdclass = key
    return f"{qname.to_text().lower()} {int(rdtype)} {int(rdclass)}"


def encode(answer: dns.resolver.Answer) -> bytes:
    return _EXPIRATION.pack(answer.expiration) + answer.response.to_wire()


def decode(key, raw: bytes) -> dns.resolver.Answer:
    qname, rdtype, rdclass = key
    (expiration,) = _EXPIRATION.unpack_from(raw)
    answer = dns.resolver.Answer(qname, rdtype, rdclass, dns.message.from_wire(raw[_EXPIRATION.size:]))
    answer.expiration = expiration
    return answer


class SharedCache(dns.resolver.LRUCache):
    def __init__(self, store: RedisStore, max_size: int = 10000, clock=time.time):
        super().__init__(max_size=max_size)
        self.store = store
        self.clock = clock

    def get(self, key):
        answer = super().get(key)
        if answer is not None:
            return answer
        try:
            raw = self.store.call("dns_cache", self.store.client.get, self.store.key("dns", _text(key)))
        except RedisDown:
            return None
        if raw is None:
            return None
        try:
            answer = decode(key, raw)
        except Exception:  # noqa: BLE001 - what another version wrote, or garbage: a miss
            return None
        if answer.expiration <= self.clock():
            return None
        super().put(key, answer)
        return answer

    def put(self, key, value) -> None:
        super().put(key, value)
        left = value.expiration - self.clock()
        if left < 1:
            return
        try:
            self.store.call("dns_cache", self.store.client.set, self.store.key("dns", _text(key)), encode(value),
                            ex=math.floor(left))
        except RedisDown:
            pass
