"""PostgreSQL: the store for more than one node (`[store] url = "postgresql://…"`).

The case data and the case keys live in two databases reached as two roles (`url`, `keys_url`): a
deleted row stays in PostgreSQL's dead tuples, WAL, base backups and replicas, so the purge that
counts is the key's, and the keys database is the one whose copies must be short-lived. The SQL of
careservice.store runs here as it is through `tx.PgTx` (the `k.` tables go to the keys database);
what differs is here:

    schema    the versioned migrations of both databases (`careservice migrate`) and the version check
    tx        one transaction over the two databases: keys commit first, then cases
    executor  a thread with the two connection pools, group commit, and LISTEN/NOTIFY wake-ups
    claims    due cases and due mail claimed with FOR UPDATE SKIP LOCKED and a lease; mailbox leases;
              the orphan sweep across the two databases; the cluster's status counts
"""
