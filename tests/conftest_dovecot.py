"""Pytest plugin providing the `dovecot` fixture (enable with pytest_plugins = ["tests.conftest_dovecot"])."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dovecot import DovecotServer
from tests.dovecot import dovecot_binary
from tests.dovecot import start_dovecot


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[DovecotServer]:
    """A started private Dovecot (user care/secret) in tmp_path, stopped after the test."""
    if dovecot_binary() is None:
        pytest.skip("dovecot binary not found (apt-get install dovecot-imapd)")
    server = start_dovecot(tmp_path)
    try:
        yield server
    finally:
        server.stop()
