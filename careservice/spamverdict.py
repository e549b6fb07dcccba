"""The spam verdict as the service writes it into each customer message it commits, and reads it back.

The intake prepends one header line, `X-Careservice-Spam: <state>[; spf=<result>; dmarc=<result>]`,
to the raw message before the commit, after removing every header of that name the sender wrote, so
the stages can trust the first line of a stored message. States:

  ham        rspamd found nothing to act on
  suspect    rspamd's action was "add header" or "rewrite subject" (and a greylisted form post,
             which cannot be told to come back later as a mail server can)
  unchecked  rspamd could not be asked (down, timed out, an error): the sender is unknown

spf and dmarc come from rspamd's symbols: pass, fail, softfail, neutral, none, temperror, permerror,
or unknown when rspamd reported neither (it skipped the check). A message without the header was
not checked by design: spam checking is off, or it went to a signed reply address only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from careservice.mimeparse import HEADER_END

HEADER = "X-Careservice-Spam"
RESULTS = ("reject", "suspect", "greylist", "ham", "unavailable")  # what a check can give (the metric's labels)
STATES = {"ham": "ham", "suspect": "suspect", "greylist": "suspect", "unavailable": "unchecked"}
_OURS = re.compile(HEADER.encode() + rb": ([a-z]+)(?:; spf=([a-z]+); dmarc=([a-z]+))?\r?\n")
_SENDERS = re.compile(rb"^" + HEADER.encode() + rb"[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SpamVerdict:
    """One check's outcome: `result` is one of RESULTS, or "skipped" when no check was made."""

    result: str
    spf: str = "unknown"
    dmarc: str = "unknown"

    @property
    def state(self) -> str:
        """The header's state ("" = no header: not checked by design, or a verdict that is never stored)."""
        return STATES.get(self.result, "")


SKIPPED = SpamVerdict("skipped")


def stamp(raw: bytes, verdict: SpamVerdict) -> bytes:
    """`raw` without any X-Careservice-Spam header of the sender's, with ours first when `verdict` has a state."""
    end = HEADER_END.search(raw)
    head_end = end.end(1) if end else len(raw)
    if _SENDERS.search(raw, 0, head_end):
        raw = _without_ours(raw[:head_end]) + raw[head_end:]
    state = verdict.state
    if not state:
        return raw
    first = raw.find(b"\n")
    newline = b"\r\n" if first > 0 and raw[first - 1:first] == b"\r" else b"\n"
    line = state if state == "unchecked" else f"{state}; spf={verdict.spf}; dmarc={verdict.dmarc}"
    return f"{HEADER}: {line}".encode() + newline + raw


def _without_ours(head: bytes) -> bytes:
    """The header block less every X-Careservice-Spam field, with its folded continuation lines."""
    kept = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):  # a new field; a continuation line goes with the one before
            dropping = line.split(b":", 1)[0].strip().lower() == HEADER.lower().encode()
        if not dropping:
            kept.append(line)
    return b"".join(kept)


def read(raw: bytes) -> SpamVerdict | None:
    """The verdict the intake wrote into a stored message; None when it wrote none."""
    match = _OURS.match(raw)
    if match is None:
        return None
    state, spf, dmarc = (group.decode() if group else "unknown" for group in match.groups())
    result = {"unchecked": "unavailable"}.get(state, state)
    return SpamVerdict(result, spf, dmarc)
