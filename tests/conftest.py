import pytest

from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One geosmtp process per test module, with the default test configuration."""
    srv = ServerProcess(tmp_path_factory.mktemp("geosmtp")).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path):
    """Start servers with configuration overrides; all are stopped after the test."""
    started = []

    def make(overrides=None, name="srv"):
        srv = ServerProcess(tmp_path / f"{name}{len(started)}", overrides).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
