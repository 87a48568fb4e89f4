"""geosmtp-queue opens the spool as the server does: its changes (hold, requeue, delete...)
are made durable by the configured flush method, not by a default of its own."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from geosmtp.queuectl import commands
from geosmtp.spool import Spool


@pytest.mark.parametrize("method", ["syncfs", "fsync"])
def test_the_tool_flushes_the_way_the_server_is_configured_to(tmp_path, monkeypatch, method):
    spool_dir = tmp_path / "spool"
    Spool(spool_dir).recover()  # makes the directories, as a server's start-up does
    config = tmp_path / "geosmtp.toml"
    config.write_text(f'[server]\nhostname = "mx.example.test"\nspool_dir = "{spool_dir}"\n'
                      f'spool_flush = "{method}"\n'
                      '[[listener]]\nname = "mx"\naddress = "127.0.0.1:2525"\n')
    seen = []
    monkeypatch.setattr(commands, "Ctl", lambda spool, path: seen.append(spool.commits.method))
    result = CliRunner().invoke(commands.main, ["-c", str(config), "summary"])
    assert seen == [method], result.output
