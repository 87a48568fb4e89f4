"""geosmtp.parts: what the server builds from a config lends the checks the directory's
own view of which domains are ours (with SQL too: not a copy of [local] domains)."""
from __future__ import annotations

from geosmtp import parts
from geosmtp.config import load

CONFIG = """
[server]
hostname = "mx.example.test"
spool_dir = "{spool}"
[[listener]]
name = "mx"
address = "127.0.0.1:2525"
{directory}
[[check]]
type = "python"
module = "tests.support.custom_checks:Returns"
"""


def built_check(tmp_path, directory: str):
    path = tmp_path / "geosmtp.toml"
    path.write_text(CONFIG.format(spool=tmp_path / "spool", directory=directory))
    built = parts.build(load(path), delivers=False, run=lambda fn, *a: fn(*a))
    return built.checks["mx"].specs[0].check


def test_checks_ask_the_toml_directory_which_domains_are_ours(tmp_path):
    check = built_check(tmp_path, '[local]\ndomains = ["example.test"]\n')
    assert check.context.is_local("EXAMPLE.test") and not check.context.is_local("other.test")


def test_checks_ask_the_sql_directory_which_domains_are_ours(tmp_path):
    from click.testing import CliRunner

    from geosmtp.cli import main

    db, cfg = tmp_path / "directory.sqlite", tmp_path / "geosmtp.toml"
    directory = f'[directory]\nbackend = "sqlite"\npath = "{db}"\ncache_ttl = 0\n'
    cfg.write_text(CONFIG.format(spool=tmp_path / "spool", directory=directory))
    for args in (["directory", "init"], ["directory", "add-domain", "sql.test"]):
        result = CliRunner().invoke(main, [*args[:2], "-c", str(cfg), *args[2:]])
        assert result.exit_code == 0, result.output
    check = built_check(tmp_path, directory)
    assert check.context.is_local("sql.test") and not check.context.is_local("example.test")


def test_a_maildir_on_the_spools_filesystem_shares_its_flush_rounds(tmp_path):
    """One flush then covers a delivery's rename and the queue entry's removal; a Maildir on
    another filesystem (/dev/shm, a tmpfs) flushes its own."""
    import tempfile

    from geosmtp.groupcommit import GroupCommit

    spool_commits = GroupCommit(tmp_path, lambda fn, *a: fn(*a))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        for root, shared in ((tmp_path / "mail", True), (f"{elsewhere}/mail", False)):
            path = tmp_path / "geosmtp.toml"
            path.write_text(CONFIG.format(spool=tmp_path / "spool", directory="")
                            + f'[local]\ndomains = ["example.test"]\nmaildir_root = "{root}"\n')
            built = parts.build(load(path), delivers=True, run=lambda fn, *a: fn(*a), commits=spool_commits)
            assert (built.router.local.commits is spool_commits) is shared
