"""The Prometheus metrics both processes count, each where its event happens; the admin listener serves them.

`careservice run` gives both processes one folder for prometheus_client's multiprocess mode
(data_dir/metrics, emptied at each start), so the scrape sums the intake's counts and the worker's,
and a worker that died leaves its counts behind for its successor's to add to. The environment
variable naming the folder must be set before prometheus_client is first imported (careservice.cli
does it before importing the daemon); without it, as in unit tests, the metrics count in memory.

Labels hold fixed codes only: a channel, an SMTP reply code, a result or reason code, a site id
from the config. Nothing from a mail or a request ever becomes a label.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import ParamSpec

from prometheus_client import Counter, Gauge, Histogram, multiprocess
from prometheus_client.metrics_core import Metric

from careservice.config import METRICS_DIR_ENV
from careservice.logs import error_fields
from careservice.model import Outcome
from careservice.spamverdict import RESULTS as SPAM_RESULTS
from careservice.tta import HISTOGRAM_BUCKETS

CHANNELS = ("smtp", "imap", "web")
FORM_RESULTS = ("accepted", "invalid", "bad_code", "rate_limited", "unavailable", "spam")
DELIVERY_RESULTS = ("sent", "deferred", "failed")
P = ParamSpec("P")
log = logging.getLogger("careservice.metrics")
REFUSAL_COUNTERS = ("reply_refused", "reply_late")  # a stage's counters that mean a staff reply was not relayed
FILE_KINDS = ("counter", "histogram", "gauge_livemax")  # the multiprocess files the metrics below write
FILE_BYTES = 1 << 16  # room for a few hundred samples; prometheus_client grows a file that needs more


def _allocate_files() -> None:
    """This process's metric files, made with their disk blocks allocated before any metric writes:
    prometheus_client makes them sparse and writes through mmap, so its first write to a page while the
    disk was full killed the process with SIGBUS (the worker restarted in a loop until space came back)."""
    folder = os.environ.get(METRICS_DIR_ENV)
    if not folder:
        return
    for kind in FILE_KINDS:
        try:
            fd = os.open(os.path.join(folder, f"{kind}_{os.getpid()}.db"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size == 0:  # all zeros: the library reads it as a new, empty file
                    os.posix_fallocate(fd, 0, FILE_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:  # the disk is full already: the library makes the file as it would have
            log.warning("metrics_file_not_allocated kind=%s %s", kind, error_fields(exc))


_allocate_files()

RECEIVED = Counter("careservice_messages_received", "Inbound messages committed, by channel (one per care "
                   "address a mail was for; a re-delivered duplicate too).", ["channel"], registry=None)
SMTP_REPLIES = Counter("careservice_smtp_replies", "Final SMTP replies the listener sent, by code.", ["code"],
                       registry=None)
FORM_POSTS = Counter("careservice_form_posts", "Contact form submissions, by site and result.", ["site", "result"],
                     registry=None)
OPENED = Counter("careservice_cases_opened", "Cases opened (forwarded to staff).", ["site"], registry=None)
ANSWERED = Counter("careservice_cases_answered", "Staff answers the relay took (each purges its case).", ["site"],
                   registry=None)
CLOSED_BY_PHONE = Counter("careservice_cases_closed_by_phone", "Cases closed by a #closed reply.", ["site"],
                          registry=None)
EXPIRED = Counter("careservice_cases_expired", "Cases purged unanswered after retention.unanswered_days.", ["site"],
                  registry=None)
REPLIES_REFUSED = Counter("careservice_replies_refused", "Replies to a reply address that were not relayed, by "
                          "reason (not_from_staff, token_invalid, late).", ["site", "reason"], registry=None)
DELIVERIES = Counter("careservice_deliveries", "Outgoing mail handed to the relay: sent (250), deferred (to retry), "
                     "failed (given up).", ["result"], registry=None)
COMMIT_SECONDS = Histogram("careservice_intake_commit_seconds", "Seconds from handing inbound mail to the store "
                           "until it is on disk.", registry=None)
TIME_TO_ANSWER = Histogram("careservice_time_to_answer_seconds", "Seconds from a case's arrival until the relay "
                           "took its answer.", ["site"], buckets=HISTOGRAM_BUCKETS, registry=None)
PURGE_LAG = Histogram("careservice_purge_lag_seconds", "Seconds from the relay's 250 for an answer until its case's "
                      "rows and key are deleted.", buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                      registry=None)
SPAM_CHECKS = Counter("careservice_spam_checks", "Inbound messages rspamd was asked about, by result (reject, "
                      "suspect, greylist, ham, or unavailable: no answer, the mail was taken unchecked).", ["result"],
                      registry=None)
_STAGE_COUNTERS = {"opened": OPENED, "closed_by_phone": CLOSED_BY_PHONE, "expired": EXPIRED}

_form_tally: Tally[tuple[str, str, str]] = Tally()  # (site, day, form_<result>) until the daemon stores it
_replies: Tally[bytes] = Tally()  # SMTP reply code -> replies sent since the last scrape


def initialise(site_ids: Iterable[str]) -> None:
    """Show every known series from the start at 0, so that rate() and absent-series alerts work at once."""
    for channel in CHANNELS:
        RECEIVED.labels(channel)
    for result in DELIVERY_RESULTS:
        DELIVERIES.labels(result)
    for result in SPAM_RESULTS:
        SPAM_CHECKS.labels(result)
    for site in site_ids:
        for result in FORM_RESULTS:
            FORM_POSTS.labels(site, result)
        for counter in (OPENED, ANSWERED, CLOSED_BY_PHONE, EXPIRED):
            counter.labels(site)


_failures_logged = 0.0


def _never_fails(count: Callable[P, None]) -> Callable[P, None]:
    """A metric that cannot be written (its multiprocess file gone with a data_dir moved under a running
    daemon, a full disk) must not fail the SMTP session or the stage that counts it: one log line a
    minute says so."""
    @functools.wraps(count)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        global _failures_logged
        try:
            count(*args, **kwargs)
        except Exception as exc:
            if time.monotonic() - _failures_logged > 60:
                _failures_logged = time.monotonic()
                log.warning("metrics_failed %s", error_fields(exc))
    return guarded



def smtp_reply(status: bytes) -> None:
    """One line the SMTP listener sends; the last line of a reply counts, by its code. Counted here and
    added to the metric at the next scrape (write_replies), not at each of a message's seven or so
    replies (a locked write to the metric file each)."""
    code = status[:3]
    if code.isdigit() and status[3:4] != b"-":
        _replies[code] += 1


@_never_fails
def write_replies() -> None:
    """Add the SMTP replies counted since the last call to careservice_smtp_replies_total; the admin calls it
    before each scrape, in the same thread as the listener counts."""
    counted = dict(_replies)
    _replies.clear()
    for code, count in counted.items():
        _smtp_code(code.decode()).inc(count)


@functools.cache
def _smtp_code(code: str) -> Counter:
    """The counter of one reply code, looked up once: a message gets about seven replies."""
    return SMTP_REPLIES.labels(code)


@_never_fails
def received(channel: str, messages: int, seconds: float) -> None:
    """A commit of `messages` inbound messages from `channel` that took `seconds`."""
    RECEIVED.labels(channel).inc(messages)
    COMMIT_SECONDS.observe(seconds)


@_never_fails
def form_post(site: str, result: str) -> None:
    """A contact form submission's result (one of FORM_RESULTS); also kept for the daily statistics."""
    FORM_POSTS.labels(site, result).inc()
    _form_tally[(site, time.strftime("%Y-%m-%d", time.gmtime()), f"form_{result}")] += 1


@_never_fails
def spam_check(result: str) -> None:
    """One answer (or none: "unavailable") from rspamd; `result` is one of SPAM_RESULTS."""
    SPAM_CHECKS.labels(result).inc()


def take_form_tally() -> dict[tuple[str, str, str], int]:
    """The form results counted since the last call, for the store's daily statistics."""
    tally = dict(_form_tally)
    _form_tally.clear()
    return tally


def restore_form_tally(tally: dict[tuple[str, str, str], int]) -> None:
    """Put back a tally the store could not take, for the next attempt."""
    _form_tally.update(tally)


@_never_fails
def stage_outcome(site: str, outcome: Outcome) -> None:
    """The counters of an outcome the worker committed."""
    for name in outcome.counters:
        if name in _STAGE_COUNTERS:
            _STAGE_COUNTERS[name].labels(site).inc()
        elif name in REFUSAL_COUNTERS:
            REPLIES_REFUSED.labels(site, outcome.reason.removeprefix("reply_")).inc()


@_never_fails
def delivered(site: str, answer: bool, waited: float | None, purge_seconds: float) -> None:
    """A mail the relay took; for an answer, how long its case waited and how long the purge took."""
    DELIVERIES.labels("sent").inc()
    if answer:
        ANSWERED.labels(site).inc()
        PURGE_LAG.observe(purge_seconds)
        if waited is not None:
            TIME_TO_ANSWER.labels(site).observe(waited)


@_never_fails
def not_delivered(gave_up: bool) -> None:
    DELIVERIES.labels("failed" if gave_up else "deferred").inc()


@_never_fails
def relay_up(up: bool) -> None:
    relay_gauge().set(1 if up else 0)


@functools.cache
def relay_gauge() -> Gauge:
    """Made at the worker's first contact with the relay: until then its state is unknown, and a gauge made
    at import would read 0 (down) from every process's file."""
    return Gauge("careservice_relay_up", "1 when the relay took mail or answered at the last attempt, 0 when it "
                 "could not be reached (absent until the worker first tried it).", registry=None,
                 multiprocess_mode="livemax")


class ProcessFiles(multiprocess.MultiProcessCollector):
    """The sum of every process's metric files, as prometheus_client merges them, less the files it cannot
    read yet or any more: a process creates its file before sizing it, and one empty file (left for good
    by a process killed in between) fails the whole merge (prometheus/client_python#1199); a file removed
    between listing and reading (a dead worker's gauges) is listed again."""

    def collect(self) -> Iterable[Metric]:
        for _ in range(3):
            files = []
            for path in glob.glob(os.path.join(self._path, "*.db")):
                try:
                    if os.path.getsize(path) >= 8:  # the used-bytes header a sized file starts with
                        files.append(path)
                except OSError:
                    continue
            try:
                return self.merge(files, accumulate=True)
            except FileNotFoundError:
                continue
        return self.merge([], accumulate=True)


def process_gone(pid: int) -> None:
    """Drop a dead worker's gauges (its counters stay and keep counting in the sums)."""
    if METRICS_DIR_ENV in os.environ:
        multiprocess.mark_process_dead(pid)
