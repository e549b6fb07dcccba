"""Hardening, privacy: traces that must not outlive their purpose, keys that must not move, no clear relay."""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from careservice import crypto
from careservice.config import ConfigError
from careservice.config import load_config
from careservice.crypto import MASTER_KEY_ENV
from careservice.crypto import NONCE_BYTES
from careservice.crypto import Keyring
from careservice.crypto import load_master_key
from careservice.crypto import worker_environment
from careservice.model import Envelope
from careservice.model import Source
from careservice.store import NewMessage
from careservice.store import Store
from careservice.store import StoreError
from careservice.store import tallies
from tests.reliability.helpers import set_keys
from tests.support import CARE
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import send
from tests.support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.reliability
MASTER = b"m" * 32


def message(dedupe: bytes = b"") -> NewMessage:
    return NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example", CARE), b"Subject: x\r\n\r\nx",
                      dedupe=dedupe)


def rows(data_dir: Path, table: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(data_dir / "cases.db")
    try:
        conn.execute("ATTACH DATABASE ? AS k", (str(data_dir / "keys.db"),))
        return conn.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        conn.close()


async def test_yesterdays_digests_cannot_be_tested_from_a_copy_of_the_store(tmp_path: Path) -> None:
    """The attack: with a copy of data_dir and the master key, test whether an address wrote in a given
    hour (ack_rate) or whether a message was taken (seen). Before: both recomputed from the master key,
    and kept until a later acknowledgement or for 14 days."""
    keyring = Keyring(MASTER)
    store = Store(tmp_path, keyring)
    await store.start(sweep=True)
    now = time.time()
    address = "alice@customer.example"
    yesterday = keyring.digest(address)
    assert await store.executor.call(tallies.take_ack_slots, ((yesterday, 5),), int(now // 3600))
    await store.add_inbound([message(keyring.digest("imap|ticketnest|<m@x>|body"))], now)
    assert rows(tmp_path, "ack_rate") and rows(tmp_path, "k.seen") and len(rows(tmp_path, "k.daily")) == 1
    await store.rotate_digests(now + 86400)  # the next day's first sweep, with no acknowledgement since
    await store.close()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("cases.db", "keys.db"):
        shutil.copy(tmp_path / name, copy / name)
    assert rows(copy, "ack_rate") == [] and rows(copy, "k.seen") == []
    [(day, wrapped)] = rows(copy, "k.daily")
    assert day == int((now + 86400) // 86400)
    tester = Keyring(MASTER)  # the attacker: every secret the copy and the master key still give
    tester.use_daily_secret(tester.unwrap(wrapped, f"daily:{day}"))  # type: ignore[arg-type]
    assert tester.digest(address) != yesterday  # its secret is gone for good
    assert Keyring(MASTER).digest(address) != yesterday  # and the master key alone never gave it
    for file in copy.iterdir():
        assert yesterday not in file.read_bytes()


async def test_a_crash_and_restart_on_the_same_day_still_deduplicates(tmp_path: Path) -> None:
    first = Store(tmp_path, Keyring(MASTER))
    await first.start(sweep=True)
    digest = first.keyring.digest("imap|ticketnest|<m@x>|body")
    assert (await first.add_inbound([message(digest)], time.time()))[0]
    await first.close()
    second = Store(tmp_path, Keyring(MASTER))  # a new process: the same day's secret comes from keys.db
    await second.start(sweep=True)
    try:
        again = second.keyring.digest("imap|ticketnest|<m@x>|body")
        assert again == digest and await second.add_inbound([message(again)], time.time()) == [""]
    finally:
        await second.close()


async def test_a_wrapped_case_key_opens_only_its_own_case(tmp_path: Path) -> None:
    """The attack: move case B's wrapped key onto case A's row (or swap them); before, any wrapped key
    opened under any id, since all were bound to one fixed label."""
    store = Store(tmp_path, Keyring(MASTER))
    await store.start(sweep=True)
    a, b = await store.add_inbound([message(), message()], time.time())
    await store.close()
    conn = sqlite3.connect(tmp_path / "keys.db")
    key_b = conn.execute("SELECT wrapped FROM keys WHERE id=?", (b,)).fetchone()[0]
    conn.execute("UPDATE keys SET wrapped=? WHERE id=?", (key_b, a))
    conn.commit()
    conn.close()
    store = Store(tmp_path, Keyring(MASTER))
    await store.start(sweep=False)
    try:
        assert await store.get_case(b) is not None
        with pytest.raises(StoreError):
            await store.get_case(a)
    finally:
        await store.close()


async def test_keys_of_the_previous_version_are_bound_to_their_case_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path, Keyring(MASTER))
    await store.start(sweep=True)
    [case_id] = await store.add_inbound([message()], time.time())
    await store.close()
    conn = sqlite3.connect(tmp_path / "keys.db")  # what version 0.1 wrote: one fixed label for every key
    wrap = AESGCM(Keyring._derive(MASTER, b"careservice wrap v1"))
    data_key = Keyring(MASTER).unwrap(conn.execute("SELECT wrapped FROM keys").fetchone()[0], f"case:{case_id}")
    nonce = secrets.token_bytes(NONCE_BYTES)
    conn.execute("UPDATE keys SET wrapped=?", (nonce + wrap.encrypt(nonce, data_key, b"case-key"),))
    conn.commit()
    conn.close()
    store = Store(tmp_path, Keyring(MASTER))
    await store.start(sweep=True)
    try:
        case = await store.get_case(case_id)
        assert case is not None and case.message.raw == b"Subject: x\r\n\r\nx"
        [(wrapped,)] = [(w,) for _, w in rows(tmp_path, "k.keys")]
        assert len(wrapped) == 61  # rewrapped, bound to the case
    finally:
        await store.close()


def test_smtp_relay_in_clear_is_refused_unless_allowed(tmp_path: Path) -> None:
    """Before: smtp:// to any host, with a username, logged in and sent mail in clear without a word."""
    config = write_config(tmp_path, 25)
    for url, extra in (("smtp://relay.example.net:25", {}), ("smtp://127.0.0.1:25", {"username": "care"})):
        set_keys(config, "relay", url=url, **extra)
        with pytest.raises(ConfigError) as raised:
            load_config(config)
        assert raised.value.key == "relay.url" and "allow_plaintext" in str(raised.value)
        result = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "in clear" in result.stderr
    set_keys(config, "relay", allow_plaintext=True)
    assert load_config(config).relay.username == "care"
    set_keys(config, "relay", url="smtp+starttls://relay.example.net:587", allow_plaintext=False)
    assert load_config(config).relay.scheme == "smtp+starttls"


def test_the_master_key_lives_outside_data_dir(tmp_path: Path) -> None:
    config = write_config(tmp_path, 1)
    assert load_config(config).master_key_file == tmp_path / "master.key"
    text = config.read_text().replace('master_key_file = "master.key"', "")
    config.write_text(text)
    assert load_config(config).master_key_file == tmp_path / "master.key"  # the default: beside the config
    set_keys(config, "security", master_key_file="data/master.key")
    result = subprocess.run([sys.executable, "-m", "careservice", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "inside service.data_dir" in result.stderr


def test_the_master_key_leaves_the_environment_once_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    value = base64.b64encode(MASTER).decode()
    monkeypatch.setattr(crypto, "_env_key", None)  # restored afterwards: later tests read key files
    monkeypatch.setenv(MASTER_KEY_ENV, value)
    assert load_master_key(Path("/nonexistent"), create=False) == MASTER
    assert MASTER_KEY_ENV not in os.environ
    assert load_master_key(Path("/nonexistent"), create=False) == MASTER  # read once, kept for this process
    assert worker_environment()[MASTER_KEY_ENV] == value  # the worker child alone gets it


def test_a_daemon_keyed_from_the_environment_works_and_writes_no_key_file(tmp_path: Path,
                                                                         relay: CaptureRelay) -> None:
    import base64

    daemon = Daemon(write_config(tmp_path, relay.port),
                    env={MASTER_KEY_ENV: base64.b64encode(secrets.token_bytes(32)).decode()}).start()
    try:
        send(daemon.smtp_port, "alice@customer.example", [CARE], customer_mail("Env key", "works"))
        wait_for(lambda: relay.to("alice@customer.example"), what="acknowledgement (the worker opened the case)")
        assert not (tmp_path / "master.key").exists()
    finally:
        daemon.stop()
