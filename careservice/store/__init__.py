"""The durable case store: the only package that speaks SQL.

Two backends behind one facade: SQLite files in data_dir (the default, one node), and PostgreSQL
for several nodes (`pg/`: the same SQL over a cases and a keys database, plus claims and leases).
SQLite in WAL mode with secure_delete=ON. The intake's store is `durable` (both WALs synced after
each group commit, outside the write lock: a commit is on disk before the 250). The worker's is not
(NORMAL: its transitions may roll back on power loss, which only repeats a send - delivery is
at-least-once); a purge is still on disk at once, since the WAL checkpoint that follows it syncs
the database. Every personal byte is sealed with AES-256-GCM under a per-case data key; the
wrapped keys live in a separate database file (keys.db), so deleting a key makes every copy of its
case unreadable.

    facade    Store: the async operations the rest of the code calls
    executor  how calls become transactions: a writer thread (group commit) or the caller's thread
    schema    the tables, opening the files, their permissions, WAL truncation
    cases     inbound items and cases: commit, load, apply a stage's outcome, hold
    mailq     the outbox queue: queue, due mail, delivered / deferred / failed
    keys      case keys (bound to their case) and the digest secret of the day
    rota      round robin turns per site and route, the day of each site's last digest
    tallies   per-site daily statistics, acknowledgement counts, status counts, mailbox health
    purge     deleting for good: cases with their keys, crash orphans, the hard age limit
    shards    which worker process takes which case and mail (service.workers)
    pg/       the PostgreSQL backend (see its package text)
"""

from careservice.model import NewMessage, QueuedMail
from careservice.store.facade import Store
from careservice.store.schema import INBOUND_STATES, OPEN_STATES, StoreError, make_private
from careservice.store.tallies import read_status

__all__ = ["INBOUND_STATES", "OPEN_STATES", "NewMessage", "QueuedMail", "Store", "StoreError", "make_private",
           "read_status"]
