"""IMAP intake: one worker thread per `[[imap]]` mailbox drains it into the same intake as SMTP.

A pass takes everything in the folder: SEARCH ALL (flagged or not), move messages larger than
smtp.max_message_bytes to the quarantine folder, FETCH the rest in batches (BODY.PEEK[]), have rspamd
check them (careservice.intake.spamcheck: rejected ones go to the quarantine folder too, greylisted
ones stay for the next pass), commit each batch through `Ingest.accept`, and only then STORE
\\Deleted and UID EXPUNGE (EXPUNGE without UIDPLUS). Fetching and committing overlap: while batch
k is fetched, batches k-1 and k-2 commit.
Between passes the worker IDLEs when the server offers it, else it polls every poll_seconds.
Nothing depends on UIDs across sessions, so a UIDVALIDITY change needs no recovery: a message
committed before a crash is taken again, recognised by its keyed digest, and only expunged.

A message's envelope (careservice.intake.headers.mailbox_envelope): the sender is its Return-Path, else
its From; the recipient is the topmost `envelope_header` (Delivered-To), else the care address.

imapclient blocks, so each worker runs in its own thread; commits and health records are handed to
the event loop with `run_coroutine_threadsafe`. Logs name the mailbox, never the mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from imapclient import DELETED, IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientError, LoginError

from careservice.config import Config, ImapMailbox, OAuth2Config, Site
from careservice.intake.headers import mailbox_envelope
from careservice.intake.ingest import Ingest
from careservice.intake.mailboxlease import MailboxLease
from careservice.intake.spamcheck import Probe, SpamCheck
from careservice.logs import error_fields
from careservice.model import NewMessage, Source
from careservice.oauth2 import OAuth2Error, TokenSource
from careservice.spamverdict import stamp
from careservice.tlsconf import client_context

log = logging.getLogger("careservice.imap")
Pending = tuple[list[int], Future[list[str]]]  # UIDs and their commit in flight

BATCH = 100  # UIDs per FETCH and per commit
COMMITS_IN_FLIGHT = 2  # the store's group commit joins them; the fetch is then the slowest step
BIG_MESSAGE = 256 * 1024  # larger ones are fetched and committed alone: a batch holds at most 25 MB
IDLE_RENEW = 25 * 60.0  # servers may drop an IDLE after 30 minutes (RFC 2177)
IDLE_CHECK = 1.0  # how often an IDLEing worker looks at its stop flag
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
TIMEOUT = SocketTimeout(connect=15, read=120)
STOP_GRACE = 3.0


class MailboxProblem(Exception):
    """A session failed; `code` is the short reason shown in `status --json`. A `final` one is not
    retried until a reload or restart."""

    def __init__(self, code: str, final: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.final = final


def _expunge(client: IMAPClient, uids: list[int], uidplus: bool) -> int:
    """Flag `uids` \\Deleted and expunge them (only ever called for committed or quarantined mail)."""
    client.add_flags(uids, [DELETED], silent=True)
    if uidplus:
        client.uid_expunge(uids)
    else:
        client.expunge()
    return len(uids)


class MailboxWorker:
    """Drains one mailbox in its own thread until `stop()`; reconnects with exponential backoff."""

    def __init__(self, box: ImapMailbox, site: Site, ingest: Ingest, spam: SpamCheck, max_bytes: int,
                 loop: asyncio.AbstractEventLoop, tokens: TokenSource | None) -> None:
        self.box = box
        self.tokens = tokens  # auth = "oauth2"; else the password file is read at each connect
        self.site = site
        self.ingest = ingest
        self.spam = spam
        self.max_bytes = max_bytes
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name=f"imap-{box.name}", daemon=True)
        self._stop = threading.Event()
        self._rearm = threading.Event()  # set by a reload (or the stop) to end a final problem's wait
        self._client: IMAPClient | None = None
        self._problem: str | None = None  # None until the first health record
        self._failures = 0
        self._delay = BACKOFF_FIRST
        self._uidvalidity: int | None = None
        self.lease = MailboxLease(ingest.store, box.name)  # several nodes: only the holder polls

    def stop(self) -> None:
        self._stop.set()
        self._rearm.set()

    def rearm(self) -> None:
        """A reload: a mailbox stopped by a final problem tries again (its files are read again)."""
        if self.tokens is not None:
            self.tokens.reset()
        self._rearm.set()

    def interrupt(self) -> None:
        """Break a blocking socket call (used when the worker did not stop within the grace time)."""
        client = self._client
        if client is not None:
            with contextlib.suppress(OSError):
                client.socket().shutdown(socket.SHUT_RDWR)

    def _health(self, problem: str) -> None:
        if problem or self._problem != "":
            asyncio.run_coroutine_threadsafe(self.ingest.mailbox_health(self.box.name, problem), self.loop).result()
        self._problem = problem

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.lease.held.wait(IDLE_CHECK):  # else another node polls this mailbox
                    self._session()
            except MailboxProblem as problem:
                if problem.final:
                    self._halt(problem.code, problem.__cause__)
                else:
                    self._failed(problem.code, problem.__cause__)
            except Exception as exc:  # the worker must outlive any bug or odd server reply
                self._failed("internal_error", exc)

    def _failed(self, code: str, cause: BaseException | None) -> None:
        if self._stop.is_set():
            return
        self._failures += 1
        log.warning("imap_failed mailbox=%s problem=%s failures=%d retry_in=%.0fs %s", self.box.name, code,
                    self._failures, self._delay, error_fields(cause) if cause else "")
        with contextlib.suppress(Exception):  # the store may be closing; the log line above stands
            self._health(code)
        self._stop.wait(self._delay)
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    def _halt(self, code: str, cause: BaseException | None) -> None:
        """Wait for a reload or the stop: asking the provider again would only be refused again."""
        self._rearm.clear()
        log.error("imap_stopped mailbox=%s problem=%s (not retried until a reload or restart) %s", self.box.name,
                  code, error_fields(cause) if cause else "")
        with contextlib.suppress(Exception):
            self._health(code)
        self._rearm.wait()
        self._failures, self._delay = 0, BACKOFF_FIRST

    def _secret(self) -> str:
        """The password, or an access token (both before connecting, so a slow token endpoint holds no session)."""
        if self.tokens is None:
            try:
                return Path(self.box.password_file).read_text().strip()
            except OSError as exc:
                raise MailboxProblem("password_unreadable") from exc
        try:
            return self.tokens.token()
        except OAuth2Error as exc:
            raise MailboxProblem(f"oauth2_{exc.code}", exc.final) from exc

    def _login(self, client: IMAPClient, secret: str) -> None:
        try:
            if self.tokens is None:
                client.login(self.box.username, secret)
            else:
                client.oauth2_login(self.box.username, secret)
        except LoginError as exc:
            if self.tokens is not None:
                self.tokens.forget()  # revoked or lacking a permission: the next attempt asks for a new one
            raise MailboxProblem("auth_failed") from exc

    def _connect(self) -> IMAPClient:
        box = self.box
        context = None if box.security == "none" else client_context(verify=box.verify_tls)
        try:
            client = IMAPClient(box.host, box.port, ssl=box.security == "tls", ssl_context=context, timeout=TIMEOUT)
        except ssl.SSLError as exc:
            raise MailboxProblem("tls_error") from exc
        except (OSError, IMAPClientError) as exc:
            raise MailboxProblem("connect_failed") from exc
        self._client = client
        if box.security == "starttls":
            try:
                client.starttls(context)
            except (OSError, IMAPClientError) as exc:
                raise MailboxProblem("tls_error") from exc
        return client

    def _session(self) -> None:
        secret = self._secret()
        # a session ends when its token is due for renewal: Microsoft 365 drops it once the token expires
        renew_at = math.inf if self.tokens is None else self.tokens.renew_at
        try:
            client = self._connect()
            self._login(client, secret)
            try:
                self._note_uidvalidity(client.select_folder(self.box.folder))
            except IMAPClientError as exc:
                raise MailboxProblem("folder_missing") from exc
            idle, uidplus = client.has_capability("IDLE"), client.has_capability("UIDPLUS")
            log.info("imap_connected mailbox=%s idle=%s uidplus=%s", self.box.name, idle, uidplus)
            while not self._stop.is_set() and self.lease.held.is_set():
                while not self._stop.is_set() and self._drain_pass(client, uidplus):
                    pass
                if self._problem != "":
                    self._health("")
                    log.info("imap_working mailbox=%s", self.box.name)
                self._failures, self._delay = 0, BACKOFF_FIRST
                if time.monotonic() >= renew_at:
                    log.info("imap_reconnecting mailbox=%s reason=token_renewal", self.box.name)
                    break
                if idle:
                    self._idle(client, renew_at)
                else:
                    self._stop.wait(min(self.box.poll_seconds, renew_at - time.monotonic()))
                if not self._stop.is_set():  # a fresh view; imaplib also drops the responses it kept
                    self._note_uidvalidity(client.select_folder(self.box.folder))
            client.logout()
        except ssl.SSLError as exc:
            raise MailboxProblem("tls_error") from exc
        except (OSError, IMAPClientError) as exc:
            raise MailboxProblem("session_failed") from exc
        finally:
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    client.shutdown()

    def _note_uidvalidity(self, selected: dict[bytes, Any]) -> None:
        uidvalidity = selected.get(b"UIDVALIDITY")
        if self._uidvalidity is not None and uidvalidity != self._uidvalidity:
            log.info("imap_uidvalidity_changed mailbox=%s (all mail in the folder is taken again; "
                     "digests recognise what was committed)", self.box.name)
        self._uidvalidity = uidvalidity

    def _idle(self, client: IMAPClient, until: float) -> None:
        """Wait in IDLE until the server reports new mail, the stop flag, IDLE_RENEW, or `until` (monotonic).

        Mail delivered after the last SEARCH but before IDLE begins is reported by Dovecot only when
        the IDLE ends (it syncs the view at DONE), up to IDLE_RENEW later: a NOOP first syncs the view,
        and an EXISTS above zero in its answer means another pass now instead."""
        _, synced = client.noop()
        if any(len(r) > 1 and r[1] == b"EXISTS" and r[0] > 0 for r in synced):
            return
        client.idle()
        deadline = min(time.monotonic() + IDLE_RENEW, until)
        while not self._stop.is_set() and self.lease.held.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            responses = client.idle_check(IDLE_CHECK)
            if any(len(r) > 1 and r[1] == b"EXISTS" for r in responses):
                break
            if not responses and time.monotonic() - started < IDLE_CHECK / 10:
                # imapclient returns nothing at once when the socket is readable but closed
                raise ConnectionError("connection closed during IDLE")
        client.idle_done()

    def _drain_pass(self, client: IMAPClient, uidplus: bool) -> int:
        """Take what is in the folder now; returns how many messages left it."""
        uids = client.search("ALL")
        if not uids:
            return 0
        big = set(client.search(["LARGER", min(BIG_MESSAGE, self.max_bytes)])) & set(uids)
        sizes = client.fetch(sorted(big), ["RFC822.SIZE"]) if big else {}
        too_large = sorted(u for u, d in sizes.items() if d.get(b"RFC822.SIZE", 0) > self.max_bytes)
        removed = self._quarantine(client, too_large, uidplus, "too_large") if too_large else 0
        small = [u for u in uids if u not in big]
        batches = [small[i:i + BATCH] for i in range(0, len(small), BATCH)]
        batches += [[u] for u in sorted(big.difference(too_large))]
        pending: deque[Pending] = deque()
        for batch in batches:
            if self._stop.is_set():
                break
            fetched, spam = self._fetch(client, batch)
            if spam:
                removed += self._quarantine(client, spam, uidplus, "spam")
            if fetched:
                pending.append(self._submit(fetched))
            if len(pending) > COMMITS_IN_FLIGHT:
                removed += _expunge(client, self._committed(pending.popleft()), uidplus)
        while pending:
            removed += _expunge(client, self._committed(pending.popleft()), uidplus)
        return removed

    def _fetch(self, client: IMAPClient, uids: list[int]) -> tuple[list[tuple[int, NewMessage]], list[int]]:
        """The messages to commit, each stamped with its spam verdict, and the UIDs rspamd rejected."""
        fetched = client.fetch(uids, ["BODY.PEEK[]"])
        # a UID missing from the answer was expunged meanwhile by another client
        raws = [(uid, fetched[uid][b"BODY[]"]) for uid in uids if b"BODY[]" in fetched.get(uid, {})]
        check = self.spam.check_all([raw for _, raw in raws], Probe((self.site.care_address,)))
        verdicts = asyncio.run_coroutine_threadsafe(check, self.loop).result()
        out, rejected = [], []
        for (uid, raw), verdict in zip(raws, verdicts, strict=True):
            if verdict.result == "reject":
                rejected.append(uid)
            elif verdict.result != "greylist":  # a greylisted message stays for the next pass
                envelope = mailbox_envelope(raw, self.box.envelope_header, self.site.care_address)
                out.append((uid, NewMessage(self.site.id, Source.IMAP, envelope, stamp(raw, verdict),
                                            dedupe=self.ingest.dedupe_key(self.site.id, raw))))
        return out, rejected

    def _submit(self, fetched: list[tuple[int, NewMessage]]) -> Pending:
        """Start committing `fetched` on the event loop; the caller waits in `_committed`."""
        if self.ingest.disk_low():
            raise MailboxProblem("disk_low")
        coro = self.ingest.accept([m for _, m in fetched], "imap")
        return [uid for uid, _ in fetched], asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _committed(self, pending: Pending) -> list[int]:
        """Wait for a commit; returns its UIDs, which may now be deleted."""
        uids, future = pending
        try:
            ids = future.result()
        except Exception as exc:
            raise MailboxProblem("intake_failed") from exc
        log.info("imap_taken mailbox=%s messages=%d duplicates=%d", self.box.name, len(uids), ids.count(""))
        return uids

    def _quarantine(self, client: IMAPClient, uids: list[int], uidplus: bool, reason: str) -> int:
        folder = self.box.quarantine_folder
        if not client.folder_exists(folder):
            client.create_folder(folder)
        if client.has_capability("MOVE"):
            client.move(uids, folder)
        else:
            client.copy(uids, folder)
            _expunge(client, uids, uidplus)
        log.warning("imap_quarantined mailbox=%s messages=%d reason=%s folder=%s", self.box.name, len(uids), reason,
                    folder)
        return len(uids)


class ImapIntake:
    """All mailbox workers of one daemon: `start()` inside the running loop, `await stop()`."""

    def __init__(self, config: Config, ingest: Ingest, spam: SpamCheck) -> None:
        self.config = config
        self.ingest = ingest
        self.spam = spam
        self.workers: list[MailboxWorker] = []
        self.tokens: dict[OAuth2Config, TokenSource] = {}  # one per account: folders of one account share it

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for box in self.config.imap:
            site = self.config.site(box.site)
            assert site is not None  # config.load_config checked imap.site
            tokens = self.tokens.setdefault(box.oauth2, TokenSource(box.oauth2, box.name)) if box.oauth2 else None
            worker = MailboxWorker(box, site, self.ingest, self.spam, self.config.smtp.max_message_bytes, loop,
                                   tokens)
            worker.thread.start()
            worker.lease.start()
            self.workers.append(worker)

    def rearm(self) -> None:
        """A reload: mailboxes stopped by a final problem (a refused grant or client) try again."""
        for worker in self.workers:
            worker.rearm()

    async def stop(self) -> None:
        """Stop every worker; one still blocked on its socket after STOP_GRACE has the socket shut down."""
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            await asyncio.to_thread(worker.thread.join, STOP_GRACE)
            if worker.thread.is_alive():
                worker.interrupt()
                await asyncio.to_thread(worker.thread.join, STOP_GRACE)
            if worker.thread.is_alive():
                log.warning("imap_stop_timeout mailbox=%s", worker.box.name)
            await worker.lease.release()
        self.workers.clear()
