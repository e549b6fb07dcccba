"""The one-screen table: every state has its stage, and no stage does I/O."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import careservice.handlers as handlers
from careservice.handlers import DIGEST
from careservice.handlers import EVENTS
from careservice.handlers import STAGES
from careservice.model import CaseState

WAITING = {CaseState.ANSWERING, CaseState.PURGED}  # moved on by the outbox, or gone


def test_every_state_has_a_stage_and_every_stage_module_is_wired() -> None:
    assert set(STAGES) == set(CaseState) - WAITING
    wired = {fn.__module__.rsplit(".", 1)[1] for fn in (*STAGES.values(), *EVENTS.values(), DIGEST)}
    assert wired == {m.name for m in pkgutil.iter_modules(handlers.__path__)}


def test_stages_import_no_io() -> None:
    for module in pkgutil.iter_modules(handlers.__path__):
        source = Path(handlers.__path__[0], module.name + ".py").read_text()
        for forbidden in ("careservice.store", "sqlite3", "aiosmtplib", "careservice.intake", "careservice.outbox",
                          "socket", "asyncio"):
            assert f"import {forbidden}" not in source and f"from {forbidden} " not in source, (module, forbidden)
