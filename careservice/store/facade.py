"""Store: the async operations the rest of the code calls, each one transaction (see executor).

Two backends behind it: SQLite files in data_dir (the default, one node) and PostgreSQL (`[store]
url`, several nodes: careservice.store.pg). The SQL of the workflow is the same for both; what
several nodes need besides (claims with leases, mailbox leases, the orphan sweep across the two
databases, wake-ups of the other nodes) is the PostgreSQL backend's and a no-op on SQLite.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from careservice.crypto import Keyring
from careservice.model import Case, CaseState, MailKind, NewMessage, OpenCase, Outcome, OutgoingMail, QueuedMail
from careservice.settings import StoreConfig
from careservice.store import blocks, cases, disclosure, keys, mailq, purge, rota, shards, tallies
from careservice.store.executor import Executor, InlineExecutor, ThreadExecutor

SQLITE = StoreConfig()


class Store:
    """`durable`: each commit synced (the intake: a commit is on disk before its 250). `inline`: the
    caller's thread runs the transactions (the worker), else a writer thread does. `shard`: (index, of)
    of a worker process, which takes only the due cases and mail of its shard (store.shards). All three
    are SQLite's: on PostgreSQL every commit is durable and runs in the store's thread, and claims keep
    each worker process to its own rows."""

    def __init__(self, data_dir: Path, keyring: Keyring, durable: bool = True, inline: bool = False,
                 backend: StoreConfig = SQLITE, shard: tuple[int, int] = shards.ONE) -> None:
        self.data_dir = data_dir
        self.keyring = keyring
        self.backend = backend
        self.shard = shard
        self.node = f"{socket.gethostname()}:{os.getpid()}"  # who holds a claim or a lease
        if backend.shared:  # imported only here: psycopg is no cost of the embedded default
            from careservice.store.pg import claims
            from careservice.store.pg.executor import PgExecutor

            self.claims = claims
            self.executor: Executor | PgExecutor = PgExecutor(backend.url, backend.keys_url, keyring)
        else:
            self.executor = (InlineExecutor if inline else ThreadExecutor)(data_dir, keyring, durable)

    async def start(self, sweep: bool) -> None:
        """Open the store; `sweep` drops what a process killed between the two files' commits left
        (rows without a key, a key without rows). Both processes sweep as they start: under the write
        lock, so the other process's commits are never seen half done."""
        await self.executor.start()
        if sweep:
            await self.sweep_orphans(time.time(), starting=True)
        await self.rotate_digests(time.time())

    async def sweep_orphans(self, now: float, starting: bool = False) -> None:
        """What a crash between the two databases' commits left. SQLite: at start only (its process
        pair never commits then). PostgreSQL: also every sweep, since other nodes crash too."""
        if self.backend.shared:
            await self.executor.call(self.claims.sweep_orphans, now)
        elif starting:
            await self.executor.call(purge.sweep_orphans, checkpoint=True)
            await self.executor.call(keys.bind_unbound_keys)

    async def renew_claims(self, case_ids: Iterable[str], mail_ids: Iterable[int], now: float) -> None:
        """Keep this node's claims on the cases and mail in its hands for another lease_seconds (PostgreSQL;
        the worker calls it every third of a lease, so a node that stopped loses its claims)."""
        if self.backend.shared:
            await self.executor.call(self.claims.renew_claims, self.node, list(case_ids), list(mail_ids), now,
                                     float(self.backend.lease_seconds))

    async def take_lease(self, name: str, seconds: float, now: float) -> bool:
        """Hold the cluster-wide lease `name` (e.g. an IMAP mailbox) for `seconds`, or keep holding it;
        False while another node's runs. Always True on SQLite: one node."""
        if not self.backend.shared:
            return True
        return bool(await self.executor.call(self.claims.take_lease, name, self.node, now, seconds))

    async def drop_lease(self, name: str) -> None:
        """Give a lease up at a clean stop, so another node takes over at once."""
        if self.backend.shared:
            await self.executor.call(self.claims.drop_lease, name, self.node)

    async def listen(self, on_wake: Callable[[], None]) -> None:
        """Call `on_wake` whenever another node (or process) commits due work; runs until cancelled.
        SQLite: returns at once (the daemon wakes its worker through their pipe)."""
        if self.backend.shared:
            from careservice.store.pg.wakeup import listen

            await listen(self.backend.url, on_wake)

    async def rewrap_keys(self) -> int:
        """Wrap every case key and day secret still under a previous master key under the current one."""
        return int(await self.executor.call(keys.rewrap_keys, checkpoint=True))

    async def close(self) -> None:
        await self.executor.close()

    async def add_inbound(self, messages: list[NewMessage], now: float) -> list[str]:
        """Commit inbound messages durably; returns their ids ('' for a de-duplicated one)."""
        return await self.executor.call(cases.add_inbound, messages, now)

    async def due_cases(self, states: Iterable[CaseState], now: float, limit: int, max_bytes: int,
                        exclude: set[str]) -> list[Case]:
        """Due cases in next_run order: at most `limit`, and `max_bytes` stored (see budget.first_fit)."""
        if self.backend.shared:  # claimed for this node for lease_seconds
            return await self.executor.call(self.claims.due_cases, tuple(states), now, limit, max_bytes, tuple(exclude),
                                            self.node, float(self.backend.lease_seconds))
        return await self.executor.read(cases.due_cases, tuple(states), now, limit, max_bytes, tuple(exclude),
                                        self.shard)

    async def get_case(self, case_id: str) -> Case | None:
        return await self.executor.read(cases.get_case, case_id)

    async def apply(self, case: Case, outcome: Outcome, now: float, next_run: float) -> None:
        """Write a stage's outcome and the mail it causes in one transaction."""
        purging = CaseState.PURGED in (outcome.state, outcome.target_state)
        await self.executor.call(cases.apply, case, outcome, now, next_run, checkpoint=purging)

    async def open_cases(self) -> list[tuple[str, str, str, float, str]]:
        """(id, site, state, created, owner) of every open case, for `careservice cases`."""
        return await self.executor.read(disclosure.open_cases)

    async def open_case(self, case_id: str) -> tuple[Case, list[QueuedMail]] | None:
        """An open case and the mail queued under it, for `careservice export`; None when it is not open."""
        return await self.executor.read(disclosure.open_case, case_id)

    async def turns(self, site: str) -> dict[str, int]:
        """The round robin turns of the site's routes ("" for its own staff); the stage's Outcome.turn
        moves one on."""
        return await self.executor.read(rota.turns, site)

    async def digest_day(self, site: str) -> str:
        """The local date of the site's last digest ("" for none)."""
        return await self.executor.read(rota.digest_day, site)

    async def open_for_digest(self, site: str) -> list[OpenCase]:
        return await self.executor.read(rota.open_for_digest, site)

    async def queue_digest(self, site: str, day: str, filed_under: str, mails: tuple[OutgoingMail, ...],
                           now: float) -> bool:
        """Queue the site's digest for `day` under a key of its own, and remember the day, in one
        transaction; False (nothing queued) when that day's went already or it has no mail."""
        return await self.executor.call(rota.queue_digest, site, day, filed_under, mails, now)

    async def hold(self, case: Case, failures: int, retry_at: float) -> None:
        """Keep a case whose stage failed out of the due list until `retry_at` (counted as stuck)."""
        await self.executor.call(cases.hold, case.id, case.state, failures, retry_at)

    async def due_mail(self, now: float, limit: int, max_bytes: int) -> list[QueuedMail]:
        """Due mail in next_attempt order: at most `limit`, and `max_bytes` stored (see budget.first_fit)."""
        if self.backend.shared:  # claimed for this node for lease_seconds
            return await self.executor.call(self.claims.due_mail, now, limit, max_bytes, self.node,
                                            float(self.backend.lease_seconds))
        return await self.executor.read(mailq.due_mail, now, limit, max_bytes, self.shard)

    async def mail_delivered(self, item: QueuedMail, outcome: Outcome | None, now: float) -> float | None:
        """Drop a delivered mail and apply the workflow's outcome for its case in the same transaction;
        the seconds an answered case waited (None for other mail, or a case already gone)."""
        answer = item.mail.kind is MailKind.ANSWER
        return await self.executor.call(mailq.mail_delivered, item, outcome, now, checkpoint=answer)

    async def mail_deferred(self, item: QueuedMail, next_attempt: float) -> None:
        await self.executor.call(mailq.mail_deferred, item.id, next_attempt)

    async def mail_failed(self, item: QueuedMail, outcome: Outcome | None, now: float) -> None:
        """Drop a mail the relay refused for good, applying the workflow's outcome in the same transaction."""
        await self.executor.call(mailq.mail_failed, item, outcome, now)

    async def rotate_digests(self, now: float) -> None:
        """Switch the keyring to today's digest secret and drop every digest of an earlier day (both
        processes call it at start and then every minute; the first call of a day makes the secret)."""
        await self.executor.call(keys.rotate_digests, now, checkpoint=True)

    async def is_blocked(self, digests: tuple[bytes, ...], now: float) -> bool:
        """Whether one of these sender digests (Keyring.block_digest) is marked "#spam" and not expired."""
        return await self.executor.read(blocks.blocked, digests, now)

    async def prune_blocks(self, now: float) -> None:
        await self.executor.call(blocks.prune, now)

    async def purge_older_than(self, cutoff: float, sites: frozenset[str], now: float) -> list[tuple[str, str, float]]:
        """Purge every case created before `cutoff`, whatever its state (see purge.purge_aged), and truncate
        the WAL, as every purge does (this sweep also retries a truncation an earlier purge's reader blocked)."""
        return await self.executor.call(purge.purge_aged, cutoff, sites, now, checkpoint=True)

    async def counts(self) -> dict[str, Any]:
        return await self.executor.read(tallies.counts_op)

    async def add_stats(self, counts: dict[tuple[str, str, str], int]) -> None:
        """Add to the per-site daily counters: (site, day, name) -> n."""
        await self.executor.call(tallies.add_stats, counts)

    async def mailbox_health(self, name: str, problem: str, now: float) -> None:
        """Record an IMAP mailbox's health for `status --json` ("" = working; else a short code)."""
        await self.executor.call(tallies.mailbox_health, name, problem, now)
