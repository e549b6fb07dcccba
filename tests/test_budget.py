"""service.worker_memory_mb: batches closed by stored bytes, and a budget too small for one message refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from careservice.budget import Budget
from careservice.budget import first_fit
from careservice.budget import min_memory_mb
from careservice.config import ConfigError
from careservice.config import load_config
from tests.reliability.helpers import set_keys
from tests.support import write_config


def test_the_oldest_item_goes_first_however_large_and_smaller_ones_fill_the_rest() -> None:
    sized = [("big1", 90), ("big2", 90), ("small1", 5), ("big3", 90), ("small2", 5)]
    assert first_fit(sized, 64, 100) == ["big1", "small1", "small2"]
    assert first_fit(sized, 2, 100) == ["big1", "small1"]
    assert first_fit([("huge", 500), ("small", 1)], 64, 100) == ["huge"]
    assert first_fit([], 64, 100) == []


def test_the_budget_grows_with_the_memory_and_splits_between_stages_and_outbox() -> None:
    small, large = Budget.of(256), Budget.of(1024)
    assert 0 < small.cases < large.cases and 0 < small.mail < large.mail
    assert min_memory_mb(10_000_000) == 208


def test_a_budget_that_cannot_hold_one_largest_message_is_refused(tmp_path: Path) -> None:
    config = set_keys(write_config(tmp_path, 1), "smtp", max_message_bytes=10_000_000)
    assert load_config(set_keys(config, "service", worker_memory_mb=208)).worker_memory_mb == 208
    with pytest.raises(ConfigError, match="at least 208") as raised:
        load_config(set_keys(config, "service", worker_memory_mb=207))
    assert raised.value.key == "service.worker_memory_mb"
