"""aiosmtpd's SMTP session, the same on the wire, made cheaper per connection and per command.

Profiled per message (one connection each), aiosmtpd's own session spent most of the intake's CPU
outside our handler on work that does not change between connections or commands:

- its __init__ inspects the handler and the session class on every connection (a fifth of the
  intake's CPU): a session here starts as a copy of one `template` built with the same options at
  start-up, with fresh stream state;
- it builds `_smtp_methods` and `_auth_methods` as dicts of methods bound to the session (6 %, with
  the garbage they made): here they bind on lookup, for the five or so commands a client sends;
- it writes each line of a multi-line reply on its own (EHLO's five: a send each): here the lines go
  out with the reply's last, in one write;
- it makes and cancels a timer for smtp.timeout before every command: here one timer follows a
  deadline that moves.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from types import MethodType
from typing import Any

from aiosmtpd.smtp import SMTP

from careservice import metrics


class LeanSession(SMTP):
    """A session copied from `template`; every command runs through `run_command` (a subclass's hook)."""

    def __init__(self, template: SMTP) -> None:
        self.__dict__.update(template.__dict__)
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self._smtp_methods = Commands(self)
        self._auth_methods = AuthMethods(self, template._auth_methods)
        self._continued: list[bytes] = []  # the lines of a multi-line reply before its last
        self._deadline = 0.0  # of smtp.timeout, in loop time
        self._timer_ran = False

    async def run_command(self, method: Callable[[SMTP, str], Awaitable[None]], arg: str) -> None:
        await method(self, arg)

    async def push(self, status: str | bytes) -> None:
        """Every reply line aiosmtpd sends passes here; the last line of each reply is counted for
        careservice_smtp_replies_total."""
        line = status if isinstance(status, bytes) else status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if line[3:4] == b"-":
            self._continued.append(line)
            return
        metrics.smtp_reply(line)
        if self._continued:
            line = b"\r\n".join((*self._continued, line))
            self._continued.clear()
        await super().push(line)

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None or self._timeout_handle.cancelled() or self._timer_ran:
            self._timer_ran = False
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:  # moved on since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
        else:
            self._timer_ran = True
            self._timeout_cb()


def _through_session(method: Callable[[SMTP, str], Awaitable[None]]) -> Callable[[LeanSession, str], Awaitable[None]]:
    """aiosmtpd's `smtp_<COMMAND>` run through the session's run_command; its HELP syntax stays with it."""
    @functools.wraps(method)
    async def command(self: LeanSession, arg: str) -> None:
        await self.run_command(method, arg)
    return command


_COMMANDS = {name.removeprefix("smtp_"): _through_session(getattr(SMTP, name))
             for name in dir(SMTP) if name.startswith("smtp_")}


class Commands:
    """`_smtp_methods`: aiosmtpd looks a command up with get(), and lists them all for HELP with items()."""

    __slots__ = ("_session",)

    def __init__(self, session: LeanSession) -> None:
        self._session = session

    def get(self, name: str, default: Any = None) -> Any:
        command = _COMMANDS.get(name)
        return default if command is None else MethodType(command, self._session)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, MethodType(command, self._session)) for name, command in _COMMANDS.items()]


class AuthMethods(dict):  # type: ignore[type-arg]
    """`_auth_methods`: the template's mechanisms; aiosmtpd's own (is_builtin) bound to the session when taken."""

    def __init__(self, session: LeanSession, template: dict[str, Any]) -> None:
        super().__init__(template)
        self._session = session

    def __getitem__(self, name: str) -> Any:
        impl = super().__getitem__(name)
        return impl._replace(method=MethodType(impl.method.__func__, self._session)) if impl.is_builtin else impl
