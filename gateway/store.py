"""The gateway's durable state: API keys, functions and versions, call records, logs (SQLite, WAL).

Control-plane writes commit at once. Call records and logs are written in small batches by a background flusher
so the call path never waits for a disk sync; async call results are durable within one flush interval.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon_faas.errors import ConflictError, NotFoundError

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS logs_by_function ON logs (function, id);
"""


def storable(text: str) -> str:
    """Text SQLite can hold: UTF-8 that cannot be encoded (a lone surrogate) is kept escaped, never refused
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


class Store:
    """SQLite-backed state; one connection guarded by a lock (the gateway is one process)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._pending_calls: list[tuple[Any, ...]] = []
        self._pending_log: list[tuple[Any, ...]] = []
        self._pending_logs: list[tuple[Any, ...]] = []

    def close(self) -> None:
        self.flush()
        self._db.close()

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tx(self, stmts: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in stmts:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """End a failed transaction whatever failed (a rollback that itself fails must not hide the cause):
        a connection left inside a transaction would refuse every later write until restart."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    # -- developers and keys -------------------------------------------------------------------------
    def create_key(self, name: str, *, for_developer: str | None = None) -> tuple[str, str]:
        """A new key for developer `name` (created if new); returns (key, developer_id)."""
        row = self._q("SELECT id FROM developers WHERE name=?", (name,))
        if row:
            dev = row[0][0]
            if for_developer is not None and dev != for_developer:
                raise ConflictError(f"developer name {name!r} is taken by another developer; pick another --name")
        else:
            dev = "dev_" + secrets.token_hex(8)
        key = new_key()
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        if not row:
            stmts.append(("INSERT INTO developers VALUES (?,?,?)", (dev, name, time.time())))
        stmts.append(("INSERT INTO api_keys VALUES (?,?,?,?)", (hash_key(key), dev, name, time.time())))
        self._tx(stmts)
        return key, dev

    def keys(self) -> dict[str, str]:
        """key hash -> developer id"""
        return dict(self._q("SELECT hash, developer_id FROM api_keys"))

    def developer_id(self, name: str) -> str | None:
        row = self._q("SELECT id FROM developers WHERE name=?", (name,))
        return row[0][0] if row else None

    def developer_name(self, dev: str) -> str:
        row = self._q("SELECT name FROM developers WHERE id=?", (dev,))
        return row[0][0] if row else dev

    # -- functions and versions -----------------------------------------------------------------------
    def add_version(self, name: str, owner: str, spec: dict[str, Any], signature: dict[str, Any], code: bytes,
                    measurement: str, meta: dict[str, Any]) -> int:
        """Store a new version (not yet current); returns its number."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT owner FROM functions WHERE name=?", (name,)).fetchone()
                if row and row[0] != owner:
                    from cocoon_faas.errors import PermissionDeniedError

                    raise PermissionDeniedError(
                        f"function {name!r} belongs to another developer; deploy it under another name"
                    )
                v = self._db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name=?",
                                     (name,)).fetchone()[0]
                self._db.execute(
                    "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?)",
                    (name, v, json.dumps(spec), json.dumps(signature), code, measurement, json.dumps(meta), time.time()),
                )
                if row is None:
                    self._db.execute("INSERT INTO functions VALUES (?,?,?,?)", (name, owner, 0, time.time()))
                self._db.execute("COMMIT")
                return int(v)
            except BaseException:
                self._rollback()
                raise

    def set_current(self, name: str, version: int) -> None:
        self._tx([("UPDATE functions SET current_version=? WHERE name=?", (version, name))])

    def drop_version(self, name: str, version: int) -> None:
        """Forget a version that never became current (its replicas failed to start)."""
        self._tx([("DELETE FROM versions WHERE name=? AND version=?", (name, version)),
                  ("DELETE FROM functions WHERE name=? AND current_version=0", (name,))])

    def functions(self) -> list[tuple[str, str, int]]:
        return [tuple(r) for r in self._q(  # type: ignore[misc]
            "SELECT name, owner, current_version FROM functions WHERE current_version > 0 ORDER BY name")]

    def owner(self, name: str) -> str | None:
        row = self._q("SELECT owner FROM functions WHERE name=?", (name,))
        return row[0][0] if row else None

    def version(self, name: str, version: int) -> VersionRow:
        row = self._q("SELECT * FROM versions WHERE name=? AND version=?", (name, version))
        if not row:
            raise NotFoundError(f"function {name!r} has no version {version}; see `cocoon ls` for versions")
        r = row[0]
        return VersionRow(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4], r[5], json.loads(r[6]), r[7])

    def versions(self, name: str) -> list[tuple[int, str, float]]:
        return [tuple(r) for r in self._q(  # type: ignore[misc]
            "SELECT version, measurement, created FROM versions WHERE name=? ORDER BY version", (name,))]

    def delete_function(self, name: str) -> None:
        self._tx([("DELETE FROM versions WHERE name=?", (name,)), ("DELETE FROM functions WHERE name=?", (name,))])

    # -- calls and logs (batched) ---------------------------------------------------------------------
    def record_call(self, call_id: str, function: str, version: int | None, status: str, created: float,
                    finished: float | None, duration_ms: float | None, error: dict[str, Any] | None,
                    result: bytes | None, caller: str | None) -> None:
        self._pending_calls.append((call_id, function, version, status, created, finished, duration_ms,
                                    json.dumps(error) if error else None, result, caller))

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
        calls, self._pending_calls = self._pending_calls, []
        logs, self._pending_logs = self._pending_logs, []
        done, self._pending_log = self._pending_log, []
        if not calls and not logs and not done:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO call_log VALUES (?,?,?,?,?,?,?,?,?)", done)
                self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?,?,?,?,?,?,?,?,?,?)", calls)
                self._db.executemany(
                    "INSERT INTO logs (function, version, call_id, ts, stream, text) VALUES (?,?,?,?,?,?)", logs)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def get_call(self, call_id: str) -> dict[str, Any] | None:
        self.flush()
        row = self._q("SELECT id, function, version, status, created, finished, duration_ms, error, result "
                      "FROM calls WHERE id=?", (call_id,))
        if not row:
            return None
        r = row[0]
        return {"id": r[0], "function": r[1], "version": r[2], "status": r[3], "created": r[4], "finished": r[5],
                "duration_ms": r[6], "error": json.loads(r[7]) if r[7] else None, "result": r[8]}

    def call_counts(self) -> dict[str, tuple[int, int]]:
        """function -> (calls, errors) over all recorded calls."""
        rows = self._q("SELECT function, SUM(n), SUM(e) FROM ("
                       "SELECT function, COUNT(*) AS n, SUM(status='failed') AS e FROM calls GROUP BY function "
                       "UNION ALL SELECT function, COUNT(*), SUM(status='failed') FROM call_log GROUP BY function) "
                       "GROUP BY function")
        return {r[0]: (int(r[1]), int(r[2] or 0)) for r in rows}

    def mark_unfinished_failed(self) -> int:
        """At start-up: calls that were queued/running when the gateway died can never finish."""
        err = json.dumps({"type": "replica_lost", "message": "the gateway restarted while the call was running"})
        with self._lock:
            cur = self._db.execute("UPDATE calls SET status='failed', error=? WHERE status IN ('queued','running')",
                                   (err,))
            return cur.rowcount

    def logs(self, function: str, limit: int) -> list[dict[str, Any]]:
        self.flush()
        rows = self._q("SELECT ts, version, call_id, stream, text FROM logs WHERE function=? ORDER BY id DESC LIMIT ?",
                       (function, limit))
        return [{"ts": r[0], "version": r[1], "call_id": r[2], "stream": r[3], "text": r[4]} for r in rows]

    def expire_results(self, older_than: float) -> None:
        self._q("UPDATE calls SET result=NULL WHERE finished < ? AND result IS NOT NULL", (older_than,))
