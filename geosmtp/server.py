"""The running server: listeners, per-connection greenlets, the queue manager, signals.

This module and the CLI are the only readers of the configuration; everything they build
gets plain values. One gevent StreamServer per [[listener]] spawns a greenlet per connection
that runs a Session; the spool, directory and queue manager are shared.
"""
from __future__ import annotations

import signal
import socket
from collections import Counter
from functools import partial

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer
from loguru import logger

from geosmtp import replies
from geosmtp.config import Config, ListenerConfig
from geosmtp.connection import Connection
from geosmtp.delivery.local import MaildirDelivery
from geosmtp.policy import LocalDirectory
from geosmtp.queue import QueueManager
from geosmtp.session import Session, SessionSettings
from geosmtp.spool import Spool

LISTEN_BACKLOG = 1024
# Disk work (fsync, big writes) runs in gevent's threadpool. A few fsyncs in flight at
# once keep the disk busy (and share journal commits); measured here, 8 threads did as well
# as 16 or 32 with less CPU spent on lock contention in the kernel.
IO_THREADS = 8
STOP_GRACE = 10.0  # seconds open sessions get to finish when the server stops


class Server:
    def __init__(self, config: Config):
        self.config = config
        hub = gevent.get_hub()
        hub.threadpool.maxsize = IO_THREADS

        def run(fn, *args):
            return hub.threadpool.apply(fn, args)

        self.spool = Spool(config.server.spool_dir, run=run)
        local = config.local
        self.directory = LocalDirectory(
            domains=frozenset(local.domains),
            users=frozenset(local.users),
            aliases={k: tuple(v) for k, v in local.aliases.items()},
        )
        self.maildir = MaildirDelivery(local.maildir_root, config.server.hostname, self.directory.users, run)
        q = config.queue
        self.queue = QueueManager(
            self.spool,
            self.maildir,
            self.directory.domains,
            concurrency=q.concurrency,
            retry_schedule=q.retry_schedule,
            max_lifetime=q.max_lifetime,
            scan_interval=q.scan_interval,
        )
        self.sessions = gevent.pool.Group()
        self.active: Counter[str] = Counter()  # open sessions per listener
        self.per_ip: Counter[str] = Counter()
        self.servers: list[StreamServer] = []
        self.stopped = gevent.event.Event()

    def settings_for(self, listener: ListenerConfig) -> SessionSettings:
        c = self.config
        lim = c.limits
        return SessionSettings(
            hostname=c.server.hostname,
            listener=listener.name,
            mode=listener.mode,
            max_message_size=lim.max_message_size,
            max_recipients=lim.max_recipients,
            max_line_length=lim.max_line_length,
            command_timeout=lim.command_timeout,
            data_timeout=lim.data_timeout,
            max_errors=lim.max_errors,
            normalize_newlines=c.server.bare_newline == "normalize",
            hold=listener.hold,
            trusted_networks=tuple(c.relay.trusted_networks),
        )

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        recovered = self.spool.recover()
        for listener in self.config.listener:
            handler = partial(self.handle, listener, self.settings_for(listener))
            server = StreamServer((listener.host, listener.port), handler, spawn=self.sessions.spawn,
                                  backlog=LISTEN_BACKLOG)
            server.start()
            self.servers.append(server)
            logger.info("listening on {} ({}, mode {})", listener.address, listener.name, listener.mode)
        self.queue.start(recovered)

    def serve_forever(self) -> None:
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, lambda: gevent.spawn(self.stop))
        self.stopped.wait()

    def stop(self) -> None:
        """Stop accepting, let open sessions finish briefly, stop delivery. Never raises."""
        if self.stopped.is_set():
            return
        try:
            logger.info("stopping: {} open sessions", len(self.sessions))
            for server in self.servers:
                server.close()
            self.sessions.join(timeout=STOP_GRACE)
            self.sessions.kill(block=True, timeout=2)
            self.queue.stop(timeout=STOP_GRACE)
            logger.info("stopped")
        except BaseException:  # never leave a half-stopped process running
            logger.exception("error while stopping")
        finally:
            self.stopped.set()

    # -- one connection ---------------------------------------------------------------------
    def handle(self, listener: ListenerConfig, settings: SessionSettings, sock: socket.socket, addr) -> None:
        ip = addr[0]
        lim = self.config.limits
        sock.settimeout(settings.command_timeout)  # bounds every send; reads have their own
        try:
            if self.active[listener.name] >= lim.max_connections:
                self._refuse(sock, replies.TOO_MANY_CONNECTIONS, ip)
                return
            if self.per_ip[ip] >= lim.max_connections_per_ip:
                self._refuse(sock, replies.TOO_MANY_FROM_YOU, ip)
                return
            self.active[listener.name] += 1
            self.per_ip[ip] += 1
            try:
                Session(Connection(sock, settings.command_timeout), ip, settings, self.spool, self.directory, self.queue.notify).run()
            finally:
                self.active[listener.name] -= 1
                self.per_ip[ip] -= 1
                if not self.per_ip[ip]:
                    del self.per_ip[ip]
        finally:
            sock.close()

    @staticmethod
    def _refuse(sock: socket.socket, reply: replies.Reply, ip: str) -> None:
        logger.info("refused [{}]: {}", ip, reply)
        try:
            sock.sendall(reply.to_bytes())
        except OSError:
            pass
