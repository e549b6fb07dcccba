"""aiosmtpd handler: RCPT only for our addresses, 250 only after the durable commit."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from careservice import metrics
from careservice.addresses import Addressing, Recipient
from careservice.config import SmtpConfig
from careservice.intake.ingest import Ingest
from careservice.intake.limits import SenderQuota, client_key, sender_bucket
from careservice.intake.smtpsession import LeanSession
from careservice.intake.spamcheck import REPLY_GREYLIST, REPLY_SPAM, SpamCheck
from careservice.logs import error_fields
from careservice.model import Envelope as CaseEnvelope
from careservice.model import NewMessage, Source
from careservice.spamverdict import SKIPPED, stamp
from careservice.tlsconf import server_context

log = logging.getLogger("careservice.smtp")

REPLY_OK = "250 2.0.0 OK: queued"
REPLY_RELAY_DENIED = "550 5.7.1 Relaying denied: not a care address here"
REPLY_TOO_MANY_RCPT = "452 4.5.3 Too many recipients"
REPLY_NO_SPACE = "452 4.3.1 Insufficient system storage"
REPLY_SENDER_QUOTA = "452 4.2.2 Hourly quota for this sender used up, try again later"
REPLY_TRY_AGAIN = "451 4.3.0 Temporary failure, please try again later"
REPLY_TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"
REPLY_TOO_MANY_FROM_CLIENT = b"421 4.7.0 Too many connections from your address, try again later\r\n"
REPLY_IDLE = b"421 4.4.2 Idle too long\r\n"
REPLY_SHUTTING_DOWN = b"421 4.3.2 Service shutting down\r\n"
LINGER_SECONDS = 2.0
BACKLOG_SECONDS = 0.05
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# "<dot-atom@domain>", then the end or blanks before parameters (a comment after it takes the full parser)
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?=[^ \t(])|$)")


class SmtpHandler:
    """aiosmtpd hooks; everything else (SIZE, syntax, smuggling) is aiosmtpd's own.

    Staff answers, to signed reply addresses, are what lets a case be answered and purged, so they get
    room the rest cannot take: below smtp.min_free_bytes only they are still taken (down to
    smtp.reply_min_free_bytes), and they do not count against the sender's hourly quota, which would
    otherwise let anyone who forges a staff member's envelope sender lock that member out. Both
    decisions need the recipient, so they are made at RCPT; MAIL is refused only when nothing could
    be taken."""

    def __init__(self, config: SmtpConfig, addressing: Addressing, ingest: Ingest, spam: SpamCheck) -> None:
        self.config = config
        self.addressing = addressing
        self.ingest = ingest
        self.spam = spam
        self.quota = SenderQuota(config.max_bytes_per_sender_per_hour)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.ingest.free_bytes() < self.config.reply_min_free_bytes:
            log.warning("intake_refused reason=disk_low")
            return REPLY_NO_SPACE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return REPLY_TOO_MANY_RCPT
        recipient = self.addressing.recipient(address)
        if recipient is None:
            log.info("rcpt_refused reason=not_ours")
            return REPLY_RELAY_DENIED
        signed = self._signed_reply(recipient)
        if self.ingest.free_bytes() < (self.config.reply_min_free_bytes if signed else self.ingest.min_free_bytes):
            log.warning("rcpt_refused reason=disk_low")
            return REPLY_NO_SPACE
        if not signed:
            # SIZE= (RFC 1870), stored once per counted recipient: refused before the client sends it
            size = _declared_size(envelope.mail_options) * (1 + len(self._counted(envelope.rcpt_tos)))
            left = self.quota.remaining(sender_bucket(envelope.mail_from or "", session.peer))
            if left <= 0 or size > left:
                log.warning("rcpt_refused reason=sender_quota")
                return REPLY_SENDER_QUOTA
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from  # aiosmtpd: null sender is "<>"
        bucket = sender_bucket(sender, session.peer)
        customers = self._counted(envelope.rcpt_tos)  # staff replies are not spam-checked: their MAC is checked
        cost = len(raw) * len(customers)
        if not self.quota.charge(bucket, cost):  # no SIZE= given, or it understated the message
            log.warning("intake_refused reason=sender_quota")
            return REPLY_SENDER_QUOTA
        verdict = SKIPPED
        if customers:
            verdict = await self.spam.check(raw, await self.spam.smtp_probe(session, sender, customers))
        if verdict.result in ("reject", "greylist"):  # nothing stored, the client bounces or retries
            log.info("intake_refused reason=spam_%s", verdict.result)
            return REPLY_SPAM if verdict.result == "reject" else REPLY_GREYLIST
        messages = []
        for rcpt in envelope.rcpt_tos:
            recipient = self.addressing.recipient(rcpt)
            assert recipient is not None  # handle_RCPT let only ours through
            # a client that lost our 250 (we crashed after the commit) sends again: one case, not two
            digest = self.ingest.dedupe_key(recipient.site.id, raw)
            stored = stamp(raw, verdict if rcpt in customers else SKIPPED)
            messages.append(NewMessage(recipient.site.id, Source.SMTP,
                                       CaseEnvelope(sender, rcpt), stored, dedupe=digest))
        try:
            await self.ingest.accept(messages, "smtp")
        except Exception as exc:  # not committed: the client keeps the message and retries
            self.quota.refund(bucket, cost)
            log.error("intake_failed %s", error_fields(exc))
            return REPLY_TRY_AGAIN
        return REPLY_OK

    def _signed_reply(self, recipient: Recipient) -> bool:
        """A reply address whose MAC is ours: only staff hold one (the format alone is easy to forge)."""
        if not recipient.token:
            return False
        return self.addressing.check_reply_token(recipient.site, recipient.token) is not None

    def _counted(self, rcpt_tos: list[str]) -> list[str]:
        """The recipients whose copies count against the sender's quota: all but signed reply addresses."""
        counted = []
        for rcpt in rcpt_tos:
            recipient = self.addressing.recipient(rcpt)
            if recipient is None or not self._signed_reply(recipient):
                counted.append(rcpt)
        return counted

    async def handle_exception(self, error: Exception) -> str:
        """Any other failure in a session: 451, not aiosmtpd's "500 Error: (type) message" to the client."""
        log.error("session_failed %s", error_fields(error))
        return REPLY_TRY_AGAIN


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE= a client declared at MAIL (aiosmtpd checked it is digits), else 0."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    return server_context(config.tls_cert, config.tls_key)


class _Sessions:
    """The open SMTP sessions, against smtp.max_connections and, per client address bucket,
    smtp.max_connections_per_client; `drain()` ends them for a stop."""

    def __init__(self, limit: int, per_client_limit: int, idle_before_mail: float) -> None:
        self.limit = limit
        self.per_client_limit = per_client_limit
        self.idle_before_mail = idle_before_mail
        self.live: set[_Session] = set()
        self.per_client: Counter[str] = Counter()
        self.draining = False

    def admit(self, client: str) -> bool:
        """Count one more session for `client`, unless it already holds its share."""
        if self.per_client[client] >= self.per_client_limit:
            return False
        self.per_client[client] += 1
        return True

    def leave(self, client: str) -> None:
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    async def drain(self, timeout: float) -> int:
        """Say 421 to every session at its next command (at once when idle), let a DATA in progress
        commit and get its answer, and wait for them all to close; abort what is left after `timeout`.
        Returns how many were aborted."""
        self.draining = True
        for session in list(self.live):
            session.end_when_idle()
        deadline = time.monotonic() + timeout
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.live)
        for session in left:
            if session.transport is not None:
                session.transport.abort()
        return len(left)


class _Session(LeanSession):
    """aiosmtpd's session, counted from its creation until its connection is lost.

    It starts as a copy of one `template` (careservice.intake.smtpsession). Each command runs through
    `run_command`, which is where a draining daemon answers 421 instead, and where the idle limit
    before MAIL is watched: a slot held without a transaction is a slot taken from everyone else, so
    smtp.idle_before_mail (not smtp.timeout) bounds it.
    """

    def __init__(self, sessions: _Sessions, template: SMTP) -> None:
        super().__init__(template)
        self._sessions: _Sessions | None = sessions
        self._in_command = False
        self._closing = False
        self._client_key = ""  # counted in sessions.per_client while set
        self._idle: asyncio.TimerHandle | None = None
        sessions.live.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sessions = self._sessions
        if self.transport is None and sessions is not None:  # a new connection, not the switch to TLS
            key = client_key(transport.get_extra_info("peername"))
            if not sessions.admit(key):
                log.warning("connection_refused reason=too_many_from_client limit=%d", sessions.per_client_limit)
                sessions.live.discard(self)
                self._sessions = None
                refuse = _Refuse(REPLY_TOO_MANY_FROM_CLIENT)
                transport.set_protocol(refuse)
                refuse.connection_made(transport)
                return
            self._client_key = key
            self._idle = self.loop.call_later(sessions.idle_before_mail, self._idle_too_long)
        super().connection_made(transport)

    def _watch_idle(self) -> None:
        """After a command: no limit while a transaction is open; a fresh one once it ended (DATA
        answered, RSET); otherwise the running one stays, so NOOPs cannot extend it."""
        if self.envelope is not None and self.envelope.mail_from is not None:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
        elif self._idle is None and self._sessions is not None and self.transport is not None:
            self._idle = self.loop.call_later(self._sessions.idle_before_mail, self._idle_too_long)

    def _idle_too_long(self) -> None:
        """421, whatever the client has half-sent: a partial command line must not hold the slot until
        smtp.timeout."""
        self._idle = None
        if self._goodbye(REPLY_IDLE):
            log.info("session_closed reason=idle_before_mail")

    def _goodbye(self, reply: bytes) -> bool:
        """Say `reply` and end with a lingering close: our FIN first, then what the client still sends
        is read and dropped (no command runs, nothing more is said) until it closes too, so that no
        unread byte turns the close into a reset that could hide the reply (a client whose command
        crossed the 421 would see only the reset). A client that does not close is cut off after
        LINGER_SECONDS. Once only: a later call (the idle limit ran out during a command that ended in
        a drain) does nothing and returns False."""
        if self._closing or self.transport is None:
            return False
        transport = cast(asyncio.WriteTransport, self.transport)
        self._closing = True
        metrics.smtp_reply(reply)
        transport.write(reply)
        if transport.can_write_eof():
            transport.write_eof()
        else:  # TLS has no half-close
            transport.close()
        self.loop.call_later(LINGER_SECONDS, transport.abort)
        return True

    async def run_command(self, method: Callable[[SMTP, str], Awaitable[None]], arg: str) -> None:
        """aiosmtpd's `smtp_<COMMAND>` method for `arg`, unless draining; the idle limit watched after it."""
        if self._closing:
            return
        if self._sessions is not None and self._sessions.draining:
            self._goodbye(REPLY_SHUTTING_DOWN)
            return
        self._in_command = True
        try:
            await method(self, arg)
        finally:
            self._in_command = False
        if self._sessions is not None and self._sessions.draining:  # e.g. DATA committed meanwhile
            self._goodbye(REPLY_SHUTTING_DOWN)
        else:
            self._watch_idle()

    def end_when_idle(self) -> None:
        """Between commands with nothing half-read, end now: a QUIT of our own takes the next turn of the
        command loop, which `_command` answers with 421. Otherwise the next command gets the 421. After
        the client's EOF there is no next command: aiosmtpd's loop reads the EOF and ends the session (on
        uvloop the EOF can come before connection_lost takes the session out of `live`)."""
        reader = self._reader
        if not self._in_command and not reader._buffer and not reader.at_eof() and self.transport is not None:  # type: ignore[attr-defined]
            reader.feed_data(b"QUIT\r\n")

    async def push(self, status: str | bytes) -> None:
        if not self._closing:  # after the goodbye, aiosmtpd's own replies (500, too long) are dropped too
            await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parse, with a fast path for the plain `<local@domain>` that nearly every
        client sends (aiosmtpd's builds a typing.Protocol class and runs the RFC 5322 parser on each,
        twice per message). The fast path gives the same result wherever it matches."""
        simple = _SIMPLE_PATH.match(arg)
        if simple:
            return simple.group(1), arg[simple.end():]
        return super()._getaddr(arg)

    def eof_received(self) -> bool | None:
        keep_open = super().eof_received()
        self.loop.call_soon(self._close_if_abandoned)
        return keep_open

    def _close_if_abandoned(self) -> None:
        """aiosmtpd cancels its handler at the client's EOF and leaves the close to the handler's command
        loop. A handler cancelled before it reached that loop (uvloop can deliver the connect and the EOF
        in one turn, before the handler's first step) closes nothing: the connection, and its client's
        slot, would stay until the process ends."""
        task = self._handler_coroutine
        if self.transport is not None and (task is None or task.done()):
            self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._sessions is not None:
            self._sessions.live.discard(self)
            if self._client_key:
                self._sessions.leave(self._client_key)
            self._sessions = None
        super().connection_lost(error)


class _Refuse(asyncio.Protocol):
    """Greet with a 421 and hang up (RFC 5321 §3.1): too many connections, or shutting down."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though not an asyncio.WriteTransport by class on uvloop (an assert here
        # raised there and cut the connection before the 421)
        stream = cast(asyncio.WriteTransport, transport)
        metrics.smtp_reply(self.reply)
        stream.write(self.reply)
        stream.close()


class SmtpListener:
    """The listening socket and its sessions."""

    def __init__(self, server: asyncio.Server, sessions: _Sessions) -> None:
        self.server = server
        self.sessions = sessions

    async def drain(self, timeout: float) -> None:
        """Stop accepting (new connections are refused), then end the open sessions (see _Sessions.drain)."""
        self.sessions.draining = True
        await asyncio.sleep(BACKLOG_SECONDS)  # connections already queued in the kernel get a 421, not a reset
        self.server.close()
        open_sessions = len(self.sessions.live)
        aborted = await self.sessions.drain(timeout)
        log.info("smtp_drained sessions=%d aborted=%d", open_sessions, aborted)


async def start_smtp(config: SmtpConfig, handler: SmtpHandler) -> SmtpListener:
    """Listen on smtp.listen in the running loop."""
    context = tls_context(config)
    options: dict[str, Any] = {
        "hostname": config.hostname, "data_size_limit": config.max_message_bytes, "enable_SMTPUTF8": True,
        "timeout": config.timeout, "tls_context": context, "require_starttls": config.require_tls,
        "ident": "ESMTP",  # not aiosmtpd's name and version
    }
    sessions = _Sessions(config.max_connections, config.max_connections_per_client, config.idle_before_mail)
    template = SMTP(handler, **options)

    def session() -> asyncio.Protocol:
        if sessions.draining:  # accepted in the same turn as the stop began
            return _Refuse(REPLY_SHUTTING_DOWN)
        if len(sessions.live) >= sessions.limit:
            log.warning("connection_refused reason=too_many_connections open=%d", len(sessions.live))
            return _Refuse(REPLY_TOO_MANY_CONNECTIONS)
        return _Session(sessions, template)

    loop = asyncio.get_running_loop()
    return SmtpListener(await loop.create_server(session, config.listen.host, config.listen.port), sessions)
