"""Result rows, the printed table, the JSON file and the SVG chart."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Row:
    """One measured line: a value (None = n/a) and what it is compared with."""

    scenario: str
    case: str
    target: str  # what ran: careservice, a baseline, ...
    value: float | None
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    server_cores: float | None = None
    gen_cores: float | None = None
    machine_cores: float | None = None
    steal_cores: float | None = None  # of machine_cores: taken by the hypervisor (bench.procstat.Usage)
    ratios: dict[str, float] = field(default_factory=dict)  # baseline name -> value / baseline value
    goal: str = ""
    verdict: str = ""  # "met", "MISSED" or "" (no goal)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def judge(row: Row, goal: str, met: bool) -> None:
    row.goal, row.verdict = goal, "met" if met else "MISSED"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if abs(value) >= 10 or digits == 0 else f"{value:.{max(digits, 2)}f}"


def table(rows: list[Row]) -> str:
    """A plain-text table, one line per row."""
    head = ["scenario", "case", "target", "value", "unit", "ratio", "p50 ms", "p99 ms", "srv CPU", "gen CPU",
            "machine", "steal", "goal", "verdict", "note"]
    lines = [head]
    for r in rows:
        ratios = ", ".join(f"{v:.2f}x {k}" for k, v in r.ratios.items())
        lines.append([r.scenario, r.case, r.target, _num(r.value, 1 if (r.value or 0) < 100 else 0), r.unit, ratios,
                      _num(r.p50_ms, 2), _num(r.p99_ms, 2), _num(r.server_cores, 2), _num(r.gen_cores, 2),
                      _num(r.machine_cores, 2), _num(r.steal_cores, 2), r.goal, r.verdict, r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, rows: list[Row], settings: dict[str, Any]) -> None:
    path.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "settings": settings, "rows": [asdict(r) for r in rows],
    }, indent=1))


BAR_W, LABEL_W, ROW_H = 300, 400, 18
COLORS = {"careservice": "#1f6feb", "postfix": "#d97706"}


def write_svg(path: Path, rows: list[Row], title: str) -> None:
    """Per scenario: a throughput bar and a latency bar (p50 dark over p99 light) for each row."""
    parts, y = [], 40
    for scenario in dict.fromkeys(r.scenario for r in rows):
        group = [r for r in rows if r.scenario == scenario]
        top = max((r.value or 0 for r in group), default=0) or 1
        slowest = max((r.p99_ms or r.p50_ms or 0 for r in group), default=0) or 1
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{escape(scenario)}</text>')
        parts.append(f'<text x="{LABEL_W}" y="{y}" fill="#555">throughput</text>'
                     f'<text x="{LABEL_W + BAR_W + 120}" y="{y}" fill="#555">latency p50 / p99 ms</text>')
        y += 8
        for r in group:
            color = COLORS.get(r.target, "#8b949e")
            label = f"{r.case} · {r.target}"
            parts.append(f'<text x="10" y="{y + 13}">{escape(label[:64])}</text>')
            width = BAR_W * (r.value or 0) / top
            parts.append(f'<rect x="{LABEL_W}" y="{y + 3}" width="{width:.1f}" height="{ROW_H - 6}" fill="{color}"/>'
                         f'<text x="{LABEL_W + width + 4:.1f}" y="{y + 13}">{_num(r.value, 1)} {escape(r.unit)}'
                         f'</text>')
            x0 = LABEL_W + BAR_W + 120
            if r.p99_ms is not None:
                parts.append(f'<rect x="{x0}" y="{y + 3}" width="{BAR_W * r.p99_ms / slowest:.1f}" '
                             f'height="{ROW_H - 6}" fill="{color}" opacity="0.35"/>')
            if r.p50_ms is not None:
                parts.append(f'<rect x="{x0}" y="{y + 3}" width="{BAR_W * r.p50_ms / slowest:.1f}" '
                             f'height="{ROW_H - 6}" fill="{color}"/>')
                parts.append(f'<text x="{x0 + BAR_W + 6}" y="{y + 13}">{_num(r.p50_ms, 2)} / {_num(r.p99_ms, 2)}'
                             f'</text>')
            y += ROW_H
        y += 24
    width = LABEL_W + 2 * BAR_W + 260
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>{"".join(parts)}</svg>\n')
