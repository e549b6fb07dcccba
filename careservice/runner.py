"""Drive cases through the stage table: claim due cases, run their stages, commit one outcome each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

from careservice import metrics
from careservice.context import Context, Inputs
from careservice.dkimcheck import verified_domains
from careservice.handlers import READS_TARGET, Stage
from careservice.logs import error_fields
from careservice.mail import Parsed, parse
from careservice.model import Case, CaseState, Outcome
from careservice.store import Store
from careservice.store.rota import TurnTaken
from careservice.wakeup import Wakeup

log = logging.getLogger("careservice.runner")

BATCH = 64
IDLE_WAIT = 5.0
FIRST_RETRY = 60.0  # a held case is retried after 1 min, doubling up to 1 h
LAST_RETRY = 3600.0
MAX_CHAIN = 10


def merge(first: Outcome, then: Outcome) -> Outcome:
    """Two consecutive outcomes as one: the later state, all mail and counters."""
    return Outcome(
        state=then.state, reason=then.reason, mails=first.mails + then.mails,
        updates=then.updates or first.updates, target_state=then.target_state or first.target_state,
        counters=first.counters + then.counters, ack_slot=then.ack_slot or first.ack_slot,
        block=then.block or first.block, target_owner=then.target_owner or first.target_owner,
        turn=then.turn or first.turn,
    )


class Runner:
    """Runs stages in memory until a case must wait, then commits the merged outcome once."""

    def __init__(self, ctx: Context, store: Store, stages: Mapping[CaseState, Stage],
                 waits: Mapping[CaseState, float], on_mail: Callable[[], None], batch_bytes: int,
                 verify_dkim: Callable[[bytes, str], tuple[str, ...]] = verified_domains) -> None:
        self.ctx = ctx
        self.store = store
        self.batch_bytes = batch_bytes  # stored bytes per batch (careservice.budget)
        self.on_mail = on_mail  # wakes the outbox once mail is committed
        self.stages = stages
        self.verify_dkim = verify_dkim  # the DKIM signatures of a staff reply (careservice.dkimcheck)
        self.waits = waits  # seconds after creation before a state's stage is due (OPEN: retention)
        self._wake = Wakeup()
        self._busy: set[str] = set()
        self._held: dict[str, float] = {}
        self._stopping = False
        # A round robin's turn is read before its stage and moved on by the stage's commit: new cases of a
        # site with one take turns one after the other, or those of one batch would all get the same
        # staff member. The turn itself lives in the store, which refuses a turn taken meanwhile (by
        # another worker process or node: the case is tried again at once).
        self._turns = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> set[str]:
        """The cases being advanced now (their claims are renewed while several nodes share the store)."""
        return set(self._busy)

    def stop(self) -> None:
        """Return from run() once the batch in progress is committed."""
        self._stopping = True
        self._wake.set()

    def next_run(self, case: Case, state: CaseState, now: float) -> float:
        """When `case`'s stage for `state` is due; an open case's also at its next reminder."""
        if state not in self.waits:
            return now
        due = case.created + self.waits[state]
        reminders = self.ctx.config.remind_after[case.reminded:] if state is CaseState.OPEN else ()
        return min(due, case.created + reminders[0]) if reminders else due

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.run_due()
            except Exception as exc:  # the store failed: nothing was applied, the next round retries
                log.error("runner_round_failed %s", error_fields(exc))
            await self._wake.wait(IDLE_WAIT)

    async def run_due(self) -> int:
        """Advance every due case once; returns how many were advanced."""
        done = 0
        while not self._stopping:
            now = self.ctx.clock()
            self._held = {k: t for k, t in self._held.items() if t > now}
            cases = await self.store.due_cases(self.stages, now, BATCH, self.batch_bytes,
                                                   self._busy | set(self._held))
            if not cases:
                return done
            self._busy.update(c.id for c in cases)
            try:
                await asyncio.gather(*(self.advance(c) for c in cases))
            finally:
                self._busy.difference_update(c.id for c in cases)
            done += len(cases)
        return done

    async def advance(self, case: Case) -> None:
        now = self.ctx.clock()
        outcome: Outcome | None = None
        current = case
        turns: Mapping[str, int] | None = None  # read, under the turn lock, when the chain reaches NEW
        taking_turn = False
        try:
            site = self.ctx.site(case)
            # parsed here, in the worker's one thread: the parse is bounded (careservice.mail), and a parse
            # thread would hold the GIL while the store's inline transactions hold the write lock
            parsed = parse(case.message.raw, case.message.envelope.mail_from)
            target: Case | None = None
            target_parsed: Parsed | None = None  # for the states that read it; parsed once per chain
            signers: tuple[str, ...] | None = None
            blocked = case.state is CaseState.RECEIVED and await self.store.is_blocked(self.senders(case, parsed), now)
            for _ in range(MAX_CHAIN):
                if current.target and (target is None or target.id != current.target):
                    target, target_parsed = await self.store.get_case(current.target), None
                if current.state in READS_TARGET and target is not None and target_parsed is None:
                    target_parsed = parse(target.message.raw, target.message.envelope.mail_from)
                if (current.state is CaseState.STAFF_REPLY and site.staff_auth == "dkim" and signers is None
                        and current.target and parsed.from_address in site.all_staff):
                    # verified here, not at intake, so the verdict is never stored or carried in a header a
                    # sender could forge, and is taken when the reply is judged; only for a valid token and
                    # a staff From (nothing else could pass); in a thread, since the key lookups wait on
                    # DNS (a timeout raises DkimUnavailable: the case is held and retried)
                    from_domain = parsed.from_address.rpartition("@")[2]
                    signers = await asyncio.to_thread(self.verify_dkim, case.message.raw, from_domain)
                if current.state is CaseState.NEW and site.rotates and turns is None:
                    await self._turns.acquire()  # held until this case's outcome is committed
                    taking_turn = True
                    turns = await self.store.turns(site.id)
                inputs = Inputs(current, site, parsed, target if current.target else None, now,
                                dkim_domains=signers or (), blocked=blocked, turns=turns or {},
                                target_parsed=target_parsed if current.target else None)
                step = self.stages[current.state](inputs, self.ctx)
                outcome = step if outcome is None else merge(outcome, step)
                current = replace(step.updates or current, state=step.state)
                if step.state not in self.stages or self.next_run(current, step.state, now) > now:
                    break
            del parsed, target_parsed, inputs  # the messages (attachments decoded) are not kept for the commit
            assert outcome is not None
            await self.store.apply(case, outcome, now, self.next_run(outcome.updates or case, outcome.state, now))
            metrics.stage_outcome(case.site, outcome)
            if outcome.mails:
                self.on_mail()
            target_id = (outcome.updates or case).target
            log.info("case_advanced case=%s from=%s to=%s reason=%s mails=%d%s", case.id, case.state,
                     outcome.state, outcome.reason, len(outcome.mails), f" target={target_id}" if target_id else "")
        except TurnTaken:  # another worker process or node moved the turn on since it was read: no failure,
            # and the case stays due, so the next round (at once) takes it with the turn as it is now
            log.info("case_turn_taken case=%s", case.id)
        except Exception as exc:  # a stage or the store failed: hold the case, try again later
            await self.hold(case, current.state, now, exc)
        finally:
            if taking_turn:
                self._turns.release()

    def senders(self, case: Case, parsed: Parsed) -> tuple[bytes, ...]:
        """The block digests of every address an inbound item comes from (envelope, From, form field)."""
        addresses = {parsed.from_address, case.message.envelope.mail_from, case.contact.email if case.contact else ""}
        return tuple(self.ctx.keyring.block_digest(a) for a in sorted(addresses) if a)

    async def hold(self, case: Case, state: CaseState, now: float, exc: Exception) -> None:
        """Retry the case later, backing off; the hold is stored, so `status` counts it as stuck."""
        failures = case.failures + 1
        delay = min(FIRST_RETRY * 2 ** (failures - 1), LAST_RETRY)
        self._held[case.id] = now + delay  # also when the store cannot record the hold
        log.error("case_stage_failed case=%s state=%s failures=%d retry_in=%d %s", case.id, state, failures,
                  delay, error_fields(exc))
        try:
            await self.store.hold(case, failures, now + delay)
        except Exception as store_exc:
            log.error("case_hold_failed case=%s %s", case.id, error_fields(store_exc))
