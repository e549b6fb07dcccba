"""The runner over a real store: a case whose stage fails is held, counted as stuck, and retried with backoff."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from careservice.addresses import Addressing
from careservice.budget import Budget
from careservice.config import load_config
from careservice.context import Context
from careservice.context import Inputs
from careservice.crypto import Keyring
from careservice.logs import error_fields
from careservice.model import CaseState
from careservice.model import Envelope
from careservice.model import Outcome
from careservice.model import Source
from careservice.runner import Runner
from careservice.store import NewMessage
from careservice.store import Store
from careservice.store import read_status
from careservice.texts import TemplateProblem
from careservice.texts import Texts
from tests.support import CARE
from tests.support import write_config


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[tuple[Context, Store]]:
    config = load_config(write_config(tmp_path, relay_port=1))
    keyring = Keyring(b"k" * 32)
    store = Store(config.data_dir, keyring)
    await store.start(sweep=True)
    yield Context(config, Addressing(config.sites, keyring), keyring, Texts(
        config.templates_dir, config.sites), Clock()), store
    await store.close()


async def test_a_failing_case_is_held_with_backoff_and_counted_as_stuck(
        ctx: tuple[Context, Store], caplog: pytest.LogCaptureFixture) -> None:
    ctx, store = ctx
    clock = ctx.clock
    assert isinstance(clock, Clock)
    failing = True

    def stage(inp: Inputs, ctx: Context) -> Outcome:
        if failing:
            raise TemplateProblem("mail/forward.txt", "not found")
        return Outcome(CaseState.OPEN, "fine")

    runner = Runner(ctx, store, {CaseState.RECEIVED: stage}, {CaseState.OPEN: 86400.0}, lambda: None,
                    Budget.of(512).cases)
    [case_id] = await store.add_inbound([NewMessage("ticketnest", Source.SMTP, Envelope("a@customer.example",
                                                                                            CARE), b"x")], clock.now)
    caplog.set_level(logging.INFO, logger="careservice")
    waits = []
    for _ in range(8):  # 1, 2, 4, ... minutes, then at most an hour
        assert await runner.run_due() == 1
        assert await runner.run_due() == 0  # held: not retried at once
        waits.append(round(_next_run(ctx, case_id) - clock.now))
        clock.now += waits[-1]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert read_status(ctx.config.data_dir)["stuck_cases"] == 1
    failures = [r.getMessage() for r in caplog.records if "case_stage_failed" in r.getMessage()]
    assert len(failures) == 8  # one line per retry
    assert "template=mail/forward.txt" in failures[0] and "failures=1 retry_in=60" in failures[0]
    failing = False
    assert await runner.run_due() == 1
    assert read_status(ctx.config.data_dir)["stuck_cases"] == 0


def _next_run(ctx: Context, case_id: str) -> float:
    conn = sqlite3.connect(ctx.config.data_dir / "cases.db")
    try:
        return conn.execute("SELECT next_run FROM cases WHERE id=?", (case_id,)).fetchone()[0]
    finally:
        conn.close()


def test_error_fields_name_a_template_but_no_message() -> None:
    try:
        raise TemplateProblem("mail/ixs/ack.txt", "line 3: secret@example.org")
    except TemplateProblem as exc:
        fields = error_fields(exc)
    assert "template=mail/ixs/ack.txt" in fields and "secret" not in fields
