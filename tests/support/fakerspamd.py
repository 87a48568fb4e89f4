"""A scriptable stand-in for rspamd's HTTP worker, for tests: a threaded HTTP/1.1 server on
loopback that keeps connections open, records every request and answers as told.

    srv = FakeRspamd(lambda req: reply(action="no action")).start()
    ... RSpamdCheck({"url": srv.url}, ...) ...
    srv.requests      # every request: .method .path .headers [(name, value), ...] .body
    srv.connections   # connections accepted so far

`answer(request)` returns None (the default: "pong" for /ping, a "no action" reply for
/checkv2), an Answer (status, headers, body; `delay` before it is sent,
`drip` seconds between its octets) or CLOSE (the connection closed without a reply).
/ping is answered "pong" unless `answer` says otherwise for it.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.server import free_port

CLOSE = object()


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # which connection it came on (1, 2, ...)

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    drip: float = 0.0
    close: bool = False  # "Connection: close", as rspamd's normal worker answers
    no_length: bool = False  # no Content-Length: the body ends when the connection closes


def reply(action: str = "no action", score: float = 0.5, required: float = 15.0, **more) -> Answer:
    """An Answer with rspamd's /checkv2 JSON: action, score, required_score and `more`."""
    close = more.pop("close", False)
    return Answer(json.dumps({"is_skipped": False, "score": score, "required_score": required,
                              "action": action, "symbols": {}, **more}).encode(), close=close)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        srv = self.server.fake
        with srv.lock:
            srv.connections += 1
            self.number = srv.connections
        super().handle()

    def _request(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        req = Request(self.command, self.path, list(self.headers.items()), body, self.number)
        srv = self.server.fake
        with srv.lock:
            srv.requests.append(req)
        answer = srv.answer(req)
        if answer is None:
            answer = Answer(b"pong\r\n") if req.path == "/ping" else reply()
        if answer is CLOSE:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if answer.delay:
            time.sleep(answer.delay)
        head = [f"HTTP/1.1 {answer.status} X\r\n"]
        headers = {"Content-Type": "application/json", "Content-Length": str(len(answer.body)), **answer.headers}
        if answer.no_length:
            del headers["Content-Length"]
        if answer.close or answer.no_length:
            headers["Connection"] = "close"
            self.close_connection = True
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        data = "".join(head).encode() + b"\r\n" + answer.body
        try:
            if answer.drip:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(answer.drip)
            else:
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = _request


class FakeRspamd:
    def __init__(self, answer=lambda request: None):
        self.answer = answer
        self.requests: list[Request] = []
        self.connections = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def checks(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/checkv2"]

    def start(self) -> "FakeRspamd":
        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
