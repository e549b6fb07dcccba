"""What a benchmark run measures: counts and limits of the quick and the full run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

Log = Callable[[str], None]
T = TypeVar("T")

# the full-cycle rows (careservice's and its floors'), the latency row, the form row and each level of
# scale are measured again (in the full run, at most ATTEMPTS times) while the hypervisor took
# STEAL_LIMIT cores or more: a stolen host slows careservice's rows or one baseline and not the other,
# so the ratio and the verdict would describe the host, not the code. Every attempt is reported; the
# row is the least stolen one.
ATTEMPTS = 3
STEAL_LIMIT = 0.05


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    fresh_servers: bool  # scenario 1: a new server per run (else one per target and repetition)
    intake_count: dict[int, int]  # message size -> messages per intake run
    intake_seconds: float  # time limit of one intake run
    warmup: int  # messages before each measured run
    cycle_cases: int
    latency_seconds: float  # at the fixed offered load
    offered_rate: float
    answers: int
    form_posts: int
    imap_messages: int
    scale_levels: tuple[int, ...]
    scale_batch: int
    node_cases: int  # per setup of scenario 7
    workers: int = 1  # service.workers of the daemon in scenario 2 (python -m bench --workers N)


QUICK = Settings(quick=True, reps=1, fresh_servers=False, intake_count={3_000: 300, 100_000: 100},
                 intake_seconds=0.6, warmup=20, cycle_cases=600, latency_seconds=3.0, offered_rate=100.0,
                 answers=200, form_posts=300, imap_messages=500, scale_levels=(1_000, 3_000), scale_batch=200,
                 node_cases=300)
FULL = Settings(quick=False, reps=3, fresh_servers=True, intake_count={3_000: 5_000, 100_000: 2_000},
                intake_seconds=20.0, warmup=200, cycle_cases=10_000, latency_seconds=20.0, offered_rate=100.0,
                answers=2_000, form_posts=5_000, imap_messages=5_000, scale_levels=(1_000, 10_000, 100_000),
                scale_batch=2_000, node_cases=10_000)


def least_stolen(measure: Callable[[], T], steal: Callable[[T], float], s: Settings, log: Log,
                 what: str) -> tuple[T, list[T]]:
    """`measure()` once, and again while the host stole STEAL_LIMIT cores or more (the full run only, at
    most ATTEMPTS in all): the least stolen attempt, and all of them in the order they ran."""
    attempts = [measure()]
    while len(attempts) < (1 if s.quick else ATTEMPTS) and steal(attempts[-1]) >= STEAL_LIMIT:
        log(f"{what}: host steal {steal(attempts[-1]):.2f} cores, measuring again")
        attempts.append(measure())
    return min(attempts, key=steal), attempts


def tried(attempts: list[T], describe: Callable[[T], str]) -> str:
    """A row's note on its attempts (empty for one)."""
    if len(attempts) < 2:
        return ""
    return "; the least stolen of " + "; ".join(f"attempt {n}: {describe(a)}" for n, a in enumerate(attempts, 1))
