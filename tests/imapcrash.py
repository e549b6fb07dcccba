"""`careservice` that dies like kill -9 at one point of the IMAP intake, for the crash tests:
IMAPCRASH_AT=commit dies once a batch is committed, before its messages are flagged;
IMAPCRASH_AT=flag once they are flagged \\Deleted, before the expunge.
Run as `python -m tests.imapcrash run --config …` with the repo on PYTHONPATH (support.Daemon(module=…))."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from careservice import cli

POINT_ENV = "IMAPCRASH_AT"


def _die() -> None:
    os._exit(137)  # no cleanup, no flush: as a kill -9 leaves it


def _crash_after_commit() -> None:
    from careservice.intake import imap

    committed = imap.MailboxWorker._committed

    def crashing(self: imap.MailboxWorker, pending: imap.Pending) -> list[int]:
        committed(self, pending)
        _die()
        raise AssertionError("unreachable")

    imap.MailboxWorker._committed = crashing  # type: ignore[method-assign]


def _crash_after_flag() -> None:
    from imapclient import DELETED
    from imapclient import IMAPClient

    from careservice.intake import imap

    def crashing(client: IMAPClient, uids: list[int], uidplus: bool) -> int:
        client.add_flags(uids, [DELETED], silent=True)
        _die()
        raise AssertionError("unreachable")

    imap._expunge = crashing


def _share_metrics_then_patch(data_dir: Path, share=cli._share_metrics) -> None:  # noqa: ANN001
    share(data_dir)  # the IMAP intake imports prometheus_client: only after `run` has set its folder
    {"commit": _crash_after_commit, "flag": _crash_after_flag}[os.environ[POINT_ENV]]()


if __name__ == "__main__":
    cli._share_metrics = _share_metrics_then_patch
    sys.exit(cli.main())
