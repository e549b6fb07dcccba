"""The systemd notify protocol (sd_notify(3)) without a dependency: readiness, reload, stop, watchdog.

Each call sends one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET. Without
that variable (not started by systemd, or not Type=notify) every call does nothing. A failed send is
logged once and otherwise ignored: losing a status line must never stop the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from careservice.logs import error_fields

log = logging.getLogger("careservice.notify")


class Notifier:
    """Sends state changes to the service manager at `address` (a socket path, "\\0…" for the abstract
    namespace, or None for no manager)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._failing = False  # a failure was logged; the next success re-arms the log line

    @classmethod
    def from_env(cls) -> Notifier:
        """The notifier for this process, from $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID."""
        address = os.environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        return cls(address, _watchdog_usec(os.environ))

    def ready(self) -> None:
        self.send("READY=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        """Start of a reload; send ready() when it is done. systemd >= 253 requires MONOTONIC_USEC with it
        (for Type=notify-reload) to tell this reload from an earlier one; older versions ignore it."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """A one-line status for `systemctl status` (counts and states only: the journal keeps it)."""
        self.send("STATUS=" + " ".join(text.splitlines()))  # a newline would start a new field

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls (half the manager's timeout), or None when no watchdog is set
        for this process."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2 / 1_000_000

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # non-blocking: a manager too busy to drain its queue must not stall our event loop
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failing:
                log.warning("notify_failed %s", error_fields(exc))
            self._failing = True
            return
        self._failing = False


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """$WATCHDOG_USEC if it is meant for this process: a child inherits the variables, but $WATCHDOG_PID
    names the main process only."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
