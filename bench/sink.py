#!/usr/bin/env python3
"""A fast SMTP sink for bench/outbound.py when Postfix's smtp-sink is not installed:
gevent, PIPELINING, answers 250 to everything and throws the mail away.
Usage: sink.py ADDRESS PORT"""
from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

EHLO = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n"


def handle(sock, _addr):
    sock.settimeout(60)
    sock.sendall(b"220 sink ESMTP\r\n")
    buf = b""
    in_data = False
    try:
        while True:
            data = sock.recv(262144)
            if not data:
                return
            buf += data
            out = []
            while True:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end < 0:
                        buf = buf[-4:]
                        break
                    buf = buf[end + 5:]
                    in_data = False
                    out.append(b"250 2.0.0 Ok\r\n")
                    continue
                nl = buf.find(b"\r\n")
                if nl < 0:
                    break
                line, buf = buf[:nl].upper(), buf[nl + 2:]
                if line.startswith(b"EHLO"):
                    out.append(EHLO)
                elif line == b"DATA":
                    out.append(b"354 go\r\n")
                    in_data = True
                    buf = b"\r\n" + buf  # the end marker may follow at once
                elif line == b"QUIT":
                    sock.sendall(b"".join(out) + b"221 bye\r\n")
                    return
                else:
                    out.append(b"250 2.0.0 Ok\r\n")
            if out:
                sock.sendall(b"".join(out))
    except OSError:
        return
    finally:
        sock.close()


if __name__ == "__main__":
    StreamServer((sys.argv[1], int(sys.argv[2])), handle, backlog=1024).serve_forever()
