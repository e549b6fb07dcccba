"""A session's command tables as aiosmtpd reads them, bound to the session only on lookup.

aiosmtpd builds `_smtp_methods` and `_auth_methods` as dicts of methods bound to the session on
every connection; building them (and collecting the garbage they made) cost 6 % of the intake's CPU
per message, profiled, for the five or so commands a client sends.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from types import MethodType
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

if TYPE_CHECKING:
    from careservice.intake.smtp import _Session


def _through_session(method: Callable[[SMTP, str], Awaitable[None]]) -> Callable[[_Session, str], Awaitable[None]]:
    """aiosmtpd's `smtp_<COMMAND>` run through the session's run_command; its HELP syntax stays with it."""
    @functools.wraps(method)
    async def command(self: _Session, arg: str) -> None:
        await self.run_command(method, arg)
    return command


_COMMANDS = {name.removeprefix("smtp_"): _through_session(getattr(SMTP, name))
             for name in dir(SMTP) if name.startswith("smtp_")}


class Commands:
    """`_smtp_methods`: aiosmtpd looks a command up with get(), and lists them all for HELP with items()."""

    __slots__ = ("_session",)

    def __init__(self, session: _Session) -> None:
        self._session = session

    def get(self, name: str, default: Any = None) -> Any:
        command = _COMMANDS.get(name)
        return default if command is None else MethodType(command, self._session)

    def items(self) -> list[tuple[str, Any]]:
        return [(name, MethodType(command, self._session)) for name, command in _COMMANDS.items()]


class AuthMethods(dict):  # type: ignore[type-arg]
    """`_auth_methods`: the template's mechanisms; aiosmtpd's own (is_builtin) bound to the session when taken."""

    def __init__(self, session: _Session, template: dict[str, Any]) -> None:
        super().__init__(template)
        self._session = session

    def __getitem__(self, name: str) -> Any:
        impl = super().__getitem__(name)
        return impl._replace(method=MethodType(impl.method.__func__, self._session)) if impl.is_builtin else impl
