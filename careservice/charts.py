"""The /stats page: the last 30 days as SVG charts drawn on the server (pygal), each with its numbers as a table.

The charts go into the page as data: images, so the page needs no script, no style outside its
own nonce and nothing from another server; pygal's inline script (for tooltips) is removed.
"""

from __future__ import annotations

import base64
import math
import time
from typing import Any

import pygal
from pygal.style import Style

from careservice.stats import WITHIN, Report, Tally
from careservice.texts import Texts

PAGE_DAYS = 30
ENDINGS = (("answered", "Answered"), ("closed_by_phone", "Closed by phone"), ("expired", "Expired"))
TABLE_COLUMNS = (("opened", "Opened"), *ENDINGS, ("replies_refused", "Replies refused"),
                 ("form_accepted", "Form posts accepted"), ("form_refused", "Form posts refused"))
FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
STYLE = Style(  # the colours of templates/web/layout/base.html
    background="#ffffff", plot_background="#ffffff", foreground="#1f2933", foreground_strong="#1f2933",
    foreground_subtle="#52606d", colors=("#1d5b8c", "#2f9e6e", "#b42318", "#f2b705"), font_family=FONT,
    label_font_family=FONT, major_label_font_family=FONT, title_font_family=FONT, legend_font_family=FONT,
    value_font_family=FONT, tooltip_font_family=FONT, no_data_font_family=FONT, title_font_size=18,
    legend_font_size=14, label_font_size=12, major_label_font_size=12, opacity="0.9", opacity_hover="0.9",
)
OPTIONS: dict[str, Any] = {
    "style": STYLE, "js": [], "disable_xml_declaration": True, "width": 900, "height": 420, "explicit_size": True,
    "legend_at_bottom": True, "legend_at_bottom_columns": 4, "no_data_text": "No data yet", "print_zeroes": False,
}


def _without_scripts(root: Any) -> Any:
    for parent in list(root.iter()):
        for child in list(parent):
            if isinstance(child.tag, str) and child.tag.rsplit("}", 1)[-1] == "script":
                parent.remove(child)
    return root


def _image(chart: pygal.graph.graph.Graph) -> str:
    chart.add_xml_filter(_without_scripts)
    svg = chart.render(is_unicode=True)
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def daily_chart(rep: Report, site: str) -> str:
    """A stacked bar per day: the site's cases that ended that day, by how they ended."""
    days = rep.site_days(site)
    top = max(sum(t.counts[column] for column, _ in ENDINGS) for t in days)
    step = max(1, math.ceil(top / 8))
    chart = pygal.StackedBar(title=f"{site}: cases ended per day (UTC)", x_label_rotation=-45, y_title="cases",
                             show_minor_x_labels=False, x_labels_major=[day[5:] for day in rep.days[::-5]],
                             y_labels=list(range(0, top + step, step)), **OPTIONS)  # whole cases only
    chart.x_labels = [day[5:] for day in rep.days]  # every fifth day named, counting back from today
    for column, label in ENDINGS:
        chart.add(label, [t.counts[column] for t in days])
    return _image(chart)


def answer_chart(rep: Report) -> str:
    """Per site, the share of its answers delivered within 1 h, 4 h and 24 h over the whole period."""
    chart = pygal.Bar(title=f"Answers delivered within 1 h, 4 h, 24 h (last {len(rep.days)} days)",
                      range=(0, 100), y_title="% of answers", **OPTIONS)
    chart.x_labels = rep.sites
    totals = [rep.total(site) for site in rep.sites]
    for seconds, name in WITHIN:
        chart.add(f"within {name.replace('h', ' h')}", [_percent(t.within(seconds)) for t in totals])
    return _image(chart)


def _percent(share: float | None) -> float | None:
    return None if share is None else round(share * 100, 1)


def duration(seconds: float | None) -> str:
    """A median for people: "42 min", "3 h 20 min", "2 d 4 h"; "–" without answers."""
    if seconds is None:
        return "–"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days} d" + (f" {hours} h" if hours else "")


def _answers(tally: Tally) -> dict[str, str]:
    return {"median": duration(tally.median),
            **{name: "–" if (share := _percent(tally.within(seconds))) is None else f"{share:g} %"
               for seconds, name in WITHIN}}


def page(rep: Report, texts: Texts, nonce: str) -> str:
    """The whole /stats page, in the contact form's look (templates/web/en/stats.html)."""
    sites = [{"id": site, "chart": daily_chart(rep, site),
              "days": [{"day": t.day, "counts": t.counts, **_answers(t)} for t in reversed(rep.site_days(site))],
              "total": {"counts": rep.total(site).counts, **_answers(rep.total(site))}}
             for site in rep.sites]
    return texts.page("", "stats", site={"name": "careservice"}, nonce=nonce, sites=sites,
                      answer_chart=answer_chart(rep), answers=[{"site": site, **_answers(rep.total(site))}
                                                               for site in rep.sites],
                      columns=TABLE_COLUMNS, within=[name for _, name in WITHIN], first_day=rep.days[0],
                      last_day=rep.days[-1], made=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
