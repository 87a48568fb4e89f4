import smtplib


def test_local_delivery_and_alias(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice@example.test", "team@example.test"], b"Subject: t\r\n\r\nbody\r\n")
    msgs = server.wait_for(lambda: server.messages("bob@example.test"))
    assert b"Delivered-To: bob@example.test\n" in msgs[0]
    assert len(server.messages("alice@example.test")) == 1
