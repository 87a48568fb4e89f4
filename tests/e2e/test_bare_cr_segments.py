"""End to end: with bare_newline = "normalize", a message whose lines end in bare CRs gets the
same answer and is stored the same however its octets are cut into TCP segments (the fuzzer
once found 250 in one segment and 552 "line too long" in several)."""
import socket
import time

import pytest

from tests.support.e2e import connect, queue_id, start_data, wait_delivered
from tests.support.server import ServerProcess

MAX_LINE = 1_000
LINES = [b"line %02d of a message whose lines end in a bare CR" % i for i in range(60)]
BODY = b"Subject: bare CR\r" + b"\r".join(LINES)  # 3 KB before the first LF
STORED = b"Subject: bare CR\r\n" + b"\r\n".join(LINES) + b"\r\n"


@pytest.fixture(scope="module")
def normalizing(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("bare-cr"), {
        "server": {"bare_newline": "normalize"}, "limits": {"max_line_length": MAX_LINE}}).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("segment", [None, 1500, 400, 37])
def test_bare_cr_message_is_stored_alike_in_any_segments(normalizing, segment):
    wire = BODY + b"\r\n.\r\n"
    with connect(normalizing.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start_data(c, "a@remote.test", ["alice@example.test"])
        step = segment or len(wire)
        for i in range(0, len(wire), step):  # bounded: at most 90 segments
            c.send(wire[i:i + step])
            time.sleep(0.01)  # the server takes each segment in a receive of its own
        qid = queue_id(c.reply())
    delivered = wait_delivered(normalizing, "alice@example.test", qid)  # LF line ends in a Maildir
    assert delivered.endswith(STORED.replace(b"\r\n", b"\n"))
    assert b"\r" not in delivered
