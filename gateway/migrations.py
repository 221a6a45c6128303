"""Versioned schema migrations, applied at start-up on both backends.

Each component (the store, the ledger) owns an ordered list of `Migration`s; the database remembers the last one
applied per component in ``cocoon_schema``. To change a schema, append a migration (never edit an applied one):

    STORE_MIGRATIONS = [..., Migration(4, "calls: retention index", "CREATE INDEX calls_by_finished ON calls (finished)")]

Several gateways may start at once: on PostgreSQL a transaction-scoped advisory lock serializes them, on SQLite
``BEGIN IMMEDIATE`` does. A database migrated by a newer gateway is refused (its schema may mean things this
code does not know), naming the fix.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .db import Database, DatabaseError, Tx

SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS cocoon_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                "applied REAL NOT NULL)")


@dataclass(frozen=True)
class Migration:
    """One step: portable DDL (statements separated by ';', see db.py for the types) and/or a data step."""

    version: int
    description: str
    sql: str = ""
    step: Callable[[Tx, Database], None] | None = None


class SchemaTooNewError(DatabaseError):
    pass


def _check(component: str, migrations: Sequence[Migration]) -> None:
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"{component} migrations must be numbered 1, 2, 3…; #{i} says {m.version}")


def schema_version(db: Database, component: str) -> int:
    db.execute(SCHEMA_TABLE)
    rows = db.query("SELECT version FROM cocoon_schema WHERE component=?", (component,))
    return int(rows[0][0]) if rows else 0


def migrate(db: Database, component: str, migrations: Sequence[Migration]) -> int:
    """Bring `component`'s schema up to the last migration; returns how many were applied."""
    _check(component, migrations)
    latest = len(migrations)
    with db.transaction() as tx:
        if db.dialect == "postgresql":  # concurrent CREATE TABLE IF NOT EXISTS races in PostgreSQL
            tx.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(b"cocoon_schema"),))
        tx.execute(SCHEMA_TABLE)
        row = tx.execute("SELECT version FROM cocoon_schema WHERE component=?", (component,)).fetchone()
        have = int(row[0]) if row else 0
        if have > latest:
            raise SchemaTooNewError(
                f"the {component} schema in {db.describe()} is version {have}, newer than this gateway knows "
                f"({latest}): a newer cocoon migrated it. Upgrade this gateway to the release the other gateways "
                "run (pip install -U cocoon-faas), or point COCOON_DATABASE_URL at another database")
        for m in migrations[have:]:
            for stmt in m.sql.split(";"):
                if stmt.strip():
                    tx.execute(db.ddl(stmt))
            if m.step is not None:
                m.step(tx, db)
        if latest > have:
            tx.execute("INSERT INTO cocoon_schema VALUES (?,?,?) ON CONFLICT (component) DO UPDATE SET "
                       "version=excluded.version, applied=excluded.applied", (component, latest, time.time()))
    return latest - have
