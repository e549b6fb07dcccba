"""Who works a case: the [[sites.routes]] entry that takes a new case, its owner by round robin, and the
staff lists every stage uses (forwards, notes, reminders, "#assign", verification, the digest)."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from careservice.config import Site
from careservice.context import Inputs
from careservice.model import Case, Source, Turn
from careservice.settings import Route

# The text a subject pattern sees is cut to this length: RE2 (careservice.configroutes) matches in linear
# time, so the cut bounds each match to microseconds, whatever a hostile sender writes.
MATCH_CHARS = 4000


class Routed(Protocol):
    """A case as these functions need it: a stored Case, or a digest's OpenCase."""

    @property
    def route(self) -> str: ...

    @property
    def owner(self) -> str: ...


def route_new_case(inp: Inputs) -> tuple[Case, Turn | None]:
    """The new case with its route and, under round robin, its owner: the route's staff member whose
    turn it is, which moves the route's counter on (the Turn, applied with the forward)."""
    site = inp.site
    route = _first_match(site, inp)
    case = replace(inp.case, route=route.id if route else "")
    if (route.assign if route else site.assign) != "round_robin":
        return case, None
    staff, seen = case_staff(site, case), inp.turns.get(case.route, 0)
    return replace(case, owner=staff[seen % len(staff)]), Turn(case.route, seen)


def case_staff(site: Site, case: Routed) -> tuple[str, ...]:
    """The staff of this case, who get its mail: its route's, or the site's own when no route took it (or
    its route is no longer configured)."""
    route = site.route(case.route)
    return route.staff if route else site.staff


def answerers(site: Site, case: Routed) -> tuple[str, ...]:
    """Who may answer the case, or be assigned it: its staff, and the site's own staff, who stand in for
    every route of their site."""
    return tuple(dict.fromkeys((*case_staff(site, case), *site.staff)))


def forward_to(site: Site, case: Routed) -> tuple[str, ...]:
    """Who gets what the case's worker should read (forwards, follow-ups, reminders): its owner, while the
    owner may answer it, else its staff."""
    return (case.owner,) if case.owner in answerers(site, case) else case_staff(site, case)


def _first_match(site: Site, inp: Inputs) -> Route | None:
    """The first route whose keys all match: the address the mail came to, and the subject (a form post's
    query text, since its subject is our own)."""
    message, parsed = inp.case.message, inp.parsed
    # the envelope recipient: the SMTP RCPT, or the one a mailbox's provider recorded (intake.headers);
    # the form posts to the care address itself
    came_to = set() if message.source is Source.WEB else {message.envelope.rcpt.lower()}
    text = (parsed.text if message.source is Source.WEB else parsed.subject)[:MATCH_CHARS]
    for route in site.routes:
        if route.match_recipient and route.match_recipient not in came_to:
            continue
        if route.match_subject is not None and route.match_subject.search(text) is None:
            continue
        return route
    return None
