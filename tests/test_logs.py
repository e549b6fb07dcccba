"""The log lines: privacy filtering, and the handler that writes one turn's lines together."""

from __future__ import annotations

import asyncio
import logging
import re
import select
from collections.abc import Iterator

import pytest

from careservice.logs import OWN_PREFIX
from careservice.logs import PrivacyFormatter
from careservice.logs import TurnBufferedHandler

ADDRESS = "alice@customer.example"


class Writes:
    """A stream that keeps each write apart (a write is what reaches the pipe in one piece)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.writes)


Logged = tuple[logging.Logger, logging.Logger, Writes, TurnBufferedHandler]


@pytest.fixture
def logged() -> Iterator[Logged]:
    """Our logger and a library's, both into a TurnBufferedHandler over a Writes stream."""
    stream = Writes()
    handler = TurnBufferedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(PrivacyFormatter())
    ours, library = logging.getLogger(f"{OWN_PREFIX}.testlogs"), logging.getLogger("mail.testlogs")
    for logger in (ours, library):
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    yield ours, library, stream, handler
    for logger in (ours, library):
        logger.removeHandler(handler)
        logger.propagate = True


def test_own_lines_keep_their_text_and_library_lines_lose_their_arguments(logged: Logged) -> None:
    ours, library, stream, _ = logged
    ours.info("case_advanced case=%s to=%s", "0123456789ab", "open")
    library.info("Sender: %s", ADDRESS)
    try:
        raise ValueError(ADDRESS)
    except ValueError:
        ours.exception("intake_failed")
    lines = stream.text.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].endswith(f" INFO {OWN_PREFIX}.testlogs case_advanced case=0123456789ab to=open")
    assert lines[1].endswith(" INFO mail.testlogs library_event template='Sender: %s'")
    assert re.search(r" ERROR careservice\.testlogs intake_failed error=ValueError at=test_logs\.py:\d+$", lines[2])
    assert ADDRESS not in stream.text


def test_the_time_stamp_follows_the_record(logged: Logged) -> None:
    ours, _, stream, _ = logged
    for created in (0.0, 0.5, 1.0, 86_399.9):
        record = ours.makeRecord(ours.name, logging.INFO, __file__, 1, "tick", (), None)
        record.created = created
        ours.handle(record)
    stamps = [line.split()[0] for line in stream.text.splitlines()]
    assert stamps == ["1970-01-01T00:00:00", "1970-01-01T00:00:00", "1970-01-01T00:00:01", "1970-01-01T23:59:59"]


def test_a_turns_first_line_is_written_at_once_and_the_rest_together_at_the_next_turn(logged: Logged) -> None:
    ours, _, stream, _ = logged

    async def turns() -> None:
        ours.info("one")
        assert [w.count("\n") for w in stream.writes] == [1]
        ours.info("two")
        ours.info("three")
        assert [w.count("\n") for w in stream.writes] == [1]  # still this turn
        await asyncio.sleep(0)
        assert [w.count("\n") for w in stream.writes] == [1, 2]
        ours.info("four")  # a turn of its own: at once
        assert [w.count("\n") for w in stream.writes] == [1, 2, 1]
        await asyncio.sleep(0)
        assert [w.count("\n") for w in stream.writes] == [1, 2, 1]
        assert [line.rsplit(" ", 1)[1] for line in stream.text.splitlines()] == ["one", "two", "three", "four"]

    asyncio.run(turns())


def test_a_warning_is_written_at_once_with_the_lines_before_it(logged: Logged) -> None:
    ours, _, stream, _ = logged

    async def warn() -> None:
        ours.info("first")
        ours.info("before")
        ours.warning("disk_low")
        assert [w.count("\n") for w in stream.writes] == [1, 2]
        assert stream.writes[1].rstrip().endswith("WARNING careservice.testlogs disk_low")

    asyncio.run(warn())


def test_without_a_running_loop_each_line_is_written_at_once(logged: Logged) -> None:
    ours, _, stream, _ = logged
    ours.info("one")
    ours.info("two")
    assert [w.count("\n") for w in stream.writes] == [1, 1]


def test_what_is_left_is_written_at_exit(logged: Logged) -> None:
    ours, _, stream, handler = logged
    loop = asyncio.new_event_loop()

    async def log_and_stop() -> None:
        ours.info("first")
        ours.info("last")
        loop.stop()

    loop.create_task(log_and_stop())
    loop.run_forever()  # stops in the turn that logged: the scheduled write has not run
    loop.close()
    assert stream.text.endswith("INFO careservice.testlogs first\n")
    logging.shutdown([lambda: handler])  # what the interpreter's exit runs
    assert stream.text.endswith("INFO careservice.testlogs last\n")


def test_no_write_passes_pipe_buf_and_every_line_stays_whole(logged: Logged) -> None:
    ours, _, stream, _ = logged

    async def many() -> None:
        for n in range(200):
            ours.info("inbound_committed source=smtp cases=%012d", n)
        await asyncio.sleep(0)

    asyncio.run(many())
    assert len(stream.writes) > 1
    assert all(len(w.encode()) <= select.PIPE_BUF and w.endswith("\n") for w in stream.writes)
    assert [int(line.rsplit("=", 1)[1]) for line in stream.text.splitlines()] == list(range(200))
