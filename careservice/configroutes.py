"""Reading who gets a site's cases: staff addresses, `[[sites.routes]]` with their match keys, and the
`[digest]` time. Every error names its key, like the rest of careservice.config."""

from __future__ import annotations

import hashlib
import re
from datetime import time

import re2
from email_validator import EmailNotValidError, validate_email

from careservice.configtable import Table
from careservice.settings import ASSIGN_MODES, ConfigError, Pattern, Route, Site

_CLOCK_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def address(key: str, value: str) -> str:
    try:
        return validate_email(value, check_deliverability=False, test_environment=True).normalized.lower()
    except EmailNotValidError as exc:
        raise ConfigError(key, f'not a valid address "{value}" ({exc})') from None


def staff(t: Table) -> tuple[str, ...]:
    """The table's `staff`: at least one address."""
    listed = t.get("staff", list)
    if not listed:
        raise ConfigError(t.key("staff"), "needs at least one address")
    return tuple(address(f"{t.key('staff')}[{i}]", str(a)) for i, a in enumerate(listed))


def assign(t: Table, default: str) -> str:
    chosen = t.get("assign", str, default)
    if chosen not in ASSIGN_MODES:
        raise ConfigError(t.key("assign"), f'expected one of {", ".join(ASSIGN_MODES)}, got "{chosen}"')
    return chosen


def routes(site: Table, site_assign: str) -> tuple[Route, ...]:
    """A site's `[[sites.routes]]`, in order. Each needs a match key; one that matches exactly as an earlier
    one does could never be used. A route's `assign` defaults to the site's."""
    found: list[Route] = []
    for t in site.array("routes"):
        recipient = t.get("match_recipient", str, "")
        if recipient:
            recipient = address(t.key("match_recipient"), recipient)
            if "+" in recipient.rpartition("@")[0]:
                raise ConfigError(t.key("match_recipient"), 'must not contain "+" (used for reply addresses)')
        subject = t.get("match_subject", str, "")
        members, mode = staff(t), assign(t, site_assign)
        t.refuse_unknown()  # a misspelt match key is named as such, not as a route without one
        if not recipient and not subject:
            raise ConfigError(t.prefix, "needs match_recipient or match_subject (mail that no route takes goes to "
                                        "the site's own staff)")
        # derived from the match keys, so a reload that reorders the routes or changes their staff keeps
        # each open case on its route and each round robin's turn
        route_id = hashlib.sha256(f"{recipient}\0{subject}".encode()).hexdigest()[:12]
        earlier = next((i for i, r in enumerate(found) if r.id == route_id), None)
        if earlier is not None:
            raise ConfigError(t.prefix, f"matches as {site.key('routes')}[{earlier}] does, so it would never be used")
        found.append(Route(route_id, recipient, pattern(t.key("match_subject"), subject) if subject else None,
                           members, mode))
    return tuple(found)


def pattern(key: str, text: str) -> Pattern:
    """A subject pattern, compiled by RE2 (google-re2). RE2 matches in time linear in the subject whatever
    the pattern, so a hostile subject cannot hang the worker; Python's re backtracks ("(a+)+$" against a
    long run of "a"s runs for ages) and has no timeout, and a timeout would make routing depend on the
    machine's load. The price is RE2's syntax, which lacks backreferences and lookaround: such a pattern is
    refused here. The text matched is cut to careservice.routing.MATCH_CHARS first."""
    options = re2.Options()
    options.log_errors = False  # the error is raised, named with its key, instead of printed to stderr
    try:
        return re2.compile(text, options)  # type: ignore[no-any-return]
    except re2.error as exc:
        problem = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(key, f"not a pattern RE2 can run ({problem}); write it as for Python's re, without "
                               'backreferences or lookaround, e.g. "(?i)refund|cancel"') from None


def extra_addresses(sites: tuple[Site, ...]) -> None:
    """A route's match_recipient is a care address of its site (the SMTP listener takes mail for it): it
    must not be another site's care address or route address."""
    owner = {s.care_address: (s.id, f"sites[{i}].care_address") for i, s in enumerate(sites)}
    for i, site in enumerate(sites):
        for j, route in enumerate(site.routes):
            if not route.match_recipient:
                continue
            key = f"sites[{i}].routes[{j}].match_recipient"
            site_id, where = owner.setdefault(route.match_recipient, (site.id, key))
            if site_id != site.id:
                raise ConfigError(key, f'"{route.match_recipient}" is also {where}; an address belongs to one '
                                       "site only")


def clock_time(table: Table, name: str) -> time | None:
    """A local time of day such as "08:00"; None when the key is absent."""
    if name not in table.data:
        return None
    value = table.get(name, str)
    found = _CLOCK_TIME.fullmatch(value)
    if found is None:
        raise ConfigError(table.key(name), f'expected a local time such as "08:00" (24-hour HH:MM), got "{value}"')
    return time(int(found.group(1)), int(found.group(2)))
