"""The parts both processes build from the config: the master key, the store and the stages' context."""

from __future__ import annotations

import os
import time
from pathlib import Path

from careservice.addresses import Addressing
from careservice.config import Config
from careservice.context import Context
from careservice.crypto import Keyring
from careservice.store import Store
from careservice.store.shards import ONE
from careservice.texts import Texts


def read_secret(path: str, env: str) -> str:
    """A secret from the environment variable `env`, else from the file `path` ("" if neither)."""
    if env in os.environ:
        return os.environ[env]
    return Path(path).read_text().strip() if path else ""


def build_context(config: Config, intake: bool, shard: tuple[int, int] = ONE) -> tuple[Context, Store]:
    """The stages' context and the store, keyed by the master key, as both processes need them.

    Only the intake process creates a missing master key, and only its commits must be on disk
    before they are answered; a worker's store runs inline and takes the work of its `shard` (see
    careservice.store).
    """
    keyring = Keyring.load(config.master_key_file, create=intake)
    store = Store(config.data_dir, keyring, durable=intake, inline=not intake, backend=config.store, shard=shard)
    texts = Texts(config.templates_dir, config.sites)
    return Context(config, Addressing(config.sites, keyring), keyring, texts, time.time), store
