"""One mail transaction on an aiosmtplib connection, pipelined (RFC 2920) when the relay offers PIPELINING.

aiosmtplib sends each command and waits for its reply: MAIL, RCPT, DATA and the body are four writes and
four round trips. With PIPELINING, MAIL, every RCPT and DATA go in one write, their replies are read in
order, then the body: two of each. The contract is aiosmtplib's `SMTP.sendmail`, so the outbox classifies
refusals exactly as before: SMTPSenderRefused, SMTPRecipientsRefused (every recipient refused),
SMTPDataError, SMTPNotSupported, each after an RSET; a partial refusal returns the refused recipients.
One difference: a 421 (the relay closing the connection) to any command raises SMTPResponseException,
which the outbox counts as the relay failing; aiosmtplib reports a 421 to the one RCPT of a mail as a
refused recipient, and the relay failing only with the next mail."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator, Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse

Refused = dict[str, SMTPResponse]

CLOSING = 421  # the relay is going away and closes the connection: a relay failure, not a refusal
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# a dot-atom address, which email.utils.parseaddr (inside quote_address) returns unchanged
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


async def sendmail(client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes,
                   mail_options: list[str]) -> tuple[Refused, str]:
    """`client.sendmail`, pipelined when the relay offered PIPELINING in its EHLO. The first mail of a
    connection has no EHLO yet, and goes through aiosmtplib (which greets), as does every mail to a
    relay without PIPELINING."""
    protocol = client.protocol
    if protocol is None or client.is_ehlo_or_helo_needed or not client.supports_extension("pipelining"):
        return await client.sendmail(sender, list(recipients), message, mail_options=mail_options)
    utf8 = any(option.lower() == "smtputf8" for option in mail_options)
    if utf8 and not client.supports_extension("smtputf8"):
        raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
    content = _crlf(message)
    options = [f"size={len(content)}", *mail_options] if client.supports_extension("size") else mail_options
    encoding = "utf-8" if utf8 else "ascii"
    # quote_address raises for an address that cannot be sent, before anything is: as sendmail
    commands = [_command(b"MAIL", b"FROM:" + _quoted(sender).encode(encoding),
                         *(option.encode("ascii") for option in options))]
    commands += [_command(b"RCPT", b"TO:" + _quoted(r).encode(encoding)) for r in recipients]
    replies = _Replies(protocol)
    try:
        with replies.holding():
            protocol.write(b"".join(commands) + b"DATA\r\n")
            mail, *rcpts, data = [await replies.next(client) for _ in range(len(recipients) + 2)]
            refused = [aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
                       for reply, address in zip(rcpts, recipients, strict=True) if reply.code not in (250, 251)]
            error: aiosmtplib.SMTPException
            if mail.code != 250:
                error = aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
            elif len(refused) == len(recipients):
                error = aiosmtplib.SMTPRecipientsRefused(refused)
            elif data.code != 354:
                error = aiosmtplib.SMTPDataError(data.code, data.message)
            else:
                protocol.write(_dot_stuffed(content) + b".\r\n")
                done = await replies.next(client)
                if done.code == 250:
                    return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, done.message
                error = aiosmtplib.SMTPDataError(done.code, done.message)
            if data.code == 354 and not isinstance(error, aiosmtplib.SMTPDataError):
                # a relay that took DATA with no sender or recipient accepted: an empty message ends it (RFC 2920)
                protocol.write(b".\r\n")
                await replies.next(client)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()  # as aiosmtplib does: a reply given up on would be paired with the next command
        raise
    # as sendmail: the envelope is reset for the next mail; a failing RSET is not the error to report
    with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
        await client.rset()
    raise error


def _quoted(address: str) -> str:
    """quote_address(address), without its parser for the plain addresses nearly all mail has: that
    parse was about a tenth of the worker's CPU per case."""
    return f"<{address}>" if _PLAIN_ADDRESS.fullmatch(address) else quote_address(address)


def _crlf(message: bytes) -> bytes:
    """normalize_message_line_endings(message), without a regex pass over a message whose line ends
    are all CRLF already, as every message careservice renders is."""
    lines = message.count(b"\n")
    if lines == message.count(b"\r\n") == message.count(b"\r") and message.endswith(b"\r\n"):
        return message
    return normalize_message_line_endings(message)


def _dot_stuffed(content: bytes) -> bytes:
    """PERIOD_REGEX.sub(b"..", content), without the regex pass when no line starts with a dot."""
    return PERIOD_REGEX.sub(b"..", content) if content.startswith(b".") or b"\n." in content else content


def _command(*args: bytes) -> bytes:
    for arg in args:  # aiosmtplib's check in execute_command, which this write does not go through
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


class _Replies(SMTPProtocol):
    """Takes the connection's data while a pipelined transaction's replies come in, and hands them out in
    order. aiosmtplib's protocol, made for one reply per command, parses one reply per arrival of data and
    ignores data that arrives while a reply waits for its reader: replies in separate packets could be lost.
    This is aiosmtplib's protocol class for its reply parser and limits; the connection's own protocol gets
    the connection back afterwards, and hears of its loss."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.protocol = protocol
        self.transport = protocol.transport
        self.arrived = asyncio.Event()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        if self.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.set_protocol(self)
        try:
            yield
        finally:
            if self.transport is not None:
                self.transport.set_protocol(self.protocol)

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        self.arrived.set()

    def eof_received(self) -> bool:
        return False  # the transport closes, and connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.arrived.set()
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    async def next(self, client: aiosmtplib.SMTP) -> SMTPResponse:
        """The next reply, within the client's timeout; a 421 closes the connection and raises."""
        # a pipelined transaction's replies mostly arrive together: those after the first need no timer
        reply = self._read_response_from_buffer()
        try:
            if reply is None:
                async with asyncio.timeout(client.timeout):
                    while (reply := self._read_response_from_buffer()) is None:
                        if self.transport is None:
                            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
                        if len(self._buffer) > MAX_RESPONSE_LENGTH:  # what is left is one unfinished reply
                            raise aiosmtplib.SMTPResponseException(-1, "Response too long")
                        self.arrived.clear()
                        await self.arrived.wait()
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        if reply.code == CLOSING:
            client.close()
            raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
        return reply
