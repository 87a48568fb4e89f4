"""Everything the server builds from a Config, built in one place: Server.__init__ and
Server.reload both call build(), and a reload swaps the result in whole, or not at all.

build() reads files (certificates, keys, users, the smarthost password) and makes TLS
contexts: a reload runs it in the threadpool. It connects to nothing: an SQL directory opens
its connections at its first lookup, on the hub of the process that makes it. Each part is built in its turn, and a part
that cannot be built is named (BuildError.part) so the refusal says which it was. A worker
builds none of the delivery side: it never delivers.

The Redis client ([redis]) is made once per process by the Server (build_redis) and lent
to build(): a reload keeps it (changing [redis] takes a restart).
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable

from geosmtp.auth import UserStore, read_secret
from geosmtp.checks import registry
from geosmtp.checks.dns import DNS
from geosmtp.checks.engine import CheckSpec, Engine
from geosmtp.checks.interface import CheckContext
from geosmtp.config import Config, ListenerConfig, TLSConfig, split_hostport
from geosmtp.delivery.lmtp import LMTPDelivery
from geosmtp.delivery.local import MaildirDelivery
from geosmtp.delivery.target import Router
from geosmtp.directory import Directory
from geosmtp.directory.sql import SQLDirectory, open_engine
from geosmtp.directory.static import ConfigDirectory
from geosmtp.dkim import Signer, load_key
from geosmtp.groupcommit import GroupCommit
from geosmtp.limits import Limits
from geosmtp.policy import is_trusted
from geosmtp.ratelimit import HOUR, ConnectionCounter, Limiter, LocalConnections, MemoryLimiter, ip_messages
from geosmtp.redisclient import RedisStore, connect
from geosmtp.redislimits import RedisConnections, RedisLimiter
from geosmtp.relay.dnscache import SharedCache
from geosmtp.relay.client import Timeouts
from geosmtp.relay.mx import MXResolver, make_resolver
from geosmtp.relay.pool import Relay, RelaySettings
from geosmtp.session import SessionSettings
from geosmtp.tls import Certificate, ServerTLS, TLSSettings


class BuildError(Exception):
    """A part could not be built from the configuration (a file that does not load)."""

    def __init__(self, part: str, error: Exception):
        super().__init__(f"{part}: {error}")
        self.part = part
        self.error = error


@dataclass(frozen=True)
class Parts:
    directory: Directory
    tls: ServerTLS | None
    senders: dict
    listeners: dict[str, ListenerConfig]
    settings: dict[str, SessionSettings]  # per listener, for new sessions
    relay: Relay | None  # the delivery side: None in a worker
    signer: Signer | None
    router: Router | None
    checks: dict[str, Engine]  # per listener (only those with checks)


def build(config: Config, delivers: bool, run: Callable, redis: RedisStore | None = None,
          commits: GroupCommit | None = None) -> Parts:
    """Every part; raises BuildError naming the first that fails. `run` is the threadpool
    runner the Maildir target writes through; `redis` the process's client, if [redis];
    `commits` the spool's group commit (a Maildir on its filesystem shares the rounds)."""
    def part(name, make):
        try:
            return make()
        except (OSError, ValueError) as exc:
            raise BuildError(name, exc) from None

    directory = part("users file" if config.directory.backend == "config" else "directory",
                     lambda: build_directory(config, run))
    tls = part("TLS certificate", lambda: ServerTLS(tls_settings(config)) if config.tls else None)
    checks = build_checks(config, run, redis, directory.is_local)
    relay = signer = router = None
    if delivers:
        relay = part("relay", lambda: build_relay(config, redis))
        signer = part("DKIM keys", lambda: build_signer(config))
        router = part("local delivery", lambda: build_router(config, directory, relay, run, commits))
    return Parts(
        directory=directory, tls=tls, senders=dict(config.auth.senders),
        listeners={item.name: item for item in config.listener},
        settings={item.name: session_settings(config, item) for item in config.listener},
        relay=relay, signer=signer, router=router, checks=checks,
    )


def same_filesystem(a, b) -> bool:
    """Whether two paths (or, for one not made yet, its nearest existing parent) are on one
    filesystem."""
    def device(path) -> int | None:
        path = os.path.abspath(path)
        while True:
            try:
                return os.stat(path).st_dev
            except FileNotFoundError:
                if path == os.path.dirname(path):
                    return None
                path = os.path.dirname(path)
    found = device(a)
    return found is not None and found == device(b)


def build_redis(config: Config) -> RedisStore | None:
    """This process's Redis client, or None without [redis]."""
    r = config.redis
    if r is None:
        return None
    return connect(r.url, sentinel=[split_hostport(s) for s in r.sentinel], sentinel_master=r.sentinel_master,
                   tls=r.tls, ca_file=str(r.ca_file) if r.ca_file else None, connect_timeout=r.connect_timeout,
                   timeout=r.timeout, pool_size=r.pool_size, prefix=r.key_prefix)


def build_limits(config: Config, redis: RedisStore | None) -> tuple[Limiter, ConnectionCounter]:
    """The rate limiter and the connection counter: Redis's when [redis] limits, else this
    process's own."""
    if redis is None or not config.redis.limits:
        return MemoryLimiter(), LocalConnections()
    r = config.redis
    limiter = RedisLimiter(redis, r.on_redis_error, r.refresh)
    # a new client's messages per hour are read with its entering: one round trip, not two
    return limiter, RedisConnections(redis, r.connection_lease, r.on_redis_error, r.refresh,
                                     prefetch=lambda key: (limiter, ip_messages(key), HOUR))


def build_checks(config: Config, run: Callable, redis: RedisStore | None = None,
                 is_local: Callable[[str], bool] = lambda domain: False) -> dict[str, Engine]:
    """The [[check]] tables as engines, per listener, each check made once (a check named by
    two listeners is one object). DNS goes through [relay] dns_servers and dns_timeout;
    `is_local` is the directory's."""
    if not config.check:
        return {}
    r = config.relay
    servers = [split_hostport(server) for server in r.dns_servers] if r.dns_servers else None
    resolver = make_resolver(servers, r.dns_timeout)
    # the checks' DNS keeps answers itself, for what is left of their TTL: a second cache under
    # it would hand back a negative answer with its whole TTL again (RFC 2308's TTL is not aged)
    resolver.cache = None
    context = CheckContext(hostname=config.server.hostname, dns=DNS(resolver),
                           run=run, is_local=is_local,
                           redis=redis, redis_greylist=config.redis is not None and config.redis.greylist)
    made: dict[str, CheckSpec] = {}
    for c in config.check:
        try:
            check = registry.make(c.type, c.module, c.check_options(), context)
        except Exception as exc:  # an operator's class may fail any way as it starts
            raise BuildError(f"check {c.label!r}", exc) from None
        made[c.label] = CheckSpec(c.label, check, c.timeout, c.on_error, c.skip_trusted)
    specs = {item.name: [made[c.label] for c in config.checks_of(item)] for item in config.listener}
    return registry.engines(specs, config.server.hostname)


def close_checks(engines: dict[str, Engine]) -> None:
    """Let go of what replaced checks hold (kept connections); each check once."""
    seen: set[int] = set()
    for engine in engines.values():
        for spec in engine.specs:
            if id(spec.check) not in seen:
                seen.add(id(spec.check))
                engine.close_one(spec)


def build_router(config: Config, directory: Directory, relay: Relay, run: Callable,
                 commits: GroupCommit | None = None) -> Router:
    """The local domains' targets (Maildir, or LMTP per [local] delivery and per domain; one
    LMTPDelivery per server address, shared by its domains) and the relay for the rest.
    `commits`: the spool's group commit, which a Maildir on the same filesystem shares."""
    local = config.local
    shared = commits if commits is not None and same_filesystem(local.maildir_root, config.server.spool_dir) else None
    maildir = MaildirDelivery(local.maildir_root, config.server.hostname, directory.is_mailbox, run,
                              flush=config.server.spool_flush, commits=shared)
    r = config.relay
    timeouts = Timeouts(connect=r.connect_timeout, command=r.command_timeout, data=r.data_timeout)
    lmtp: dict[str, LMTPDelivery] = {}

    def target(delivery: str, address: str | None):
        if delivery == "maildir":
            return maildir
        address = address or local.lmtp
        if address not in lmtp:
            lmtp[address] = LMTPDelivery(address, timeouts, hostname=config.server.hostname,
                                         base_of=directory.without_detail)
        return lmtp[address]

    per_domain = {d: target(v.delivery, v.lmtp) for d, v in local.domain.items()}
    return Router(target(local.delivery, local.lmtp), directory.is_local, relay, per_domain)


def build_directory(config: Config, run: Callable) -> Directory:
    """[directory] backend: the configuration's tables and users file, or SQL."""
    local, d = config.local, config.directory
    if d.backend == "config":
        users = config.auth.users_file
        return ConfigDirectory(
            domains=frozenset(local.domains),
            users=frozenset(local.users),
            aliases={k: tuple(v) for k, v in local.aliases.items()},
            delimiters=local.recipient_delimiter,
            hashes=UserStore.load(users).users if users else None,
        )
    return SQLDirectory(directory_engine(config, run), delimiters=local.recipient_delimiter,
                        cache_ttl=d.cache_ttl, cache_size=d.cache_size)


def directory_engine(config: Config, run: Callable, create: bool = False):
    """The SQL engine of [directory] (the server's lookups, the command line's writes)."""
    d = config.directory
    password = read_secret(d.password_file) if d.password_file else None
    return open_engine(d.backend, path=str(d.path), url=d.url, password=password, timeout=d.timeout,
                       pool_size=d.pool_size, run=run, create=create)


def tls_settings(config: Config) -> TLSSettings:
    t = config.tls
    return TLSSettings(
        certificates=tuple(Certificate(str(c.cert_file), str(c.key_file), tuple(c.names)) for c in t.certificates()),
        min_version=t.min_version, ciphers=t.ciphers, ciphersuites=t.ciphersuites,
        session_tickets=t.session_tickets,
    )


def session_settings(config: Config, listener: ListenerConfig) -> SessionSettings:
    c, lim = config, config.limits
    limits = Limits(command_timeout=lim.command_timeout, data_timeout=lim.data_timeout,
                    data_deadline=lim.data_deadline, min_data_rate=lim.min_data_rate, max_errors=lim.max_errors)
    return SessionSettings(
        hostname=c.server.hostname,
        listener=listener.name,
        mode=listener.mode,
        max_message_size=lim.max_message_size,
        max_recipients=lim.max_recipients,
        max_line_length=lim.max_line_length,
        limits=limits,
        stressed=limits.tightened(lim.stress_timeout, lim.stress_min_data_rate, lim.stress_max_errors),
        normalize_newlines=c.server.bare_newline == "normalize",
        forbid_unauth_pipelining=c.server.forbid_unauth_pipelining,
        hold=listener.hold,
        trusted_networks=tuple(c.relay.trusted_networks),
        tls=listener.tls,
        require_tls=listener.require_tls,
        handshake_timeout=c.tls.handshake_timeout if c.tls else TLSConfig.model_fields["handshake_timeout"].default,
        auth=listener.offers_auth,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        restrict_sender=c.auth.restrict_sender,
        max_auth_failures=c.auth.max_failures,
        messages_per_hour_per_ip=lim.messages_per_hour_per_ip,
        messages_per_hour_per_user=lim.messages_per_hour_per_user,
        auth_failures_per_hour_per_ip=lim.auth_failures_per_hour_per_ip,
    )


def build_relay(config: Config, redis: RedisStore | None = None) -> Relay:
    """The outbound side: resolver (its cache shared through Redis with [redis] dns_cache),
    TLS policy and connection pools, from [relay]."""
    r = config.relay
    servers = [split_hostport(server) for server in r.dns_servers] if r.dns_servers else None
    auth = None
    if r.smarthost_user is not None:
        auth = (r.smarthost_user, read_secret(r.smarthost_password_file))
    settings = RelaySettings(
        helo_name=r.helo_name or config.server.hostname,
        port=r.port,
        tls=r.tls,
        tls_policy=dict(r.tls_policy),
        ca_file=str(r.ca_file) if r.ca_file else None,
        smarthost=split_hostport(r.smarthost) if r.smarthost else None,
        smarthost_auth=auth,
        per_destination=r.per_destination,
        timeouts=Timeouts(connect=r.connect_timeout, command=r.command_timeout, data=r.data_timeout),
        idle_time=r.idle_time,
    )
    own_names = frozenset({config.server.hostname, settings.helo_name})
    resolver = make_resolver(servers, r.dns_timeout)
    if redis is not None and config.redis.dns_cache:
        resolver.cache = SharedCache(redis)
    return Relay(MXResolver(resolver, own_names), settings)


def build_signer(config: Config) -> Signer:
    return Signer([load_key(k.domain, k.selector, k.key_file, k.algorithm) for k in config.dkim.key])


def may_sign(envelope, trusted_networks: tuple) -> bool:
    """DKIM signs what our own users send: authenticated clients and trusted networks."""
    if envelope.client.auth_user:
        return True
    try:
        return is_trusted(ipaddress.ip_address(envelope.client.address), trusted_networks)
    except ValueError:
        return False


def signing_rule(config: Config):
    return partial(may_sign, trusted_networks=tuple(config.relay.trusted_networks))
