"""The aggregate statistics promised by the privacy policy: per site and day, counts and time-to-answer shares.

Built from the store's daily counters only (careservice.statsdb), which hold no case id, address or
time of a single case, so nothing here links to a person. `careservice stats` prints them as JSON
or CSV; the admin listener's /stats page charts them (careservice.charts).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from careservice import tta
from careservice.settings import StoreConfig
from careservice.store import statsdb

COLUMNS = ("opened", "answered", "closed_by_phone", "expired", "replies_refused", "form_accepted", "form_refused")
SOURCES = {  # each column: the store's counter names it adds up
    "opened": ("opened",), "answered": ("answered",), "closed_by_phone": ("closed_by_phone",),
    "expired": ("expired",), "replies_refused": ("reply_refused", "reply_late"), "form_accepted": ("form_accepted",),
    "form_refused": ("form_invalid", "form_bad_code", "form_rate_limited", "form_unavailable",
                     "form_spam"),
}
WITHIN = ((3600, "1h"), (4 * 3600, "4h"), (86400, "24h"))
FIELDS = ("site", "day", *COLUMNS, "median_seconds_to_answer", *(f"answered_within_{name}" for _, name in WITHIN))


@dataclass(frozen=True)
class Tally:
    """One site's counts over a day (or a whole period), and its answers per time-to-answer bucket."""

    site: str
    day: str  # YYYY-MM-DD, or "" for a period's total
    counts: dict[str, int]
    buckets: dict[str, int]

    @property
    def median(self) -> float | None:
        return tta.median(self.buckets)

    def within(self, seconds: float) -> float | None:
        return tta.share_within(self.buckets, seconds)

    def row(self) -> dict[str, Any]:
        median = self.median
        return {"site": self.site, "day": self.day, **self.counts,
                "median_seconds_to_answer": None if median is None else round(median),
                **{f"answered_within_{name}": _share(self.within(seconds)) for seconds, name in WITHIN}}


@dataclass(frozen=True)
class Report:
    days: list[str]  # oldest first
    sites: list[str]
    tallies: dict[tuple[str, str], Tally]  # (site, day)

    def site_days(self, site: str) -> list[Tally]:
        return [self.tallies[(site, day)] for day in self.days]

    def total(self, site: str) -> Tally:
        days = self.site_days(site)
        return Tally(site, "", {c: sum(t.counts[c] for t in days) for c in COLUMNS},
                     _add(t.buckets for t in days))


def _share(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _add(buckets: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in buckets:
        for name, n in one.items():
            total[name] = total.get(name, 0) + n
    return total


def report(data_dir: Path, site_ids: Iterable[str], days: int, now: float | None = None,
           backend: StoreConfig | None = None) -> Report:
    """The last `days` days up to today (UTC), for the configured sites and any other site the store counted."""
    today = (time.time() if now is None else now) // 86400
    names = [time.strftime("%Y-%m-%d", time.gmtime((today - back) * 86400)) for back in range(days - 1, -1, -1)]
    counters = statsdb.daily(data_dir, names[0], names[-1], backend)
    sites = list(dict.fromkeys([*site_ids, *sorted(site for site, _ in counters)]))
    tallies = {}
    for site in sites:
        for day in names:
            raw = counters.get((site, day), {})
            tallies[(site, day)] = Tally(site, day, {c: sum(raw.get(n, 0) for n in SOURCES[c]) for c in COLUMNS},
                                         {n: v for n, v in raw.items() if n in tta.RANGES})
    return Report(names, sites, tallies)


def to_json(rep: Report) -> str:
    return json.dumps({"first_day": rep.days[0], "last_day": rep.days[-1],
                       "rows": [t.row() for site in rep.sites for t in rep.site_days(site)],
                       "totals": {site: {k: v for k, v in rep.total(site).row().items() if k not in ("site", "day")}
                                  for site in rep.sites}}, indent=1)


def to_csv(rep: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    for site in rep.sites:
        writer.writerows(t.row() for t in rep.site_days(site))
    return out.getvalue()
