"""The store's operator commands: `careservice migrate` (schema versions) and `rotate-master-key`.

The rotation, in an order that survives a crash at any step and nodes that keep running:
1. the current key is copied to `<master_key_file>.old-<UTC time>` (0600), which stays until the
   operator deletes it: keyrings load the old keys beside the file, so nothing becomes unreadable;
2. a new key replaces the file atomically (written beside it, fsynced, renamed); running nodes notice
   the file's change before their next wrap, and at an unwrap that fails;
3. every case key and day secret is wrapped under the new key (keys already under it are left);
4. after GRACE seconds, a second pass catches keys a node wrapped in the moment it read the old file.
Running the command again after a crash finishes the job (and rotates once more).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from pathlib import Path

from careservice.config import Config
from careservice.crypto import Keyring, MasterKeyError, load_master_key, master_key_from_env
from careservice.settings import StoreConfig
from careservice.store import Store

GRACE = 3.0  # longer than a store transaction that read the key file before it changed


def migrate(store: StoreConfig, data_dir: Path | None = None) -> list[str]:
    """Bring the store's schema to this version; one line per database for the operator."""
    if not store.shared:
        assert data_dir is not None
        from careservice.store.schema import connect

        connect(data_dir).close()  # SQLite's schema is made (and brought up) as the files open
        return [f"sqlite {data_dir}: current"]
    from careservice.store.pg import schema

    lines = []
    for key, url, migrations in (("url", store.url, schema.CASES), ("keys_url", store.keys_url, schema.KEYS)):
        before, after = schema.migrate(url, migrations)
        lines.append(f"store.{key}: schema version {before} -> {after}" if before != after
                     else f"store.{key}: schema version {after}, current")
    return lines


def _write_new(path: Path, key: bytes) -> None:
    """`key` (base64) to a new file `path`, 0600, synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _replace(path: Path, key: bytes) -> None:
    """`key` to `path` atomically: a new file beside it, renamed over it, the directory synced."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_new(temp, key)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rotate_master_key(config: Config, grace: float = GRACE) -> tuple[Path, int]:
    """Rotate (see the module text); the old key's file and how many wrapped keys changed."""
    if master_key_from_env() is not None:
        raise MasterKeyError("the master key comes from $CARESERVICE_MASTER_KEY: rotate it where it is kept, "
                             "or use security.master_key_file")
    path = config.master_key_file
    old = load_master_key(path, create=False)
    kept = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    _write_new(kept, old)
    _replace(path, secrets.token_bytes(32))
    return kept, asyncio.run(_rewrap(config, grace))


async def _rewrap(config: Config, grace: float) -> int:
    store = Store(config.data_dir, Keyring.load(config.master_key_file, create=False), durable=True,
                  backend=config.store)
    await store.start(sweep=False)
    try:
        done = await store.rewrap_keys()
        await asyncio.sleep(grace)
        return done + await store.rewrap_keys()
    finally:
        await store.close()
