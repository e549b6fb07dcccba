"""Mail transactions on one aiosmtplib connection, pipelined (RFC 2920) when the relay offers PIPELINING.

aiosmtplib sends each command and waits for its reply: MAIL, RCPT, DATA and the body are four writes and
four round trips. With PIPELINING, MAIL, every RCPT and DATA go in one write, their replies are read in
order, then the body. And a Session writes the next mail's MAIL, RCPT and DATA in the same write as this
mail's body and final dot (RFC 2920 lets message content open a group): one write and one wait per mail.
`Session.sendmail` keeps the contract of aiosmtplib's `SMTP.sendmail`, whichever way a mail goes:
SMTPSenderRefused, SMTPRecipientsRefused (every recipient refused), SMTPDataError, SMTPNotSupported, each
with the envelope reset; a partial refusal returns the refused recipients. `deliver` makes these the
outbox's Refusal. One difference: a 421 (the relay closing the connection) to any command raises
SMTPResponseException, which the outbox counts as the relay failing; aiosmtplib reports a 421 to the one
RCPT of a mail as a refused recipient, and the relay failing only with the next mail."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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


@dataclass(frozen=True)
class Refusal:
    """The relay's refusal of a whole mail: its reply code, and whether trying again cannot help."""

    code: int
    permanent: bool


@dataclass(frozen=True, eq=False)
class Mail:
    """One mail's transaction: the envelope, and the message as it leaves (signed)."""

    sender: str
    recipients: Sequence[str]
    message: bytes

    @cached_property
    def utf8(self) -> bool:
        """Whether an address is not ASCII: MAIL then says SMTPUTF8 (RFC 6531), and the relay must offer it."""
        return not all(a.isascii() for a in (self.sender, *self.recipients))

    @property
    def options(self) -> list[str]:
        """MAIL's options, as aiosmtplib's sendmail takes them."""
        return ["SMTPUTF8"] if self.utf8 else []

    @cached_property
    def content(self) -> bytes:
        """The message with CRLF line ends, as DATA sends it and SIZE counts it."""
        return _crlf(self.message)


class Session:
    """The mail transactions of one connection, in order, until `end()`. A mail whose envelope went ahead
    with the previous content must be the next one sent."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self._replies: _Replies | None = None  # the connection's data while pipelining
        self._ahead: Mail | None = None  # the mail whose envelope was written with the last content

    @property
    def awaited(self) -> bool:
        """Whether a mail's envelope went ahead: the relay waits for that mail's content."""
        return self._ahead is not None

    def end(self, keep: bool) -> bool:
        """Give the connection its own protocol back (for NOOP and QUIT), and close it unless `keep` and
        no envelope went ahead: the relay then waits for that mail's content, and only closing the
        connection ends its transaction. Returns whether the connection stays open."""
        if self._replies is not None:
            self._replies.release()
            self._replies = None
        if keep and not self.awaited:
            return True
        self.client.close()
        return False

    async def deliver(self, mail: Mail, following: Mail | None = None) -> tuple[Refusal | None, Refused]:
        """`sendmail`'s outcome for the outbox: the refusal of the whole mail (None: the relay took it), and
        the recipients it refused when it took the mail for others. A 421 or an unreadable reply raises."""
        try:
            return None, (await self.sendmail(mail, following))[0]
        except aiosmtplib.SMTPNotSupported:  # a UTF-8 address, and the relay has no SMTPUTF8: never sendable
            return Refusal(553, True), {}
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            return Refusal(min(codes), all(c >= 500 for c in codes)), {}
        except aiosmtplib.SMTPResponseException as exc:  # the envelope is reset (sendmail)
            if exc.code in (CLOSING, -1):
                raise
            return Refusal(exc.code, exc.code >= 500), {}

    async def sendmail(self, mail: Mail, following: Mail | None = None) -> tuple[Refused, str]:
        """`client.sendmail` of `mail`; with PIPELINING, `following`'s envelope goes with its body (the
        next call must then send `following`). The first mail of a connection has no EHLO yet, and goes
        through aiosmtplib (which greets), as does every mail to a relay without PIPELINING."""
        client = self.client
        if self._ahead is not None and self._ahead is not mail:
            raise RuntimeError("a mail whose envelope went ahead must be sent next")
        if self._replies is None:
            if (client.protocol is None or client.is_ehlo_or_helo_needed
                    or not client.supports_extension("pipelining")):
                return await client.sendmail(mail.sender, list(mail.recipients), mail.message,
                                             mail_options=mail.options)
            self._replies = _Replies(client.protocol)
        replies = self._replies
        try:
            if self._ahead is None:
                replies.write(self._envelope(mail))
            self._ahead = None
            first, *rcpts, data = [await replies.next(client) for _ in range(len(mail.recipients) + 2)]
            refused = [aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, address)
                       for reply, address in zip(rcpts, mail.recipients, strict=True) if reply.code not in (250, 251)]
            error: aiosmtplib.SMTPException
            if first.code != 250:
                error = aiosmtplib.SMTPSenderRefused(first.code, first.message, mail.sender)
            elif len(refused) == len(mail.recipients):
                error = aiosmtplib.SMTPRecipientsRefused(refused)
            elif data.code != 354:
                error = aiosmtplib.SMTPDataError(data.code, data.message)
            else:
                ahead = self._envelope_or_none(following)
                replies.write(_dot_stuffed(mail.content) + b".\r\n" + ahead)
                self._ahead = following if ahead else None
                done = await replies.next(client)
                if done.code == 250:
                    return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, done.message
                # the end of the content ended the transaction, whatever the reply (RFC 5321 4.1.1.4): no
                # RSET, which would also reset (or, after its DATA, become the content of) the mail ahead
                raise aiosmtplib.SMTPDataError(done.code, done.message)
            if data.code == 354:
                # a relay that took DATA with no sender or recipient accepted: an empty message ends it (RFC 2920)
                replies.write(b".\r\n")
                await replies.next(client)
            # as sendmail: the envelope is reset for the next mail; a failing RSET is not the error to report
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                replies.write(b"RSET\r\n")
                await replies.next(client)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            client.close()  # as aiosmtplib does: a reply given up on would be paired with the next command
            raise
        raise error

    def _envelope(self, mail: Mail) -> bytes:
        """MAIL, each RCPT and DATA, as one write. Raises, before anything is written, for an address
        that cannot be sent (quote_address, as sendmail) or a UTF-8 one the relay cannot take."""
        client = self.client
        if mail.utf8 and not client.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
        size = [f"size={len(mail.content)}"] if client.supports_extension("size") else []
        encoding = "utf-8" if mail.utf8 else "ascii"
        commands = [_command(b"MAIL", b"FROM:" + _quoted(mail.sender).encode(encoding),
                             *(option.encode("ascii") for option in [*size, *mail.options]))]
        commands += [_command(b"RCPT", b"TO:" + _quoted(r).encode(encoding)) for r in mail.recipients]
        return b"".join(commands) + b"DATA\r\n"

    def _envelope_or_none(self, mail: Mail | None) -> bytes:
        """The envelope of the mail to send next, to go ahead with this body; b"" when there is none or
        it cannot be sent (its own sendmail then raises, before writing anything)."""
        if mail is None:
            return b""
        try:
            return self._envelope(mail)
        except (ValueError, aiosmtplib.SMTPNotSupported):
            return b""


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
    """Takes the connection's data while pipelined transactions' replies come in, and hands them out in
    order. aiosmtplib's protocol, made for one reply per command, parses one reply per arrival of data and
    ignores data that arrives while a reply waits for its reader: replies in separate packets could be lost.
    This is aiosmtplib's protocol class for its reply parser and limits; the connection's own protocol gets
    the connection back at release(), and hears of its loss."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.protocol = protocol
        self.transport = protocol.transport
        self.arrived = asyncio.Event()
        if self.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.set_protocol(self)

    def release(self) -> None:
        if self.transport is not None:
            self.transport.set_protocol(self.protocol)

    def write(self, data: bytes) -> None:
        self.protocol.write(data)  # aiosmtplib's: raises SMTPServerDisconnected on a closed connection

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
