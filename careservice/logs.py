"""One line per event, ids and counts only. Other libraries' records lose their arguments.

Our own code logs `event key=value ...` with case ids, states, reason codes and counts. Records
from any other logger (aiosmtpd logs envelope addresses and message lines, others quote headers in
exceptions) are reduced to their logger name and unformatted template, and exceptions to their type
and place, so no address, name, subject or body can reach a log line.

The lines of one turn of a process's event loop go to stderr in at most two writes (see TurnBufferedHandler).
"""

from __future__ import annotations

import asyncio
import logging
import select
import sys
import time
import traceback
from typing import TextIO

OWN_PREFIX = "careservice"


def error_fields(exc: BaseException) -> str:
    """`error=Type at=file:line` for an exception, without its message (which may quote mail).

    An exception that knows its own non-personal detail (a template path, a relay's reply code)
    offers it as `log_detail`, which is appended."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "-"
    detail = getattr(exc, "log_detail", "")
    return f"error={type(exc).__name__} at={where}" + (f" {detail}" if detail else "")


class PrivacyFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = (-1, "")  # (second, its text): strftime once a second, not once a line

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached, stamp = self._stamp
        if second != cached:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp = (second, stamp)
        if record.name.startswith(OWN_PREFIX):
            text = record.getMessage()
        else:
            text = f"library_event template={str(record.msg)[:80]!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + error_fields(record.exc_info[1])
        return f"{stamp} {record.levelname} {record.name} {text}"


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines after the first of one turn of the event loop together, at
    the start of the next turn, instead of one write syscall per line (profiled: a tenth of the worker's
    CPU per case went to writing its lines one by one; a batch of cases logs a line each in one turn).
    The first line of a turn goes out at once: a line after a quiet moment is the one someone waits
    for (an operator tailing the log, a test that read a reply). WARNING and above, a record from a
    thread without a running loop, and a buffer that would pass PIPE_BUF are written at once too, and
    what is left at exit (logging.shutdown flushes), so a crash loses at most the INFO lines of the
    turn it crashed in. The intake and the worker share one stderr: a write of at most PIPE_BUF bytes
    to a pipe is not interleaved with the other's, so lines stay whole."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._bytes = 0
        self._turn: asyncio.AbstractEventLoop | None = None  # the loop whose next turn writes the buffer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            size = len(line) if line.isascii() else len(line.encode(errors="replace"))
            if self._bytes + size > select.PIPE_BUF:
                self._write()
            self._lines.append(line)
            self._bytes += size
            loop = _running_loop()
            if record.levelno >= logging.WARNING or loop is None:
                self._write()
            elif self._turn is not loop:  # the turn's first line (or the last turn of a closed loop left lines)
                self._write()
                self._turn = loop
                loop.call_soon(self.flush)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._turn = None
            self._write()
            super().flush()

    def _write(self) -> None:
        if self._lines:
            text, self._lines, self._bytes = "".join(self._lines), [], 0
            self.stream.write(text)
            self.stream.flush()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    # the logging HOWTO's optimisations: no line prints the caller's frame, thread or process, so a
    # record need not look them up (a few microseconds of each of the worker's three lines per case)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(PrivacyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(OWN_PREFIX).setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: addresses at INFO, data at DEBUG
