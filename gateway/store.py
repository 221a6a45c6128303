"""The gateway's durable state: API keys, functions and versions, call records, logs — in SQLite (one WAL file,
the embedded default) or PostgreSQL (shared by several gateways), through `db.Database`; the schema is
versioned (`STORE_MIGRATIONS`, applied at start-up).

Control-plane writes commit at once. Call records and logs are written in small batches by a background flusher
so the call path never waits for a disk sync; async call results are durable within one flush interval.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon_faas.errors import ConflictError, NotFoundError, PermissionDeniedError

from .db import Database, IntegrityError, open_database
from .migrations import Migration, migrate

STORE_MIGRATIONS = [
    Migration(1, "developers, keys, functions, versions, call records, logs", """
CREATE TABLE IF NOT EXISTS developers (id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    hash TEXT PRIMARY KEY, developer_id TEXT NOT NULL REFERENCES developers(id), name TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, current_version INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, spec TEXT NOT NULL, signature TEXT NOT NULL, code BLOB NOT NULL,
    measurement TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY, function TEXT NOT NULL, version INTEGER, status TEXT NOT NULL, created REAL NOT NULL,
    finished REAL, duration_ms REAL, error TEXT, result BLOB, caller TEXT);
CREATE TABLE IF NOT EXISTS call_log (
    id TEXT NOT NULL, function TEXT NOT NULL, version INTEGER, status TEXT NOT NULL, created REAL NOT NULL,
    finished REAL, duration_ms REAL, error TEXT, caller TEXT);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, function TEXT NOT NULL, version INTEGER, call_id TEXT, ts REAL NOT NULL,
    stream TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS logs_by_function ON logs (function, id)
"""),
    # several gateways: an async call belongs to the gateway running it (others fail it only when that gateway
    # is gone) and may be cancelled from any gateway (the owner polls for the request)
    Migration(2, "calls: owning gateway, cancel requests", """
ALTER TABLE calls ADD COLUMN gateway TEXT;
ALTER TABLE calls ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0
"""),
    Migration(3, "provider wallets the operator approved or revoked (provider admission)", """
CREATE TABLE IF NOT EXISTS provider_wallets (wallet TEXT PRIMARY KEY, status TEXT NOT NULL, at REAL NOT NULL)
"""),
    # several gateways route to every replica, whichever gateway started it (gateway/fleet.py)
    Migration(4, "replica registry", """
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY, function TEXT NOT NULL, version INTEGER NOT NULL, host TEXT NOT NULL,
    port INTEGER NOT NULL, node TEXT NOT NULL, facts TEXT NOT NULL, gateway TEXT NOT NULL, updated REAL NOT NULL)
"""),
    # a call id the client chose is accepted once across all gateways (a resent call runs at most once)
    Migration(5, "client call ids", """
CREATE TABLE IF NOT EXISTS call_ids (id TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS call_ids_by_created ON call_ids (created)
"""),
]


def storable(text: str) -> str:
    """Text the database can hold: UTF-8 that cannot be encoded (a lone surrogate) is kept escaped, never refused
    (a log line is the function's output; losing the batch over it would lose every call record in it)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ck_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: int
    spec: dict[str, Any]
    signature: dict[str, Any]
    code: bytes
    measurement: str
    meta: dict[str, Any]
    created: float


@dataclass(frozen=True)
class ReplicaRow:
    """A ready replica as registered for every gateway: where its data path listens and its public facts."""

    id: str
    function: str
    version: int
    host: str
    port: int
    node: str
    facts: str  # JSON object of public facts (pid, attestation key id and document, ...)
    gateway: str  # the gateway that started it
    updated: float


class Store:
    """The gateway's records over a `Database` (SQLite file by default, PostgreSQL shared by several gateways).

    `gateway_id` names this gateway process: it owns the async calls it runs."""

    def __init__(self, db: Database | Path, gateway_id: str = "local") -> None:
        self.db: Database = open_database(db) if isinstance(db, Path) else db
        self.gateway_id = gateway_id
        migrate(self.db, "store", STORE_MIGRATIONS)
        self._pending_calls: list[tuple[Any, ...]] = []
        self._pending_log: list[tuple[Any, ...]] = []
        self._pending_logs: list[tuple[Any, ...]] = []
        self._flush_lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return getattr(self.db, "path", None)

    def close(self) -> None:
        self.flush()
        self.db.close()

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.query(sql, args)

    def _tx(self, stmts: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self.db.transaction() as tx:
            for sql, args in stmts:
                tx.execute(sql, args)

    # -- developers and keys -------------------------------------------------------------------------
    def create_key(self, name: str, *, for_developer: str | None = None) -> tuple[str, str]:
        """A new key for developer `name` (created if new); returns (key, developer_id)."""
        key = new_key()
        with self.db.transaction() as tx:
            row = tx.execute(f"SELECT id FROM developers WHERE name=?{self.db.for_update}", (name,)).fetchone()
            if row:
                dev = row[0]
                if for_developer is not None and dev != for_developer:
                    raise ConflictError(f"developer name {name!r} is taken by another developer; pick another --name")
            else:
                dev = "dev_" + secrets.token_hex(8)
                try:
                    tx.execute("INSERT INTO developers VALUES (?,?,?)", (dev, name, time.time()))
                except IntegrityError:  # another gateway created the same name a moment ago
                    raise ConflictError(f"developer {name!r} was just created on another gateway; retry") from None
            tx.execute("INSERT INTO api_keys VALUES (?,?,?,?)", (hash_key(key), dev, name, time.time()))
        return key, dev

    def keys(self) -> dict[str, str]:
        """key hash -> developer id"""
        return dict(self._q("SELECT hash, developer_id FROM api_keys"))  # type: ignore[arg-type]

    def key_developer(self, key_hash: str) -> str | None:
        """One key's developer (a key created on another gateway after this one loaded `keys()`)."""
        row = self._q("SELECT developer_id FROM api_keys WHERE hash=?", (key_hash,))
        return row[0][0] if row else None

    def developer_id(self, name: str) -> str | None:
        row = self._q("SELECT id FROM developers WHERE name=?", (name,))
        return row[0][0] if row else None

    def developer_name(self, dev: str) -> str:
        row = self._q("SELECT name FROM developers WHERE id=?", (dev,))
        return row[0][0] if row else dev

    # -- provider wallets (admission) -------------------------------------------------------------------
    def set_wallet_status(self, wallet: str, status: str) -> None:
        """Record the operator's decision on a provider wallet: ``approved`` or ``revoked``."""
        self._tx([("INSERT INTO provider_wallets VALUES (?,?,?) ON CONFLICT(wallet) DO UPDATE SET "
                   "status=excluded.status, at=excluded.at", (wallet, status, time.time()))])

    def wallet_status(self, wallet: str) -> str | None:
        row = self._q("SELECT status FROM provider_wallets WHERE wallet=?", (wallet,))
        return str(row[0][0]) if row else None

    def wallet_statuses(self) -> list[tuple[str, str, float]]:
        return [(str(w), str(s), float(t)) for w, s, t in self._q(
            "SELECT wallet, status, at FROM provider_wallets ORDER BY wallet")]

    # -- functions and versions -----------------------------------------------------------------------
    def add_version(self, name: str, owner: str, spec: dict[str, Any], signature: dict[str, Any], code: bytes,
                    measurement: str, meta: dict[str, Any]) -> int:
        """Store a new version (not yet current); returns its number."""
        for attempt in range(3):  # two gateways deploying the same new name race on the primary key: retry
            try:
                return self._add_version(name, owner, spec, signature, code, measurement, meta)
            except IntegrityError:
                if attempt == 2:
                    raise ConflictError(f"function {name!r} is being deployed on another gateway at the same "
                                        "time; retry the deploy") from None
        raise AssertionError("unreachable")

    def _add_version(self, name: str, owner: str, spec: dict[str, Any], signature: dict[str, Any], code: bytes,
                     measurement: str, meta: dict[str, Any]) -> int:
        with self.db.transaction() as tx:
            row = tx.execute(f"SELECT owner FROM functions WHERE name=?{self.db.for_update}", (name,)).fetchone()
            if row and row[0] != owner:
                raise PermissionDeniedError(
                    f"function {name!r} belongs to another developer; deploy it under another name"
                )
            if row is None:
                tx.execute("INSERT INTO functions VALUES (?,?,?,?)", (name, owner, 0, time.time()))
            v = tx.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name=?", (name,)).fetchone()[0]
            tx.execute(
                "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?)",
                (name, v, json.dumps(spec), json.dumps(signature), code, measurement, json.dumps(meta), time.time()),
            )
            return int(v)

    def set_current(self, name: str, version: int) -> None:
        self._tx([("UPDATE functions SET current_version=? WHERE name=?", (version, name))])

    def drop_version(self, name: str, version: int) -> None:
        """Forget a version that never became current (its replicas failed to start)."""
        self._tx([("DELETE FROM versions WHERE name=? AND version=?", (name, version)),
                  ("DELETE FROM functions WHERE name=? AND current_version=0", (name,))])

    def functions(self) -> list[tuple[str, str, int]]:
        return [(r[0], r[1], int(r[2])) for r in self._q(
            "SELECT name, owner, current_version FROM functions WHERE current_version > 0 ORDER BY name")]

    def owner(self, name: str) -> str | None:
        row = self._q("SELECT owner FROM functions WHERE name=?", (name,))
        return row[0][0] if row else None

    def version(self, name: str, version: int) -> VersionRow:
        row = self._q("SELECT name, version, spec, signature, code, measurement, meta, created FROM versions "
                      "WHERE name=? AND version=?", (name, version))
        if not row:
            raise NotFoundError(f"function {name!r} has no version {version}; see `cocoon ls` for versions")
        r = row[0]
        return VersionRow(r[0], int(r[1]), json.loads(r[2]), json.loads(r[3]), bytes(r[4]), r[5], json.loads(r[6]),
                          r[7])

    def versions(self, name: str) -> list[tuple[int, str, float]]:
        return [(int(r[0]), r[1], r[2]) for r in self._q(
            "SELECT version, measurement, created FROM versions WHERE name=? ORDER BY version", (name,))]

    def current_version(self, name: str) -> int | None:
        row = self._q("SELECT current_version FROM functions WHERE name=?", (name,))
        return int(row[0][0]) if row else None

    # -- replica registry (several gateways) ---------------------------------------------------------
    def put_replica(self, r: ReplicaRow) -> None:
        self.db.execute("INSERT INTO replicas VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
                        "host=excluded.host, port=excluded.port, facts=excluded.facts, updated=excluded.updated",
                        (r.id, r.function, r.version, r.host, r.port, r.node, r.facts, r.gateway, r.updated))

    def delete_replica(self, replica_id: str) -> None:
        self.db.execute("DELETE FROM replicas WHERE id=?", (replica_id,))

    def replicas(self) -> list[ReplicaRow]:
        return [ReplicaRow(r[0], r[1], int(r[2]), r[3], int(r[4]), r[5], r[6], r[7], r[8]) for r in self._q(
            "SELECT id, function, version, host, port, node, facts, gateway, updated FROM replicas ORDER BY id")]

    def delete_function(self, name: str) -> None:
        """Forget the function with everything it left: versions, logs and call records (the next developer who
        deploys the name must not read them)."""
        self.flush()
        self._tx([("DELETE FROM versions WHERE name=?", (name,)), ("DELETE FROM functions WHERE name=?", (name,)),
                  ("DELETE FROM logs WHERE function=?", (name,)), ("DELETE FROM calls WHERE function=?", (name,)),
                  ("DELETE FROM call_log WHERE function=?", (name,))])

    # -- calls and logs (batched) ---------------------------------------------------------------------
    def record_call(self, call_id: str, function: str, version: int | None, status: str, created: float,
                    finished: float | None, duration_ms: float | None, error: dict[str, Any] | None,
                    result: bytes | None, caller: str | None, *, durable: bool = False) -> None:
        """An async call's record (kept by id for polling). `durable` writes it at once (a new call: another
        gateway may be asked about it before the next flush)."""
        row = (call_id, function, version, status, created, finished, duration_ms,
               json.dumps(error) if error else None, result, caller, self.gateway_id)
        if durable:
            self.db.execute(_UPSERT_CALL, row)
        else:
            self._pending_calls.append(row)

    def log_call(self, call_id: str, function: str, version: int | None, status: str, created: float,
                 finished: float, duration_ms: float | None, error: dict[str, Any] | None, caller: str | None) -> None:
        """A synchronous call's record: append-only, no index (nobody looks one up by id; a random-key B-tree
        insert per call cost a fifth of the gateway's CPU per no-op call)."""
        self._pending_log.append((call_id, function, version, status, created, finished, duration_ms,
                                  json.dumps(error) if error else None, caller))

    def record_logs(self, function: str, version: int | None, call_id: str | None,
                    lines: list[tuple[str, str]] | list[list[str]]) -> None:
        now = time.time()
        for stream, text in lines:
            self._pending_logs.append((function, version, call_id, now, storable(stream), storable(text)))

    def flush(self) -> None:
        with self._flush_lock:  # the flusher thread and a reader's flush must not interleave batches
            calls, self._pending_calls = self._pending_calls, []
            logs, self._pending_logs = self._pending_logs, []
            done, self._pending_log = self._pending_log, []
            if not calls and not logs and not done:
                return
            with self.db.transaction() as tx:
                if done:
                    tx.executemany("INSERT INTO call_log VALUES (?,?,?,?,?,?,?,?,?)", done)
                if calls:
                    tx.executemany(_UPSERT_CALL, calls)
                if logs:
                    tx.executemany(
                        "INSERT INTO logs (function, version, call_id, ts, stream, text) VALUES (?,?,?,?,?,?)", logs)

    def get_call(self, call_id: str) -> dict[str, Any] | None:
        self.flush()
        row = self._q("SELECT id, function, version, status, created, finished, duration_ms, error, result, "
                      "gateway, cancel_requested FROM calls WHERE id=?", (call_id,))
        if not row:
            return None
        r = row[0]
        return {"id": r[0], "function": r[1], "version": r[2], "status": r[3], "created": r[4], "finished": r[5],
                "duration_ms": r[6], "error": json.loads(r[7]) if r[7] else None,
                "result": bytes(r[8]) if r[8] is not None else None, "gateway": r[9],
                "cancel_requested": bool(r[10])}

    def claim_call_id(self, call_id: str) -> None:
        """Record a client-chosen call id; ConflictError when any gateway has seen it before."""
        try:
            self.db.execute("INSERT INTO call_ids VALUES (?,?)", (call_id, time.time()))
        except IntegrityError:
            raise ConflictError(f"call id {call_id!r} was already received (on this or another gateway): the call "
                                "was started once and is not run again; use a fresh id for a new call") from None

    def prune_call_ids(self, older_than: float) -> int:
        return self.db.execute("DELETE FROM call_ids WHERE created < ?", (older_than,))

    def request_cancel(self, call_id: str) -> bool:
        """Ask the gateway running an unfinished async call to cancel it; False when it is not unfinished."""
        return self.db.execute("UPDATE calls SET cancel_requested=1 WHERE id=? AND status IN ('queued','running')",
                               (call_id,)) > 0

    def cancel_requests(self, call_ids: list[str]) -> list[str]:
        """Of this gateway's unfinished calls, those another gateway was asked to cancel."""
        if not call_ids:
            return []
        marks = ",".join("?" * len(call_ids))
        return [r[0] for r in self._q(f"SELECT id FROM calls WHERE cancel_requested=1 AND id IN ({marks})",
                                      tuple(call_ids))]

    def call_counts(self) -> dict[str, tuple[int, int]]:
        """function -> (calls, errors) over all recorded calls."""
        failed = "SUM(CASE WHEN status='failed' THEN 1 ELSE 0 END)"
        rows = self._q("SELECT function, SUM(n), SUM(e) FROM ("
                       f"SELECT function, COUNT(*) AS n, {failed} AS e FROM calls GROUP BY function "
                       f"UNION ALL SELECT function, COUNT(*), {failed} FROM call_log GROUP BY function) AS u "
                       "GROUP BY function")
        return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}

    def mark_unfinished_failed(self, alive: Collection[str] = ()) -> int:
        """Calls that were queued/running on a gateway that died can never finish: fail them (at start-up and
        whenever a gateway's lease expires). Calls of gateways in `alive` (this one included) are left alone."""
        err = json.dumps({"type": "replica_lost", "message": "the gateway running the call stopped"})
        keep = [g for g in alive if g != ""]
        marks = ",".join("?" * len(keep))
        sql = "UPDATE calls SET status='failed', error=?, finished=? WHERE status IN ('queued','running')"
        if keep:
            sql += f" AND (gateway IS NULL OR gateway NOT IN ({marks}))"
        return self.db.execute(sql, (err, time.time(), *keep))

    def logs(self, function: str, limit: int) -> list[dict[str, Any]]:
        self.flush()
        rows = self._q("SELECT ts, version, call_id, stream, text FROM logs WHERE function=? ORDER BY id DESC LIMIT ?",
                       (function, limit))
        return [{"ts": r[0], "version": r[1], "call_id": r[2], "stream": r[3], "text": r[4]} for r in rows]

    def expire_results(self, older_than: float) -> None:
        self.db.execute("UPDATE calls SET result=NULL WHERE finished < ? AND result IS NOT NULL", (older_than,))

    def apply_retention(self, calls_before: float, logs_before: float, max_log_rows: int) -> None:
        """Drop call records and logs past their retention, and each function's log lines beyond the newest
        ``max_log_rows`` (COCOON_CALL_RETENTION_S, COCOON_LOG_RETENTION_S, COCOON_MAX_LOG_ROWS_PER_FUNCTION)."""
        self._tx([("DELETE FROM calls WHERE finished IS NOT NULL AND finished < ?", (calls_before,)),
                  ("DELETE FROM call_log WHERE finished < ?", (calls_before,)),
                  ("DELETE FROM logs WHERE ts < ?", (logs_before,))])
        for function, n in self._q("SELECT function, COUNT(*) FROM logs GROUP BY function"):
            if int(n) > max_log_rows:
                self._tx([("DELETE FROM logs WHERE function=? AND id <= (SELECT id FROM logs WHERE function=? "
                           "ORDER BY id DESC LIMIT 1 OFFSET ?)", (function, function, max_log_rows))])

    def prune_versions(self, name: str, keep: int, current: int) -> int:
        """Keep the newest ``keep`` versions of ``name`` (and always the current one); returns how many went."""
        old = [v for v, _, _ in self.versions(name)][:-keep] if keep > 0 else []
        drop = [v for v in old if v != current]
        if drop:
            self._tx([("DELETE FROM versions WHERE name=? AND version=?", (name, v)) for v in drop])
        return len(drop)


_UPSERT_CALL = (
    "INSERT INTO calls (id, function, version, status, created, finished, duration_ms, error, result, caller, "
    "gateway) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET function=excluded.function, "
    "version=excluded.version, status=excluded.status, created=excluded.created, finished=excluded.finished, "
    "duration_ms=excluded.duration_ms, error=excluded.error, result=excluded.result, caller=excluded.caller, "
    "gateway=excluded.gateway")
