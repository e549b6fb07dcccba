"""The stage tests' context: the test config's sites, a fixed keyring, the packaged texts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from careservice.addresses import Addressing
from careservice.config import load_config
from careservice.context import Context
from careservice.crypto import Keyring
from careservice.texts import Texts
from tests.support import write_config


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    config = load_config(write_config(tmp_path, relay_port=1))
    keyring = Keyring(b"k" * 32)
    return Context(config, Addressing(config.sites, keyring), keyring, Texts(
        config.templates_dir, config.sites), time.time)
