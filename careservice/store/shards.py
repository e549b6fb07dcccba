"""Which worker process takes which case (SQLite, `service.workers` > 1): by its id's last hex digit.

Case ids (and the ids digests are filed under) are random hex, so the digit spreads them evenly over
up to 16 workers; a case's queued mail goes with it (its case_id). PostgreSQL needs none of this: its
claims keep every worker, of every node, to rows of its own.
"""

from __future__ import annotations

ONE = (0, 1)  # (index, of): the only worker


def clause(column: str, shard: tuple[int, int]) -> str:
    """" AND ..." keeping the rows whose `column` (a case id) falls in worker `index` of `of`; "" for
    one worker, whose queries stay exactly as they were."""
    index, of = int(shard[0]), int(shard[1])
    if of == 1:
        return ""
    # a character that is no hex digit counts as 15: every id falls in exactly one shard
    return f" AND (instr('0123456789abcdef', substr({column}, -1)) + 15) % 16 % {of} = {index}"
