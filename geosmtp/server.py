"""The running server: listeners, per-connection greenlets, the queue manager, signals.

This module and the CLI are the only readers of the configuration; everything they build
gets plain values. One gevent StreamServer per [[listener]] spawns a greenlet per connection
that runs a Session; the spool, directory and queue manager are shared.
"""
from __future__ import annotations

import gc
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial

import gevent
import gevent.event
import gevent.socket
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer
from loguru import logger

from geosmtp import groupcommit, lifeline, metrics, parts, privileges, replies, safeio
from geosmtp import proxy as proxy_protocol
from geosmtp.config import Config, ConfigError, ListenerConfig, split_hostport
from geosmtp.config import load as load_config
from geosmtp.connection import Connection, ConnectionClosed, HandshakeFailed
from geosmtp.handlers import Handlers, interrupt
from geosmtp.policy import is_trusted
from geosmtp.queue import QueueManager
from geosmtp.redisclient import RedisStore
from geosmtp.session import Draining, Services, Session, SessionSettings, client_key
from geosmtp.spool import Spool, held_lock, lock_spool, valid_id
from geosmtp.stress import Load

LISTEN_BACKLOG = 1024
# Disk work (fsync, big writes) runs in gevent's threadpool. Several fsyncs in flight at
# once keep the disk busy (and share journal commits); 16 measured as well as 32 with less
# kernel lock contention, and no worse than 8.
IO_THREADS = 16
DIRECTORY_GRACE = 600.0  # seconds a replaced directory stays open for the sessions that use it


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket. With workers the master binds it and every worker accepts on the
    same socket (one accept queue: a worker that dies loses no waiting connection); no
    SO_REUSEPORT, so a second server on the port fails to start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def inherited_sockets() -> dict[str, socket.socket]:
    """A worker's listening sockets, bound by the master: GEOSMTP_LISTEN_FDS="name=fd,…"."""
    out = {}
    for item in filter(None, os.environ.get(LISTEN_FDS, "").split(",")):
        name, _, fd = item.rpartition("=")
        out[name] = socket.socket(fileno=int(fd))
    return out


LISTEN_FDS = "GEOSMTP_LISTEN_FDS"
LOCK_FD = "GEOSMTP_LOCK_FD"  # the master's spool lock, held by each worker too
# A worker that dies within this many seconds of its start is failing, not crashing once:
# it is restarted after a pause that doubles each time, up to the cap (like Postfix's
# master throttling a service that keeps failing).
WORKER_FAST_FAIL = 10.0
WORKER_BACKOFF_CAP = 60.0


def _needs_restart(old: Config, new: Config) -> list[str]:
    """What a reload cannot change under a running server."""
    out = []
    if [(i.name, i.address, i.mode, i.tls) for i in old.listener] != \
            [(i.name, i.address, i.mode, i.tls) for i in new.listener]:
        out.append("[[listener]] names, addresses, modes or TLS")
    for key in ("spool_dir", "workers", "hostname", "user", "group"):
        if getattr(old.server, key) != getattr(new.server, key):
            out.append(f"server.{key}")
    if old.local.maildir_root != new.local.maildir_root:
        out.append("local.maildir_root")
    if old.queue.concurrency != new.queue.concurrency:
        out.append("queue.concurrency")
    if old.metrics != new.metrics or old.log != new.log:
        out.append("[metrics] or [log]")
    if old.redis != new.redis:
        out.append("[redis]")
    return out


def unmapped(address: str) -> str:
    """"::ffff:192.0.2.1" -> "192.0.2.1": policy, limits, logs and checks see IPv4 clients of an
    IPv6 listener by their IPv4 address (a DNSBL or greylist key made from the mapped form
    would match nothing, or everybody)."""
    if ":" not in address:
        return address
    try:
        mapped = ipaddress.ip_address(address).ipv4_mapped
    except ValueError:
        return address
    return str(mapped) if mapped is not None else address


class Server:
    """role "all": listeners and the queue manager in one process (workers = 1).
    role "worker": listeners only; a new message is announced on notify_fd.
    role "master": the queue manager, and N worker processes started and watched."""

    def __init__(self, config: Config, role: str = "all", config_path: str | None = None,
                 notify_fd: int | None = None):
        self.config = config
        self.role = role
        self.run_as = privileges.identity(config.server.user, config.server.group)
        self.config_path = config_path
        self.notify_fd = notify_fd
        self.workers: list[subprocess.Popen | None] = []
        self.listen_socks: dict[str, socket.socket] = {}  # a master's, kept for its workers
        hub = gevent.get_hub()
        hub.threadpool.maxsize = IO_THREADS
        run = safeio.threadpool_runner(hub.threadpool)
        self.spool = Spool(config.server.spool_dir, run=run,
                           flush=config.server.spool_flush)
        delivers = role != "worker"  # a worker builds nothing of the delivery side
        # this process's own Redis client: a worker is exec'd, never a fork sharing sockets
        self.redis: RedisStore | None = parts.build_redis(config)
        self.parts = parts.build(config, delivers, run, self.redis, self.spool.commits)
        limiter, self.connections = parts.build_limits(config, self.redis)
        logger.info("directory: {}", self.parts.directory.describe())
        self.queue = QueueManager(
            self.spool, self.parts.router, config.queue, signer=self.parts.signer,
            may_sign=parts.signing_rule(config), hostname=config.server.hostname,
        ) if delivers else None
        self.services = Services(
            spool=self.spool,
            directory=self.parts.directory,
            on_queued=self._announce if role == "worker" else self.queue.notify,
            tls=self.parts.tls,
            senders=self.parts.senders,
            checks=self.parts.checks,
            limiter=limiter,
            run=run,
        )
        self.sessions = Handlers()  # the greenlets running connections (StreamServer's spawn)
        self.live: dict[gevent.Greenlet, Session] = {}  # the session each greenlet runs
        self.http: WSGIServer | None = None
        self._stopping = False
        # open sessions and stress per listener, in this process (workers count their own)
        self.loads = {item.name: Load(item.name) for item in config.listener}
        self.servers: list[StreamServer] = []
        self.stopped = gevent.event.Event()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config.server
        if self.role == "worker":  # the master's lock, passed down: it lives as long as we do
            self._lock = held_lock(cfg.spool_dir, int(os.environ[LOCK_FD]))
            self._accept(inherited_sockets())
            gevent.spawn(self._watch_master, int(os.environ[lifeline.LIFELINE_FD]))
            return
        # geosmtp-queue signals the pid written into the lock: be ready before it is there
        gevent.signal_handler(signal.SIGUSR1, self.queue.notify)
        # a previous master's workers may still be finishing their sessions: recovery waits
        # for the last of them (they are gone within drain_timeout and a few seconds)
        self._lock = lock_spool(cfg.spool_dir, wait=cfg.drain_timeout + 15)
        privileges.give(self.run_as, self._lock)
        socks = {item.name: listen_socket(item.host, item.port) for item in self.config.listener}
        # ports bound, spool lock held: nothing left that needs root, and nothing accepted yet
        privileges.drop(self.run_as)
        recovered = self.spool.recover()  # in the threadpool
        self._tell_flush(cfg)
        if self.role == "master":
            self.listen_socks = socks
            self._start_workers()
        else:
            self._accept(socks)
        self._serve_metrics()
        self.queue.start(recovered)

    def _tell_flush(self, cfg) -> None:
        """Which flush makes commits durable (README "The spool's filesystem")."""
        logger.info("spool {}: group commit by {}", cfg.spool_dir, self.spool.commits.method)
        if self.spool.commits.method == "syncfs" and not groupcommit.reports_errors():
            logger.warning("spool: this kernel's syncfs() does not report I/O errors (Linux 5.8 and "
                           "later do): a failed write could go unnoticed; set spool_flush = \"fsync\"")

    def _accept(self, socks: dict[str, socket.socket]) -> None:
        """A StreamServer per listener on its bound socket: sessions from now on."""
        self.connections.start()
        # what start-up made (the configuration, the checks, modules, caches) lives as long
        # as the process: kept out of the collector's way, a full collection walks only what
        # the sessions make (before: about 68,000 objects, 20 ms a pass with every session
        # waiting)
        gc.freeze()
        if self.redis is not None:
            r = self.config.redis
            shared = [what for what, on in (("limits", r.limits), ("greylist", r.greylist),
                                            ("dns cache", r.dns_cache)) if on]
            logger.info("redis {}: shared {}", self.redis.where, ", ".join(shared) or "nothing")
        for listener in self.config.listener:
            server = StreamServer(socks[listener.name], partial(self.handle, listener.name), spawn=self.sessions.spawn)
            server.start()
            self.servers.append(server)
            logger.info("listening on {} ({}, mode {})", listener.address, listener.name, listener.mode)

    def _serve_metrics(self) -> None:
        """/metrics, /healthz, /readyz on [metrics] address (master or single process)."""
        address = self.config.metrics.address
        if address is None:
            return
        host, port = split_hostport(address)
        app = metrics.wsgi_app(metrics.registry_for(str(self.config.server.spool_dir)), self.not_ready)
        self.http = WSGIServer((host, port), app, log=None, error_log=None)
        self.http.start()
        logger.info("metrics and health on http://{}/metrics", address)

    def not_ready(self) -> metrics.Unready | None:
        """Why a load balancer should not send us connections now (or should, knowing that
        big messages get 452), or None."""
        if self._stopping:
            return metrics.Unready("draining")
        if self.role == "master" and not any(p is not None and p.poll() is None for p in self.workers):
            return metrics.Unready("no worker running")
        for engine in self.parts.checks.values():  # a check the server cannot do without (rspamd required)
            for spec in engine.specs:
                readiness = getattr(spec.check, "readiness", None)
                if callable(readiness) and (problem := readiness()):
                    return metrics.Unready(f"check {spec.name}: {problem}")
        return metrics.spool_readiness(str(self.config.server.spool_dir), self.config.limits.max_message_size)

    # -- workers (role "master" and "worker") -----------------------------------------------
    def _start_workers(self) -> None:
        read_fd, self.notify_fd = os.pipe()
        os.set_blocking(read_fd, False)
        # the workers' end too: a full pipe (the master busy) drops a notice, it never
        # stops a worker's hub (the periodic scan takes what a lost notice named)
        os.set_blocking(self.notify_fd, False)
        # the workers' lifeline: they get the read end, only we hold the write end, so they
        # see end-of-file when we are gone (geosmtp.lifeline)
        self._lifeline, self._lifeline_w = os.pipe()
        self.workers = [None] * self.config.server.workers
        for slot in range(len(self.workers)):
            self._spawn_worker(slot)
        gevent.spawn(self._read_notices, read_fd)
        for slot in range(len(self.workers)):
            gevent.spawn(self._supervise, slot)

    def _spawn_worker(self, slot: int) -> None:
        fds = {name: sock.fileno() for name, sock in self.listen_socks.items()}
        env = {**os.environ, "GEOSMTP_NOTIFY_FD": str(self.notify_fd),
               LISTEN_FDS: ",".join(f"{name}={fd}" for name, fd in fds.items()),
               lifeline.MASTER_PID: str(os.getpid()), lifeline.LIFELINE_FD: str(self._lifeline),
               LOCK_FD: str(self._lock)}
        cmd = [sys.executable, "-m", "geosmtp", "start", "-c", self.config_path, "--worker"]
        # from this (the main) thread: PR_SET_PDEATHSIG fires when the thread that forked the
        # worker ends, so a worker must never be started from a threadpool thread
        self.workers[slot] = subprocess.Popen(
            cmd, env=env, pass_fds=(self.notify_fd, self._lifeline, self._lock, *fds.values()))
        logger.info("worker {} started, pid {}", slot, self.workers[slot].pid)

    def _supervise(self, slot: int) -> None:
        """Restart the worker in `slot` when it dies; one that keeps dying at once is
        restarted after a pause doubling up to WORKER_BACKOFF_CAP (the others serve on)."""
        pause = 1.0
        while not self.stopped.is_set():
            proc, started = self.workers[slot], time.monotonic()
            while proc.poll() is None and not self.stopped.is_set():
                gevent.sleep(0.5)
            if self.stopping or self.stopped.is_set():
                return
            metrics.process_gone(proc.pid)
            pause = min(pause * 2, WORKER_BACKOFF_CAP) if time.monotonic() - started < WORKER_FAST_FAIL else 1.0
            logger.warning("worker {} (pid {}) exited with {}; restarting in {:g}s",
                           slot, proc.pid, proc.returncode, pause)
            gevent.sleep(pause)
            if self.stopping:
                return
            self._spawn_worker(slot)

    def _read_notices(self, fd: int) -> None:
        """Workers write the id of each message they queued, a line each: the queue manager
        takes it at once. (A line is one write of less than PIPE_BUF octets: never mixed
        with another; a read may end inside one, which the next read completes.)"""
        carry = b""
        while True:
            gevent.socket.wait_read(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            *lines, carry = (carry + data).split(b"\n")
            for line in lines:
                qid = line.decode("ascii", "replace")
                if valid_id(qid):
                    self.queue.notify(qid)

    def _announce(self, qid: str) -> None:
        try:
            os.write(self.notify_fd, qid.encode("ascii") + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass  # the master is busy (a periodic scan takes the settled entry) or gone

    def _watch_master(self, lifeline_fd: int) -> None:
        lifeline.master_gone(lifeline_fd)
        logger.warning("the master process is gone; no longer accepting, stopping")
        self.stop()

    @property
    def orphaned(self) -> bool:
        """A worker whose master has exited (its parent is no longer the master)."""
        return self.role == "worker" and os.getppid() != int(os.environ[lifeline.MASTER_PID])

    def serve_forever(self) -> None:
        # handlers first: a SIGHUP that came as soon as a worker says "listening" would
        # otherwise end it (the default action)
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, lambda: gevent.spawn(self.stop))
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        self.start()
        self.stopped.wait()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def reload(self) -> None:
        """SIGHUP: read the configuration file again and apply what can change under a
        running server: TLS certificate, users, local domains, mailboxes and aliases,
        limits and policy, relay and queue settings, DKIM keys. Everything is built first
        and swapped in only if all of it loads: a bad file or key is refused with a log line
        and the running configuration stays. Open sessions finish with what they had."""
        for proc in self.workers:  # a master passes it on
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)
        new = self.config
        if self.config_path is not None:
            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                logger.error("reload refused, {} is not valid: {}", self.config_path, "; ".join(exc.problems))
                return
        try:  # files read, keys parsed, TLS contexts made: off the hub (35-90 ms each)
            fresh = self.spool.run(parts.build, new, self.role != "worker", self.spool.run, self.redis, self.spool.commits)
        except parts.BuildError as exc:
            logger.error("reload refused: {} not reloaded, keeping the old one (and the whole running "
                         "configuration): {}", exc.part, exc.error)
            return
        for what in _needs_restart(self.config, new):
            logger.warning("reload: {} changed; that takes a restart", what)
        old, self.config = self.parts, new
        # a listener's name and address take a restart; its other keys apply from now on
        listeners = {name: fresh.listeners.get(name, item) for name, item in old.listeners.items()}
        self.parts = replace(fresh, tls=fresh.tls or old.tls, listeners=listeners,
                             settings={name: parts.session_settings(new, item) for name, item in listeners.items()})
        self.services.use(self.parts.directory, self.parts.tls, self.parts.senders, self.parts.checks)
        gevent.spawn(parts.close_checks, old.checks)  # idle connections only: open sessions keep theirs
        # open sessions keep the directory they began with: its connections go a while later
        gevent.spawn_later(DIRECTORY_GRACE, old.directory.close)
        if self.queue is not None:
            self.queue.use(self.parts.router, self.parts.signer, parts.signing_rule(new), new.queue)
            gevent.spawn(old.router.close)  # kept connections (relay, LMTP); deliveries in flight finish
        if fresh.tls is not None:
            logger.info("reload: TLS certificates loaded from {}", fresh.tls.settings.cert_files)
        if new.auth.users_file is not None:
            logger.info("reload: {} users loaded from {}", len(fresh.directory.hashes), new.auth.users_file)
        logger.info("reload: configuration from {} applied (directory: {})", self.config_path,
                    fresh.directory.describe())

    def stop(self) -> None:
        """Drain and stop (SIGTERM). /readyz turns 503 at once; after drain_delay the
        listeners close and idle sessions get 421 4.3.2; sessions in a transaction may
        finish it within drain_timeout, then they get the 421 too. Deliveries in flight are
        given the same time. Nothing acknowledged is lost: a message whose 250 was not sent
        was never acknowledged. Never raises."""
        if self.stopped.is_set() or self._stopping:
            return
        self._stopping = True
        cfg = self.config.server
        try:
            for proc in self.workers:  # they drain their own sessions the same way
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            # an orphaned worker stops accepting at once: nobody delivers what it would queue
            # until the next master starts, which waits for it (and no balancer needs telling)
            delay = 0.0 if self.orphaned else cfg.drain_delay
            logger.info("draining: {} open sessions; listeners close in {:g}s", len(self.sessions), delay)
            gevent.sleep(delay)
            for server in self.servers:
                server.close()
            for sock in self.listen_socks.values():  # the workers close their copies too
                sock.close()
            self.services.draining = True
            # deliveries in flight get the same drain_timeout as the sessions, side by side
            queue_stopped = gevent.spawn(self.queue.stop, cfg.drain_timeout) if self.role != "worker" else None
            self._interrupt(lambda session: session.idle)
            self.sessions.join(timeout=cfg.drain_timeout)
            if len(self.sessions):
                logger.info("drain timeout: closing {} sessions with 421", len(self.sessions))
                self._interrupt(lambda session: True)
                self.sessions.join(timeout=5)
            self.sessions.kill(timeout=2)
            deadline = time.monotonic() + cfg.drain_timeout + 10  # the workers started with us
            for proc in self.workers:
                while proc is not None and proc.poll() is None and time.monotonic() < deadline:
                    gevent.sleep(0.1)
                if proc is not None and proc.poll() is None:
                    proc.kill()
            if queue_stopped is not None:
                queue_stopped.join()
                self.parts.router.close()
            if self.http is not None:
                self.http.stop(timeout=1)
            self.connections.close()
            if self.redis is not None:
                self.redis.close()
            self.parts.directory.close()
            logger.info("stopped")
        except BaseException:  # never leave a half-stopped process running
            logger.exception("error while stopping")
        finally:
            self.stopped.set()

    def _interrupt(self, which) -> None:
        """Raise Draining into the sessions `which(session)` picks (it sends the 421)."""
        for greenlet, session in list(self.live.items()):
            if which(session):
                interrupt(greenlet, Draining(), partial(self._runs, greenlet, session))

    def _runs(self, greenlet, session: Session) -> bool:
        return self.live.get(greenlet) is session

    # -- one connection ---------------------------------------------------------------------
    def handle(self, name: str, sock: socket.socket, addr) -> None:
        # the listener's settings current now: a reload changes them for new connections only
        listener = self.parts.listeners[name]
        settings = self.parts.settings[name]
        ip = unmapped(addr[0])  # an IPv4 client of a dual-stack [::] listener: its IPv4 address
        lim = self.config.limits
        load = self.loads[listener.name]
        conn = Connection(sock, settings.limits.command_timeout)  # it times every send and read
        metrics.child(metrics.CONNECTIONS, listener.name).inc()
        proxy = None
        try:
            if listener.proxy_protocol:
                proxy, ip = ip, self._proxied_client(listener, conn, ip)
                if ip is None:
                    return
            key = client_key(ip)  # an IPv6 client by its /64
            if not self.connections.enter(key, lim.max_connections_per_ip):
                metrics.REFUSED.labels(listener.name, "max_connections_per_ip").inc()
                self._refuse(conn, settings, replies.TOO_MANY_FROM_YOU, ip)
                return
            if not load.make_room(lim.max_connections):  # full: the longest idle goes, if any may
                self.connections.leave(key)
                metrics.REFUSED.labels(listener.name, "max_connections").inc()
                self._refuse(conn, settings, replies.TOO_MANY_CONNECTIONS, ip)
                return
            sessions = metrics.child(metrics.SESSIONS, listener.name)
            sessions.inc()
            session = Session(conn, ip, settings, self.services, proxy=proxy, load=load)
            me = gevent.getcurrent()
            self.live[me] = session
            load.join(me, session, lim.max_connections, lim.stress_threshold)
            try:
                session.run()
            finally:
                del self.live[me]
                load.leave(me, lim.max_connections, lim.stress_threshold)
                sessions.dec()
                self.connections.leave(key)
        finally:
            conn.close()  # the TLS socket, if the session started TLS

    def _proxied_client(self, listener: ListenerConfig, conn: Connection, peer: str) -> str | None:
        """The real client's address from the PROXY header, or None after closing a
        connection that may not or did not send a good one (no reply: it is not SMTP yet).
        A LOCAL header (a balancer's health check) keeps the balancer's own address."""
        if not is_trusted(ipaddress.ip_address(peer), listener.proxy_trusted):
            metrics.REFUSED.labels(listener.name, "proxy_untrusted").inc()
            logger.warning("refused [{}] on {}: not a trusted PROXY source", peer, listener.name)
            return None
        try:
            info = proxy_protocol.read(conn, listener.proxy_timeout)
        except proxy_protocol.ProxyError as exc:
            metrics.REFUSED.labels(listener.name, "proxy_header").inc()
            logger.warning("refused [{}] on {}: bad PROXY header ({})", peer, listener.name, exc)
            return None
        if info.source is None:
            return peer
        address = ipaddress.ip_address(info.source[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a balancer listening on IPv6 for IPv4 clients
        return str(address)

    def _refuse(self, conn: Connection, settings: SessionSettings, reply: replies.Reply, ip: str) -> None:
        """Turn a connection away with a 421; on an implicit-TLS port the reply goes inside
        TLS like everything else said there (never clear text on a TLS-only port)."""
        logger.info("refused [{}]: {}", ip, reply)
        try:
            if settings.tls == "implicit" and self.services.tls is not None:
                conn.start_tls(self.services.tls.context, settings.handshake_timeout)
            conn.write(reply.to_bytes())
            conn.flush()
        except (HandshakeFailed, ConnectionClosed):
            pass
