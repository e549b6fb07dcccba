"""One IMAP mailbox, two nodes on one PostgreSQL: only the node holding the mailbox's lease polls it,
and when that node dies (kill -9) the other takes the mailbox over within 30 seconds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from careservice.intake.mailboxlease import LEASE
from careservice.intake.mailboxlease import RENEW
from careservice.settings import StoreConfig
from tests.dovecot import DovecotServer
from tests.postgres import with_store
from tests.reliability.test_pg_nodes import kill_node
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import imap_config
from tests.support import wait_for

pytestmark = pytest.mark.imap
TAKEOVER = 30.0  # the bound


def polls(node: Daemon) -> bool:
    return "imap_connected" in node.log.read_text()


def test_a_mailbox_is_polled_by_one_node_and_moves_when_it_dies(tmp_path: Path, relay: CaptureRelay,
                                                                 dovecot: DovecotServer, pg_store: StoreConfig) -> None:
    assert LEASE + RENEW < TAKEOVER
    first = Daemon(with_store(imap_config(tmp_path / "a", relay, dovecot, poll_seconds=1), pg_store)).start()
    second_config = with_store(imap_config(tmp_path / "b", relay, dovecot, poll_seconds=1), pg_store)
    shutil.copy2(tmp_path / "a" / "master.key", tmp_path / "b" / "master.key")
    second = Daemon(second_config).start()
    try:
        wait_for(lambda: polls(first), what="the first node polling")
        dovecot.append(customer_mail("Before the kill", "first", sender="m1@customer.example"))
        wait_for(lambda: len(relay.to(STAFF)) == 1, what="forward of the first mail")
        time.sleep(RENEW + 1)  # the second node asked for the lease at least once more meanwhile
        assert not polls(second)
        kill_node(first, restart=False)
        killed = time.monotonic()
        dovecot.append(customer_mail("After the kill", "second", sender="m2@customer.example"))
        wait_for(lambda: polls(second), timeout=TAKEOVER, what="the mailbox taken over by the other node")
        print(f"mailbox taken over after {time.monotonic() - killed:.1f} s")
        wait_for(lambda: len(relay.to(STAFF)) == 2, what="forward of the mail sent after the kill")
    finally:
        first.stop()
        second.stop()
