"""LeanSession: aiosmtpd's session on a real loopback socket, with its writes watched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from aiosmtpd.smtp import SMTP

from careservice.intake.smtpsession import LeanSession


class Handler:
    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        return "250 OK"


class Watched(LeanSession):
    """Keeps what each write to its transport carried."""

    writes: list[bytes]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.writes = []
        real: Callable[[bytes], None] = transport.write  # type: ignore[attr-defined]

        def write(data: bytes) -> None:
            self.writes.append(bytes(data))
            real(data)

        transport.write = write  # type: ignore[attr-defined]
        super().connection_made(transport)


@asynccontextmanager
async def serving(timeout: float = 300) -> AsyncIterator[tuple[list[Watched], asyncio.StreamReader,
                                                               asyncio.StreamWriter]]:
    template = SMTP(Handler(), hostname="lean.test", ident="ESMTP", enable_SMTPUTF8=True, timeout=timeout)
    sessions: list[Watched] = []

    def session() -> Watched:
        sessions.append(Watched(template))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        assert (await reader.readline()).startswith(b"220 lean.test ESMTP")
        yield sessions, reader, writer
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def reply(reader: asyncio.StreamReader) -> list[bytes]:
    lines = [await asyncio.wait_for(reader.readline(), 10)]
    while lines[-1][3:4] == b"-":
        lines.append(await asyncio.wait_for(reader.readline(), 10))
    return lines


def test_a_multi_line_reply_goes_out_in_one_write() -> None:
    async def ehlo() -> None:
        async with serving() as (sessions, reader, writer):
            writer.write(b"EHLO client.test\r\n")
            lines = await reply(reader)
            assert lines == [b"250-lean.test\r\n", b"250-SIZE 33554432\r\n", b"250-8BITMIME\r\n",
                             b"250-SMTPUTF8\r\n", b"250 HELP\r\n"]
            assert sessions[0].writes[-1] == b"".join(lines)
            writer.write(b"NOOP\r\n")
            assert await reply(reader) == [b"250 OK\r\n"]
            assert sessions[0].writes[-1] == b"250 OK\r\n"

    asyncio.run(ehlo())


def test_commands_move_the_timeout_and_silence_ends_the_session() -> None:
    async def session() -> None:
        async with serving(timeout=2) as (_, reader, writer):
            for _ in range(15):  # 3 s of commands: longer than the timeout, which each command moves on
                writer.write(b"NOOP\r\n")
                assert await reply(reader) == [b"250 OK\r\n"]
                await asyncio.sleep(0.2)
            assert await asyncio.wait_for(reader.read(), 30) == b""  # then silence: closed

    asyncio.run(session())
