"""Deliver queued mail to relay.url: retries on the configured schedule, one probe for a dead relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib

from careservice.config import RelayConfig
from careservice.logs import error_fields
from careservice.model import MailKind, OutgoingMail
from careservice.store import QueuedMail, Store
from careservice.wakeup import Wakeup

log = logging.getLogger("careservice.outbox")

BATCH = 100
IDLE_WAIT = 5.0


class RelayDown(Exception):
    """The relay could not be reached or dropped the connection: nothing was delivered."""


@dataclass(frozen=True)
class Refusal:
    code: int
    permanent: bool


Record = Callable[[QueuedMail, Refusal | None], Awaitable[None]]


def _maildir_deliver(path: os.PathLike[str], message: bytes) -> None:
    """Write one message into a Maildir the way MTAs do: tmp/, fsync, rename into new/."""
    name = f"{secrets.token_hex(12)}.careservice"
    tmp, new = os.path.join(path, "tmp", name), os.path.join(path, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, message)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, new)


class Relay:
    """One connection's worth of sending; each mail's result (None on 250, else the refusal) goes to
    `record` as soon as the relay answers, so a crash re-sends at most the mail in flight.

    Connections are kept open between batches (as Postfix's connection cache does) and closed once
    unused for KEEP_SECONDS: a connect, EHLO and QUIT per batch cost more than the mail itself."""

    KEEP_SECONDS = 5.0
    CHECK_SECONDS = 5.0  # a kept connection's NOOP; slower than this, a new connection is cheaper
    QUIT_SECONDS = 2.0

    def __init__(self, config: RelayConfig, password: str) -> None:
        self.config = config
        self.password = password
        self.tls = ssl.create_default_context(cafile=config.ca_file or None)  # built once: loading CAs is slow
        self.stopping = False  # set: hand over no further mail (the one in flight is finished and recorded)
        self._kept: list[tuple[float, aiosmtplib.SMTP]] = []  # (last used, monotonic), connected clients

    async def _connection(self) -> aiosmtplib.SMTP:
        """A kept connection that still answers NOOP within CHECK_SECONDS, else a new one."""
        while self._kept:
            _, client = self._kept.pop()
            try:
                await client.noop(timeout=min(self.CHECK_SECONDS, self.config.timeout))
                return client
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
        client = aiosmtplib.SMTP(
            hostname=self.config.host, port=self.config.port, timeout=self.config.timeout,
            use_tls=self.config.scheme == "smtps", start_tls=self.config.scheme == "smtp+starttls",
            tls_context=self.tls,
        )
        try:
            await client.connect()
            if self.config.username:
                await client.login(self.config.username, self.password)
        except BaseException:
            client.close()
            raise
        return client

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

    @property
    def keeps_connections(self) -> bool:
        return bool(self._kept)

    async def send_all(self, items: list[QueuedMail], record: Record) -> None:
        if self.config.maildir is not None:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(self.config.maildir / sub, mode=0o700, exist_ok=True)
            for item in items:
                if self.stopping:
                    return
                await asyncio.to_thread(_maildir_deliver, self.config.maildir, item.mail.message)
                await record(item, None)
            return
        client: aiosmtplib.SMTP | None = None
        done = 0
        try:
            client = await self._connection()
            for item in items:
                if self.stopping:
                    break  # the rest stay queued as they are
                await record(item, await self._send_one(client, item.mail))  # committed before the next one
                done += 1
            self._kept.append((time.monotonic(), client))
            client = None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if not done:
                raise RelayDown(type(exc).__name__) from None
            for item in items[done:]:  # mail after the break is retried like any temporary failure
                await record(item, Refusal(0, False))
        finally:
            if client is not None:  # broken, or the store failed: not kept, not left open
                client.close()

    @staticmethod
    async def _send_one(client: aiosmtplib.SMTP, mail: OutgoingMail) -> Refusal | None:
        utf8 = not all(a.isascii() for a in (mail.sender, *mail.recipients))
        try:
            errors, _ = await client.sendmail(mail.sender, list(mail.recipients), mail.message,
                                              mail_options=["SMTPUTF8"] if utf8 else [])
        except aiosmtplib.SMTPNotSupported:  # a UTF-8 address, and the relay has no SMTPUTF8: never sendable
            return Refusal(553, True)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            return Refusal(min(codes), all(c >= 500 for c in codes))
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code in (421, -1):
                raise
            await client.rset()
            return Refusal(exc.code, exc.code >= 500)
        if errors:
            log.warning("relay_partial_refusal recipients_refused=%d", len(errors))
        return None


class Outbox:
    """The sender loop: due mail in batches over `connections` parallel connections."""

    def __init__(self, config: RelayConfig, store: Store, relay: Relay, clock: Callable[[], float],
                 notice_for: Callable[[QueuedMail, str], OutgoingMail | None]) -> None:
        self.config = config
        self.store = store
        self.relay = relay
        self.clock = clock
        self.notice_for = notice_for  # staff notice when an answer cannot be delivered
        self._wake = Wakeup()
        self._down_until = 0.0
        self._down_count = 0
        self._unrecorded: dict[int, QueuedMail] = {}  # the relay took these, the store could not say so yet

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Return from run() once the mail in flight is handed over and recorded."""
        self.relay.stopping = True
        self._wake.set()

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
            items = await self.store.due_mail(self.clock(), BATCH)
            if not items:
                break
            if self._down_count:
                items = items[:1]  # the relay was down: one probe, not the whole queue
            chunks = [items[i:: self.config.connections] for i in range(min(self.config.connections, len(items)))]
            outcomes = await asyncio.gather(*(self._deliver(chunk) for chunk in chunks))
            sent += sum(outcomes)
        return sent

    async def _deliver(self, items: list[QueuedMail]) -> int:
        sent = 0

        async def record(item: QueuedMail, refusal: Refusal | None) -> None:
            nonlocal sent
            if refusal is None:
                await self._delivered(item)
                sent += 1
            elif refusal.permanent:
                await self._fail(item, f"the relay refused it permanently (code {refusal.code})")
            else:
                await self._defer_or_fail(item, f"temporary refusal (code {refusal.code})")

        try:
            await self.relay.send_all(items, record)
        except RelayDown as exc:
            self._down_count += 1
            self._down_until = self.clock() + self.delay(self._down_count - 1)
            log.warning("relay_down error=%s queued=%d retry_in=%d", exc, len(items), self.delay(self._down_count - 1))
            for item in items:
                await self._defer_or_fail(item, "relay unreachable")
            return 0
        self._down_count = 0
        return sent

    async def _delivered(self, item: QueuedMail) -> None:
        self._unrecorded[item.id] = item
        await self.store.mail_delivered(item, self.clock())
        del self._unrecorded[item.id]
        log.info("mail_delivered case=%s kind=%s", item.mail.case_id, item.mail.kind)

    async def _defer_or_fail(self, item: QueuedMail, why: str) -> None:
        now = self.clock()
        next_attempt = now + self.delay(item.attempts)
        if next_attempt - item.created > self.config.give_up_after:
            await self._fail(item, f"{why}; gave up after {self.config.give_up_after} s")
        else:
            await self.store.mail_deferred(item, next_attempt)

    async def _fail(self, item: QueuedMail, why: str) -> None:
        try:
            notice = self.notice_for(item, why) if item.mail.kind is MailKind.ANSWER else None
            await self.store.mail_failed(item, notice, self.clock())
        except Exception as exc:
            log.error("mail_fail_record_failed case=%s %s", item.mail.case_id, error_fields(exc))
            return
        log.warning("mail_failed case=%s kind=%s notice=%s", item.mail.case_id, item.mail.kind, notice is not None)
