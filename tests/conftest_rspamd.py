"""Pytest plugin providing the session-wide `rspamd` fixture (pytest_plugins = ["tests.conftest_rspamd"])."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rspamd import RspamdServer
from tests.rspamd import rspamd_binary
from tests.rspamd import start_rspamd


def rspamd_cache(factory: pytest.TempPathFactory) -> Path:
    """The hyperscan cache beside the runs' temp folders, kept across sessions: a cold start takes 9-12 s."""
    return factory.getbasetemp().parent / "rspamd-hs-cache"


def private_rspamd(factory: pytest.TempPathFactory) -> RspamdServer:
    """A started rspamd of the caller's own (to stop it, say); skips the test when rspamd is not installed."""
    if rspamd_binary() is None:
        pytest.skip("rspamd not installed (apt-get install rspamd)")
    return start_rspamd(factory.mktemp("rspamd"), rspamd_cache(factory))


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdServer]:
    """One rspamd for the session (it keeps no state between checks: no redis), stopped at its end."""
    server = private_rspamd(tmp_path_factory)
    try:
        yield server
    finally:
        server.stop()
