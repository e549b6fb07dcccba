"""The two databases' tables as numbered migrations, applied by `careservice migrate` (idempotent: each
database records its version in schema_version, and a migration runs once, under an advisory lock).

The cases database holds the sealed case data, the queue, the counters and the de-duplication
digests (these commit with their case: the keys database commits first, so a digest there could
outlive a case that failed to commit). The keys database holds the wrapped case keys, the day's
digest secret and the "#spam" blocks.
"""

from __future__ import annotations

import psycopg

from careservice.store.schema import StoreError

MIGRATE_LOCK = 0x63617265  # pg_advisory_xact_lock: concurrent `careservice migrate` runs queue up

CASES = (
    """
    CREATE TABLE cases(
        id text PRIMARY KEY, site text NOT NULL, state text NOT NULL, source text NOT NULL,
        created double precision NOT NULL, next_run double precision NOT NULL, nonce text NOT NULL,
        target text NOT NULL, meta bytea NOT NULL, raw bytea NOT NULL, failures integer NOT NULL DEFAULT 0,
        claimed_by text NOT NULL DEFAULT '', lease_until double precision NOT NULL DEFAULT 0);
    CREATE INDEX cases_due ON cases(state, next_run);
    CREATE INDEX cases_created ON cases(created);
    CREATE TABLE outbox(
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, case_id text NOT NULL, site text NOT NULL,
        kind text NOT NULL, created double precision NOT NULL, next_attempt double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0, meta bytea NOT NULL, message bytea NOT NULL,
        claimed_by text NOT NULL DEFAULT '', lease_until double precision NOT NULL DEFAULT 0);
    CREATE INDEX outbox_due ON outbox(next_attempt);
    CREATE INDEX outbox_case ON outbox(case_id);
    CREATE TABLE stats(site text NOT NULL, day text NOT NULL, name text NOT NULL, value bigint NOT NULL,
        PRIMARY KEY(site, day, name));
    CREATE TABLE ack_rate(digest bytea NOT NULL, hour bigint NOT NULL, n integer NOT NULL,
        PRIMARY KEY(digest, hour));
    CREATE INDEX ack_rate_hour ON ack_rate(hour);
    CREATE TABLE seen(digest bytea PRIMARY KEY, expires double precision NOT NULL);
    CREATE TABLE mailbox_health(name text PRIMARY KEY, ok integer NOT NULL, problem text NOT NULL,
        since double precision NOT NULL, failures integer NOT NULL);
    CREATE TABLE leases(name text PRIMARY KEY, holder text NOT NULL, until double precision NOT NULL);
    -- A claim lasts until the case or mail moves on: any change of its state or schedule ends it, so
    -- the shared SQL that applies an outcome needs to know nothing of claims.
    CREATE FUNCTION end_claim() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.claimed_by := ''; NEW.lease_until := 0; RETURN NEW; END $$;
    CREATE TRIGGER cases_claim_ends BEFORE UPDATE OF state, next_run ON cases
        FOR EACH ROW EXECUTE FUNCTION end_claim();
    CREATE TRIGGER outbox_claim_ends BEFORE UPDATE OF next_attempt ON outbox
        FOR EACH ROW EXECUTE FUNCTION end_claim();
    """,
    """
    CREATE TABLE route_turns(site text NOT NULL, route text NOT NULL, turn bigint NOT NULL, PRIMARY KEY(site, route));
    CREATE TABLE digest_days(site text PRIMARY KEY, day text NOT NULL);
    """,
    """
    DROP INDEX cases_due;
    CREATE INDEX cases_by_state ON cases(state, next_run, site);
    CREATE INDEX cases_stuck ON cases(failures) WHERE failures > 0;
    """,
)

KEYS = (
    """
    CREATE TABLE keys(id text PRIMARY KEY, wrapped bytea NOT NULL,
        created double precision NOT NULL DEFAULT extract(epoch FROM now()));
    CREATE TABLE blocks(digest bytea PRIMARY KEY, expires double precision NOT NULL);
    CREATE TABLE daily(day bigint PRIMARY KEY, wrapped bytea NOT NULL);
    """,
)


def migrate(url: str, migrations: tuple[str, ...]) -> tuple[int, int]:
    """Bring one database to the newest version; (version before, version after)."""
    try:
        return _migrate(url, migrations)
    except psycopg.Error as exc:
        raise StoreError(f"store: PostgreSQL: {type(exc).__name__}: {exc}".strip()) from None


def _migrate(url: str, migrations: tuple[str, ...]) -> tuple[int, int]:
    with psycopg.connect(url, connect_timeout=10) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version(version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        before = row[0] if row and row[0] is not None else 0
        for version, sql in enumerate(migrations[before:], start=before + 1):
            conn.execute(sql)
            conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        return before, len(migrations)


def check_version(conn: psycopg.Connection, migrations: tuple[str, ...], key: str) -> None:
    """Refuse a database `careservice migrate` has not brought to this version's schema."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    found = row[0] if row and row[0] is not None else 0
    if found != len(migrations):
        raise StoreError(f"store.{key}: schema version {found}, this careservice needs {len(migrations)}; "
                         "run `careservice migrate --config …`")
