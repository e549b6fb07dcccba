"""One line per event, ids and counts only. Other libraries' records lose their arguments.

Our own code logs `event key=value ...` with case ids, states, reason codes and counts. Records
from any other logger (aiosmtpd logs envelope addresses and message lines, others quote headers in
exceptions) are reduced to their logger name and unformatted template, and exceptions to their type
and place, so no address, name, subject or body can reach a log line.
"""

from __future__ import annotations

import logging
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
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        if record.name.startswith(OWN_PREFIX):
            text = record.getMessage()
        else:
            text = f"library_event template={str(record.msg)[:80]!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + error_fields(record.exc_info[1])
        return f"{stamp} {record.levelname} {record.name} {text}"


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrivacyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(OWN_PREFIX).setLevel(level)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: addresses at INFO, data at DEBUG
