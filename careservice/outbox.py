"""Deliver queued mail to relay.url: retries on the configured schedule, one probe for a dead relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib

from careservice import metrics, smtpclient
from careservice.config import RelayConfig
from careservice.dkim import Signer
from careservice.logs import error_fields
from careservice.maildir import maildir_deliver
from careservice.model import DeliveryFailure, MailEvent, MailKind, Outcome, OutgoingMail, QueuedMail
from careservice.oauth2 import OAuth2Error, TokenSource
from careservice.smtpclient import Refusal
from careservice.store import Store
from careservice.tlsconf import client_context
from careservice.wakeup import Gate, Wakeup

log = logging.getLogger("careservice.outbox")

BATCH = 100
IDLE_WAIT = 5.0
PROBE_AFTER = 60.0  # seconds without a delivery round before check_relay asks the relay itself
# how long a connection whose mail the relay took waits for the round's other connections, so that their
# deliveries are recorded in one transaction: a commit each was the worker's most frequent transaction
RECORD_LINGER = 0.005


class RelayDown(Exception):
    """The relay failed after answering for the first `done` mails handed to it (0: it could not be
    reached); the rest were not delivered."""

    def __init__(self, exc: BaseException, done: int) -> None:
        cause = exc
        while cause.__cause__ is not None:  # the OS's error under aiosmtplib's wrapper: what an operator can act on
            cause = cause.__cause__
        code = exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code > 0 else None
        # the type, the reply code and our own detail only: the messages may quote addresses
        detail = getattr(cause, "log_detail", "")
        self.fields = (f"error={type(cause).__name__}" + (f" code={code}" if code is not None else "")
                       + (f" {detail}" if detail else ""))
        self.done = done
        super().__init__(self.fields)


Record = Callable[[QueuedMail, Refusal | None], Awaitable[None]]


class Relay:
    """One connection's worth of sending; each mail's result (None on 250, else the refusal) goes to
    `record` as soon as the relay answers, so a crash re-sends at most the mail in flight.

    Connections are kept open between batches (as Postfix's connection cache does) and closed once
    unused for KEEP_SECONDS: a connect, EHLO and QUIT per batch cost more than the mail itself."""

    KEEP_SECONDS = 5.0
    CHECK_SECONDS = 5.0  # a kept connection's NOOP; slower than this, a new connection is cheaper
    # used this recently, a kept connection goes without the NOOP (under a steady trickle each mail is its own
    # batch, and the NOOP cost as much as the send); if the relay dropped it meanwhile, send_all reconnects once
    TRUSTED_SECONDS = 1.0
    QUIT_SECONDS = 2.0

    def __init__(self, config: RelayConfig, password: str, signer: Signer | None = None) -> None:
        self.config = config
        self.password = password
        self.signer = signer or Signer({})  # replaced on reload: queued mail leaves with the keys in force then
        self.tokens = None if config.oauth2 is None else TokenSource(config.oauth2, "relay")
        self.tls = client_context(config.ca_file)  # built once: loading CAs is slow
        self.stopping = False  # set: hand over no further mail (the one in flight is finished and recorded)
        self._kept: list[tuple[float, aiosmtplib.SMTP]] = []  # (last used, monotonic), connected clients

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A kept connection used within TRUSTED_SECONDS (True: unchecked), or one that still answers NOOP
        within CHECK_SECONDS, else a new one."""
        while self._kept:
            used, client = self._kept.pop()
            if time.monotonic() - used < self.TRUSTED_SECONDS:
                return client, True
            try:
                await client.noop(timeout=min(self.CHECK_SECONDS, self.config.timeout))
                return client, False
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
        return await self._connect(), False

    async def _connect(self) -> aiosmtplib.SMTP:
        # the token before the connection, which a slow token endpoint would otherwise hold open
        token = None if self.tokens is None else await asyncio.to_thread(self.tokens.token)
        client = aiosmtplib.SMTP(
            hostname=self.config.host, port=self.config.port, timeout=self.config.timeout,
            use_tls=self.config.scheme == "smtps", start_tls=self.config.scheme == "smtp+starttls",
            tls_context=self.tls,
        )
        try:
            await client.connect()
            if token is not None:
                await self._xoauth2(client, token)
            elif self.config.username:
                await client.login(self.config.username, self.password)
        except BaseException:
            client.close()
            raise
        return client

    async def _xoauth2(self, client: aiosmtplib.SMTP, token: str) -> None:
        try:
            await client.auth_xoauth2(self.config.username, token)
        except aiosmtplib.SMTPAuthenticationError:
            if self.tokens is not None:
                self.tokens.forget()  # revoked or lacking a permission: the next attempt asks for a new one
            raise

    def rearm(self) -> None:
        """A reload: after a refused grant or client, ask the token endpoint again."""
        if self.tokens is not None:
            self.tokens.reset()

    async def close_idle(self, older_than: float = KEEP_SECONDS) -> None:
        """QUIT the kept connections unused for `older_than` seconds (0: all of them)."""
        now = time.monotonic()
        idle = [client for used, client in self._kept if now - used >= older_than]
        self._kept = [(used, client) for used, client in self._kept if now - used < older_than]
        await asyncio.gather(*(self._quit(client) for client in idle))

    async def _quit(self, client: aiosmtplib.SMTP) -> None:
        """QUIT, waiting at most QUIT_SECONDS: a goodbye must not hold up the outbox or a stop."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await client.quit(timeout=min(self.QUIT_SECONDS, self.config.timeout))
        client.close()

    async def reachable(self) -> bool:
        """Whether the relay takes a connection (and the login) now; a maildir, whether it can be written."""
        try:
            if self.config.maildir is not None:
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(self.config.maildir / sub, mode=0o700, exist_ok=True)
                return os.access(self.config.maildir / "tmp", os.W_OK)
            client, _ = await self._connection()
        except (aiosmtplib.SMTPException, OSError, TimeoutError, OAuth2Error):
            return False
        await self._quit(client)
        return True

    @property
    def keeps_connections(self) -> bool:
        return bool(self._kept)

    @property
    def name(self) -> str:
        """The relay as log lines name it: host:port, or "maildir"."""
        if self.config.maildir is not None:
            return "maildir"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.config.port}"

    async def send_all(self, items: list[QueuedMail], record: Record) -> None:
        """Hand `items` to the relay in order; raises RelayDown when it fails before answering for all."""
        if self.config.maildir is not None:
            await self._write_all(self.config.maildir, items, record)
            return
        session: smtpclient.Session | None = None
        done = 0
        try:
            client, unchecked = await self._connection()
            session = smtpclient.Session(client)
            following = self._mail(items[0]) if items else None
            for n, item in enumerate(items):
                if self.stopping and not session.awaited:  # a mail whose envelope went ahead is in flight
                    break  # the rest stay queued as they are
                last = self.stopping or n + 1 == len(items)
                mail, following = following, None if last else self._mail(items[n + 1])
                try:
                    refusal = await self._send_one(session, item.mail, mail, following)
                except aiosmtplib.SMTPServerDisconnected:
                    if not unchecked:
                        raise
                    session.end(keep=False)  # dropped since its last use: the mail goes over a new connection
                    session = smtpclient.Session(await self._connect())
                    refusal = await self._send_one(session, item.mail, mail, following)
                unchecked = False
                await record(item, refusal)  # committed before the next one
                done += 1
            if session.end(keep=True):
                self._kept.append((time.monotonic(), session.client))
            session = None
        except (aiosmtplib.SMTPException, OSError, TimeoutError, OAuth2Error) as exc:
            raise RelayDown(exc, done) from None
        finally:
            if session is not None:  # broken, or the store failed: not kept, not left open
                session.end(keep=False)

    def _mail(self, item: QueuedMail) -> smtpclient.Mail:
        """The transaction of a queued mail, signed with the DKIM keys in force as it leaves."""
        return smtpclient.Mail(item.mail.sender, item.mail.recipients, self.signer.sign(item.site, item.mail.message))

    async def _write_all(self, maildir: Path, items: list[QueuedMail], record: Record) -> None:
        """The maildir relay: a folder it cannot write is a relay that is down."""
        for done, item in enumerate(items):
            if self.stopping:
                return
            try:
                if not done:
                    for sub in ("tmp", "new", "cur"):
                        os.makedirs(maildir / sub, mode=0o700, exist_ok=True)
                await asyncio.to_thread(maildir_deliver, maildir, self.signer.sign(item.site, item.mail.message))
            except OSError as exc:
                raise RelayDown(exc, done) from None
            await record(item, None)

    async def _send_one(self, session: smtpclient.Session, mail: OutgoingMail, transaction: smtpclient.Mail,
                        following: smtpclient.Mail | None) -> Refusal | None:
        refusal, refused = await session.deliver(transaction, following)
        if refused:  # delivered to the others; a refused one is not tried again
            log.warning("relay_refused_recipients relay=%s code=%d case=%s kind=%s refused=%d recipients=%d",
                        self.name, min(r.code for r in refused.values()), mail.case_id, mail.kind, len(refused),
                        len(mail.recipients))
        return refusal


class Outbox:
    """The sender loop: due mail in batches over `connections` parallel connections."""

    def __init__(self, config: RelayConfig, store: Store, relay: Relay, clock: Callable[[], float],
                 on_event: Callable[[MailEvent, QueuedMail, DeliveryFailure | None], Outcome | None],
                 batch_bytes: int) -> None:
        self.config = config
        self.batch_bytes = batch_bytes  # stored bytes per round (careservice.budget)
        self.store = store
        self.relay = relay
        self.clock = clock
        self.on_event = on_event  # the workflow's outcome of an answer delivered or failed (handlers.EVENTS)
        self._wake = Wakeup()
        self._down_until = 0.0
        self._down_count = 0
        self._round: list[int] = []  # the mail of the round being sent
        self._unrecorded: dict[int, QueuedMail] = {}  # the relay took these, the store could not say so yet
        self._last_round = -math.inf

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Return from run() once the mail in flight is handed over and recorded."""
        self.relay.stopping = True
        self._wake.set()

    def holding(self) -> list[int]:
        """The mail in this worker's hands: the round being sent, and mail the relay took that the store
        has not recorded yet (their claims are renewed while several nodes share the store)."""
        return [*self._round, *self._unrecorded]

    def delay(self, attempt: int) -> int:
        """Seconds before retry number `attempt` (0-based); the last configured delay repeats."""
        delays = self.config.retry_delays
        return delays[min(attempt, len(delays) - 1)]

    async def run(self) -> None:
        try:
            while not self.relay.stopping:
                try:
                    await self.deliver_due()
                except Exception as exc:  # the store failed: unmarked mail is sent again later (not delivered mail)
                    log.error("outbox_round_failed %s", error_fields(exc))
                await self.relay.close_idle()
                wait = min(IDLE_WAIT, Relay.KEEP_SECONDS) if self.relay.keeps_connections else IDLE_WAIT
                if self._down_until > self.clock():
                    wait = min(wait, self._down_until - self.clock())
                await self._wake.wait(max(wait, 0.05))
        finally:
            await self.relay.close_idle(0)

    async def deliver_due(self) -> int:
        """Send everything due now; returns how many were handed over (250)."""
        for item in list(self._unrecorded.values()):  # e.g. after a full disk: record them, never resend
            await self._delivered(item)
        sent = 0
        while self.clock() >= self._down_until and not self.relay.stopping:
            items = await self.store.due_mail(self.clock(), BATCH, self.batch_bytes)
            if not items:
                break
            if self._down_count:
                items = items[:1]  # the relay was down: one probe, not the whole queue
            chunks = [items[i:: self.config.connections] for i in range(min(self.config.connections, len(items)))]
            failures: list[RelayDown] = []
            self._round = [item.id for item in items]
            gate = Gate(len(chunks), RECORD_LINGER)
            try:
                sent += sum(await asyncio.gather(*(self._deliver(chunk, failures, gate) for chunk in chunks)))
            finally:  # the back-off holds even when the store could not defer the mail
                self._round = []
                await self._end_round(failures)
        return sent

    async def _end_round(self, failures: list[RelayDown]) -> None:
        """Log a round's relay failures as one line, and back off when the relay was down: one step of
        retry_delays per round, however many of its connections found it down."""
        down = [failure for failure in failures if not failure.done]
        self._last_round = self.clock()
        metrics.relay_up(not down)
        if not down:
            self._down_count = 0
            if failures:  # connections dropped mid-batch: their remaining mail waits its own retry delay
                log.warning("relay_dropped relay=%s %s connections=%d", self.relay.name, failures[0].fields,
                            len(failures))
            return
        retry_in = self.delay(self._down_count)
        self._down_count += 1
        self._down_until = self.clock() + retry_in
        queued = (await self.store.counts())["outbound_queued"]
        log.warning("relay_down relay=%s %s retry_in=%d queued=%d", self.relay.name, down[0].fields, retry_in, queued)

    async def check_relay(self) -> None:
        """Ask the relay whether it answers, for careservice_relay_up, when no delivery round has lately:
        an idle service would otherwise only learn of a dead relay with the next mail."""
        if self.clock() - self._last_round >= PROBE_AFTER:
            metrics.relay_up(await self.relay.reachable())

    async def _deliver(self, items: list[QueuedMail], failures: list[RelayDown], gate: Gate) -> int:
        """Send one connection's share; returns how many were delivered. A relay failure goes to
        `failures`, for the round's one log line. Each delivery is recorded before the connection's next
        mail, together with the other connections' (`gate`)."""
        sent = 0

        async def record(item: QueuedMail, refusal: Refusal | None) -> None:
            nonlocal sent
            if refusal is None:
                await self._delivered(item, gate)
                sent += 1
                return
            _, fields = await self._retry_or_fail(item, refusal.code, refusal.permanent)
            if fields:
                log.warning("relay_refused relay=%s code=%d case=%s kind=%s permanent=%s %s", self.relay.name,
                            refusal.code, item.mail.case_id, item.mail.kind, str(refusal.permanent).lower(), fields)

        try:
            await self.relay.send_all(items, record)
        except RelayDown as failure:
            failures.append(failure)
            for item in items[failure.done:]:  # the round's one relay line covers those that only wait
                dropped, fields = await self._retry_or_fail(item, None)
                if dropped and fields:
                    log.warning("mail_failed case=%s kind=%s %s", item.mail.case_id, item.mail.kind, fields)
        finally:
            gate.leave()
        return sent

    async def _delivered(self, item: QueuedMail, gate: Gate | None = None) -> None:
        self._unrecorded[item.id] = item
        if gate is not None:
            await gate.passage()
        started = time.monotonic()
        answer = item.mail.kind is MailKind.ANSWER
        outcome = self.on_event(MailEvent.ANSWER_DELIVERED, item, None) if answer else None
        waited = await self.store.mail_delivered(item, outcome, self.clock())
        metrics.delivered(item.site, item.mail.kind is MailKind.ANSWER, waited, time.monotonic() - started)
        del self._unrecorded[item.id]
        log.info("mail_delivered case=%s kind=%s", item.mail.case_id, item.mail.kind)

    async def _retry_or_fail(self, item: QueuedMail, code: int | None, permanent: bool = False) -> tuple[bool, str]:
        """Defer `item`, which the relay refused with `code` (None: not reached), to its next attempt, or
        drop it (refused for good, or past give_up_after) and give staff a notice for an answer. Returns
        whether it was dropped and the log fields saying so; the fields are "" when the drop could not be
        recorded (logged here; the mail stays queued)."""
        retry_in = self.delay(item.attempts)
        now = self.clock()
        if not permanent and now + retry_in - item.created <= self.config.give_up_after:
            await self.store.mail_deferred(item, now + retry_in)
            metrics.not_delivered(gave_up=False)
            return False, f"retry_in={retry_in}"
        failure = DeliveryFailure(code, None if permanent else self.config.give_up_after)
        try:
            answer = item.mail.kind is MailKind.ANSWER
            outcome = self.on_event(MailEvent.ANSWER_FAILED, item, failure) if answer else None
            await self.store.mail_failed(item, outcome, now)
        except Exception as exc:
            log.error("mail_fail_record_failed case=%s %s", item.mail.case_id, error_fields(exc))
            return True, ""
        metrics.not_delivered(gave_up=True)
        gave_up = "" if permanent else f"gave_up_after={self.config.give_up_after} "
        return True, f"{gave_up}notice={str(bool(outcome and outcome.mails)).lower()}"
