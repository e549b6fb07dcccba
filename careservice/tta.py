"""Time to answer as the statistics keep it: a count per bucket, per site and day, never a case's own time.

The store counts each delivered answer in one bucket (`bucket_name`); the statistics read the
buckets back and estimate the median and the share answered within a time by linear interpolation
inside a bucket, as Prometheus's histogram_quantile does. The bounds fall on 1 h, 4 h and 24 h,
so those shares are exact.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping

HOUR = 3600
DAY = 86400
# upper bounds in seconds, each with the name of the bucket that ends there
BOUNDS: tuple[tuple[float, str], ...] = (
    (300, "tta_0_5m"), (900, "tta_5m_15m"), (1800, "tta_15m_30m"), (HOUR, "tta_30m_1h"), (2 * HOUR, "tta_1h_2h"),
    (4 * HOUR, "tta_2h_4h"), (8 * HOUR, "tta_4h_8h"), (DAY, "tta_8h_1d"), (3 * DAY, "tta_1d_3d"),
    (7 * DAY, "tta_3d_7d"), (math.inf, "tta_7d_up"),
)
# (low, high) of every bucket name the store has written, the first release's coarser ones included
RANGES: dict[str, tuple[float, float]] = {
    **{name: (low, high) for (low, _), (high, name) in zip(((0.0, ""), *BOUNDS), BOUNDS, strict=False)},
    "tta_lt_1h": (0.0, HOUR), "tta_lt_1d": (HOUR, DAY), "tta_lt_7d": (DAY, 7 * DAY), "tta_ge_7d": (7 * DAY, math.inf),
}
HISTOGRAM_BUCKETS = tuple(bound for bound, _ in BOUNDS)  # the same bounds for careservice_time_to_answer_seconds


def bucket_name(seconds: float) -> str:
    """The bucket that counts an answer delivered `seconds` after its case came in."""
    return next(name for bound, name in BOUNDS if seconds < bound)


def _spans(counts: Mapping[str, int]) -> list[tuple[float, float, int]]:
    return sorted((*RANGES[name], n) for name, n in counts.items() if name in RANGES and n > 0)


def answered(counts: Mapping[str, int]) -> int:
    return sum(n for _, _, n in _spans(counts))


def share_within(counts: Mapping[str, int], seconds: float) -> float | None:
    """The share of answers (0..1) delivered within `seconds`; None without answers."""
    spans = _spans(counts)
    total = sum(n for _, _, n in spans)
    if not total:
        return None
    inside = sum(n * min(max((seconds - low) / (high - low), 0.0), 1.0) for low, high, n in spans)
    return inside / total


def median(counts: Mapping[str, int]) -> float | None:
    """The estimated median time to answer in seconds (the bucket's lower bound in the open last one)."""
    spans = _spans(counts)
    half = sum(n for _, _, n in spans) / 2
    if not half:
        return None
    running = list(itertools.accumulate(n for _, _, n in spans))
    at = bisect.bisect_left(running, half)  # the first span that reaches half of the answers
    low, high, n = spans[at]
    below = running[at] - n
    return low if math.isinf(high) else low + (high - low) * (half - below) / n
