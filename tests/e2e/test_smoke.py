import smtplib


def test_local_delivery_and_alias(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice@example.test", "team@example.test"], b"Subject: t\r\n\r\nbody\r\n")
    msgs = server.wait_for(lambda: server.messages("bob@example.test"))
    assert b"Delivered-To: bob@example.test\n" in msgs[0]
    assert len(server.messages("alice@example.test")) == 1


def test_mailboxes_are_private(server):
    """Every level the Maildir target creates is 0700 and every message 0600: Dovecot copies
    these modes to its index files, which hold subjects and senders."""
    import stat

    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["carol@other.test"], b"Subject: private\r\n\r\nbody\r\n")
    msgs = server.wait_for(lambda: list((server.maildir("carol@other.test") / "new").glob("*"))
                           if (server.maildir("carol@other.test") / "new").is_dir() else None)
    box = server.maildir("carol@other.test")
    for path in (server.maildir_root, box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(msgs[0].stat().st_mode) == 0o600


def test_sub_addresses_reach_the_mailbox(server, tmp_path):
    before = len(server.messages("alice@example.test"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("x@remote.test", ["alice+lists@example.test"], b"Subject: sub\r\n\r\nbody\r\n")
    server.wait_for(lambda: len(server.messages("alice@example.test")) == before + 1)

    from tests.support.server import ServerProcess

    off = ServerProcess(tmp_path / "off", {"local": {"recipient_delimiter": ""}}).start()
    try:
        with smtplib.SMTP("127.0.0.1", off.port, timeout=10) as c:
            c.ehlo()
            c.mail("x@remote.test")
            code, text = c.rcpt("alice+lists@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
    finally:
        off.stop()
