"""Lawful disclosure: `careservice cases --json` lists the open cases, `careservice export` writes one
open case as an mbox file (mode 0600) and counts it per site and day as `disclosures`.

Both read the store with the master key while the daemon runs (each read and write is one store
transaction); the log names the exported case's id and nothing else.
"""

from __future__ import annotations

import logging
import mailbox
import os
import time
from dataclasses import asdict
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from careservice.config import Config
from careservice.crypto import Keyring
from careservice.model import Case
from careservice.store import Store, StoreError

log = logging.getLogger("careservice.disclosure")


class CaseGone(Exception):
    """The case is not open: answered, closed, expired (and deleted), or never existed."""


async def _store(config: Config) -> Store:
    if not config.store.shared and not (config.data_dir / "cases.db").exists():  # never create an empty store elsewhere
        raise StoreError(f"no store in {config.data_dir} (service.data_dir)")
    store = Store(config.data_dir, Keyring.load(config.master_key_file, create=False), inline=True,
                  backend=config.store)
    await store.start(sweep=False)
    return store


async def list_cases(config: Config, now: float) -> list[dict[str, Any]]:
    """Every open case: id, site, state, age in seconds and owner (the staff address, or None)."""
    store = await _store(config)
    try:
        rows = await store.open_cases()
    finally:
        await store.close()
    return [{"id": case_id, "site": site, "state": state, "age": int(now - created), "owner": owner or None}
            for case_id, site, state, created, owner in rows]


async def export_case(config: Config, case_id: str, out: Path, now: float) -> int:
    """Write the open case `case_id` to the new mbox file `out`: the message as received, the mail queued
    under the case (forwards, notes, notices not yet sent) and the contact details; the number of
    messages written. Raises CaseGone, and FileExistsError rather than overwrite `out`."""
    store = await _store(config)
    try:
        found = await store.open_case(case_id)
        if found is None:
            raise CaseGone(case_id)
        case, queued = found
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # 0600 whatever the umask
        box = mailbox.mbox(out, create=False)
        try:
            box.lock()
            for raw in (case.message.raw, *(item.mail.message for item in queued)):
                box.add(raw)
            box.add(_contact_part(case))
            box.flush()
        finally:
            box.unlock()
            box.close()
        await store.add_stats({(case.site, time.strftime("%Y-%m-%d", time.gmtime(now)), "disclosures"): 1})
    finally:
        await store.close()
    log.info("case_exported case=%s", case.id)
    return len(queued) + 2


def _contact_part(case: Case) -> EmailMessage:
    """The contact details the case holds, as a small text message."""
    msg = EmailMessage()
    msg["Subject"] = f"Case {case.id}: contact details"
    msg["Date"] = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(case.created))
    details = asdict(case.contact) if case.contact else {}
    lines = [f"{name}: {value}" for name, value in details.items() if value]
    msg.set_content("\n".join([f"case: {case.id}", f"site: {case.site}", f"state: {case.state}", *lines]) + "\n")
    return msg
