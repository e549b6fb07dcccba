"""Hostile mail through IMAP intake: a message the header parser chokes on must not block the
mailbox (it would be fetched, fail and be fetched again forever, and every later mail behind it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dovecot import DovecotServer
from tests.reliability.helpers import status
from tests.reliability.test_hostile import CATALOGUE
from tests.support import STAFF
from tests.support import CaptureRelay
from tests.support import Daemon
from tests.support import customer_mail
from tests.support import imap_config
from tests.support import wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.imap]

HOSTILE = [h for h in CATALOGUE if h.name in ("nested_comments_from", "from_80k", "mime_1000_deep", "nul_bytes")]


def test_hostile_messages_do_not_block_the_mailbox(tmp_path: Path, relay: CaptureRelay,
                                                   dovecot: DovecotServer) -> None:
    for item in HOSTILE:
        dovecot.append(item.raw.replace(b"\x00", b""))  # IMAP APPEND refuses NUL; the rest goes in as is
    dovecot.append(customer_mail("after-hostile-mark", "a normal mail behind the hostile ones"))
    daemon = Daemon(imap_config(tmp_path / "svc", relay, dovecot)).start()
    try:
        wait_for(lambda: [c for c in relay.to(STAFF) if "after-hostile-mark" in str(c.message["Subject"])],
                 timeout=30, what="the normal mail behind the hostile ones")
        wait_for(lambda: dovecot.count() == 0, what="mailbox drained")
        wait_for(lambda: status(daemon)["inbound_pending"] == 0 and status(daemon)["outbound_queued"] == 0,
                 what="all processed")
        log = daemon.log.read_text()
        assert len(relay.to(STAFF)) + log.count("reason=discard_") == len(HOSTILE) + 1  # a case each, or a discard
        assert "internal_error" not in log
    finally:
        daemon.stop()
