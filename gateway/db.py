"""One SQL interface over two backends: SQLite (the embedded default, one file) and PostgreSQL (shared by several
gateways, through a psycopg 3 connection pool).

Callers write portable SQL with ``?`` placeholders (translated to ``%s`` for PostgreSQL), portable types in DDL
(``INTEGER``, ``REAL``, ``TEXT``, ``BLOB``; translated to ``BIGINT``, ``DOUBLE PRECISION``, ``BYTEA``) and
``ON CONFLICT`` upserts. Writes that must see a consistent row lock it with ``SELECT … {db.for_update}`` inside
`transaction()`: PostgreSQL takes the row lock, SQLite's ``BEGIN IMMEDIATE`` already serializes every writer.
A unique-key violation surfaces as `IntegrityError` naming the table on both backends.

    db = open_database("postgresql://cocoon@db/cocoon")      # or a Path / "sqlite:///…"
    with db.transaction() as tx:
        row = tx.execute(f"SELECT n FROM t WHERE id=?{db.for_update}", (1,)).fetchone()
        tx.execute("UPDATE t SET n=? WHERE id=?", (row[0] + 1, 1))
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from cocoon_faas.errors import CocoonError

Args = Sequence[Any]


class IntegrityError(CocoonError):
    """A constraint (a unique key) rejected a write; `table` names the table on both backends."""

    def __init__(self, table: str, detail: str) -> None:
        super().__init__(f"{table}: {detail}")
        self.table = table
        self.status, self.type = 409, "conflict"


class DatabaseError(CocoonError):
    """The database cannot be used as configured (unreachable, wrong URL, newer schema)."""

    status, type = 503, "database_unavailable"


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction: every statement commits together or not at all."""

    def execute(self, sql: str, args: Args = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Args]) -> None: ...


class Database(Protocol):
    dialect: str  # "sqlite" | "postgresql"
    for_update: str  # " FOR UPDATE" where rows can be locked, else ""
    shared: bool  # True when other gateways may use the same database

    def query(self, sql: str, args: Args = ()) -> list[tuple[Any, ...]]: ...

    def execute(self, sql: str, args: Args = ()) -> int: ...

    def transaction(self) -> Any: ...  # context manager yielding a Tx

    def ddl(self, sql: str) -> str: ...

    def try_lock(self, key: int) -> Any: ...  # a held session lock (call .release()) or None

    def describe(self) -> str: ...

    def close(self) -> None: ...


# -- SQLite ---------------------------------------------------------------------------------------------------

_SQLITE_TABLE = re.compile(r"(?:UNIQUE|PRIMARY KEY|NOT NULL|CHECK) constraint failed: (\w+)")


def _sqlite_integrity(exc: sqlite3.IntegrityError) -> IntegrityError:
    m = _SQLITE_TABLE.search(str(exc))
    return IntegrityError(m.group(1) if m else "?", str(exc))


class _SqliteTx:
    """One transaction: the context manager and the `Tx` in one object (a paid call runs two transactions; a plain
    class costs less than a generator-based context manager). Holds the database's lock from BEGIN to the end."""

    __slots__ = ("_db", "_con")

    def __init__(self, db: SqliteDatabase) -> None:
        self._db, self._con = db, db._con

    def __enter__(self) -> _SqliteTx:
        self._db.lock.acquire()
        try:
            self._con.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._db.lock.release()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self._db._rollback()
                return
            try:
                self._con.execute("COMMIT")
            except BaseException:
                self._db._rollback()
                raise
        finally:
            self._db.lock.release()

    def execute(self, sql: str, args: Args = ()) -> Cursor:
        try:
            return self._con.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            raise _sqlite_integrity(exc) from None

    def executemany(self, sql: str, rows: Iterable[Args]) -> None:
        try:
            self._con.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise _sqlite_integrity(exc) from None


class _FileLock:
    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def release(self) -> None:
        self._fh.close()  # closing the descriptor drops the flock


class SqliteDatabase:
    """One WAL-mode file, one connection guarded by a re-entrant lock. Several processes on one machine
    (`cocoon serve --workers N`) may share the file: writers queue on SQLite's lock (busy timeout)."""

    dialect = "sqlite"
    for_update = ""
    shared = False

    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute(f"PRAGMA synchronous={synchronous}")
        self._con.execute("PRAGMA busy_timeout=30000")
        self.lock = threading.RLock()
        self._checkpointer: _Checkpointer | None = None

    def checkpoint_in_background(self, interval_s: float = 0.5) -> None:
        """Move WAL checkpoints off the writers: SQLite's automatic checkpoint runs inside the commit that crosses
        1000 WAL pages and, with synchronous=NORMAL, fsyncs the database file there, so one call in a few hundred
        waited milliseconds for it (a paid call's commit p99 12 ms against a p50 of 50 µs, benchmarks/RESULTS.md
        round 10). A thread with its own connection checkpoints PASSIVE-ly every `interval_s` instead (it never
        blocks a writer; the GIL is released while SQLite works)."""
        if self._checkpointer is None and str(self.path) != ":memory:":
            self._con.execute("PRAGMA wal_autocheckpoint=0")
            self._con.execute(f"PRAGMA journal_size_limit={64 << 20}")  # a reset WAL shrinks back to this
            self._checkpointer = _Checkpointer(self.path, interval_s)

    def query(self, sql: str, args: Args = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self._con.execute(sql, args).fetchall()

    def execute(self, sql: str, args: Args = ()) -> int:
        with self.lock:
            try:
                return self._con.execute(sql, args).rowcount
            except sqlite3.IntegrityError as exc:
                raise _sqlite_integrity(exc) from None

    def transaction(self) -> _SqliteTx:
        """``with db.transaction() as tx:`` BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
        return _SqliteTx(self)

    def _rollback(self) -> None:
        """End a failed transaction whatever failed (a rollback that itself fails must not hide the cause): a
        connection left inside a transaction would refuse every later write until restart."""
        if self._con.in_transaction:
            try:
                self._con.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def ddl(self, sql: str) -> str:
        return sql

    def try_lock(self, key: int) -> _FileLock | None:
        """An exclusive flock on a file beside the database: the processes of one machine share the file."""
        import fcntl

        fh = open(self.path.with_name(f"{self.path.name}.lock-{key}"), "a+")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return None
        return _FileLock(fh)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self.lock:
            self._con.close()


class _Checkpointer:
    """A daemon thread that checkpoints one WAL file PASSIVE-ly on a period, on its own connection."""

    def __init__(self, path: Path, interval_s: float) -> None:
        self._con = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=0)
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, name=f"wal-checkpoint {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._con.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:  # busy (another process checkpoints) or the file is going away: next period
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._con.execute("PRAGMA wal_checkpoint(PASSIVE)")  # what the last period left
        except sqlite3.Error:
            pass
        self._con.close()


# -- PostgreSQL -----------------------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders -> ``%s`` (a literal ``%`` doubled); the SQL we write has no ``?`` inside strings."""
    return sql.replace("%", "%%").replace("?", "%s")


_PG_TYPES = [(re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
             (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
             (re.compile(r"\bBLOB\b"), "BYTEA")]


class _PgTx:
    def __init__(self, con: Any) -> None:
        self._con = con

    def execute(self, sql: str, args: Args = ()) -> Cursor:
        import psycopg

        try:
            return self._con.execute(_pg_sql(sql), args)  # type: ignore[no-any-return]
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError(exc.diag.table_name or "?", str(exc).splitlines()[0]) from None

    def executemany(self, sql: str, rows: Iterable[Args]) -> None:
        import psycopg

        try:
            with self._con.cursor() as cur:
                cur.executemany(_pg_sql(sql), list(rows))
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError(exc.diag.table_name or "?", str(exc).splitlines()[0]) from None


class _PgLock:
    """A session advisory lock held on a connection taken out of the pool until released."""

    def __init__(self, db: PostgresDatabase, con: Any, key: int) -> None:
        self._db, self._con, self.key = db, con, key

    def alive(self) -> bool:
        """False when the connection (and so the lock) is gone: the holder must stop acting as leader."""
        try:
            self._con.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means the session and its lock are lost
            return False

    def release(self) -> None:
        try:
            self._con.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except Exception:  # noqa: BLE001 - a dead session has released the lock already
            pass
        self._db.pool.putconn(self._con)


def _configure(con: Any) -> None:
    """SUM() over BIGINT is NUMERIC in PostgreSQL; load whole numbers as int as SQLite does (money is integers)."""
    from psycopg.adapt import Loader

    class _Numeric(Loader):
        def load(self, data: Any) -> Any:
            s = bytes(data)
            return int(s) if s.lstrip(b"-").isdigit() else float(s)

    con.adapters.register_loader("numeric", _Numeric)


class PostgresDatabase:
    """A psycopg 3 pool; each statement outside a transaction autocommits."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"
    shared = True

    def __init__(self, url: str, pool_size: int = 8, timeout: float = 30.0) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise DatabaseError("COCOON_DATABASE_URL names PostgreSQL but psycopg is not installed; "
                                "pip install 'psycopg[binary,pool]'") from exc
        import psycopg

        self.url = url
        try:  # one direct connection first: its error names the cause (the pool would only retry until timeout)
            psycopg.connect(url, connect_timeout=max(1, int(min(timeout, 10)))).close()
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot reach {self.describe()}: {str(exc).strip().splitlines()[-1]}; check "
                                "COCOON_DATABASE_URL and that the server accepts connections") from None
        # +2: a gateway keeps up to two connections out of the pool for its liveness and leader locks
        self.pool = ConnectionPool(url, min_size=1, max_size=max(2, pool_size) + 2, timeout=timeout, open=False,
                                   kwargs={"autocommit": True}, configure=_configure, name="cocoon")
        try:
            self.pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            self.pool.close()
            raise DatabaseError(f"cannot reach PostgreSQL at {self.describe()}: {exc}; check COCOON_DATABASE_URL "
                                "and that the server accepts connections") from None

    def query(self, sql: str, args: Args = ()) -> list[tuple[Any, ...]]:
        with self.pool.connection() as con:
            return con.execute(_pg_sql(sql), args).fetchall()  # type: ignore[no-any-return]

    def execute(self, sql: str, args: Args = ()) -> int:
        with self.pool.connection() as con:
            return _PgTx(con).execute(sql, args).rowcount

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as con, con.transaction():
            yield _PgTx(con)

    def ddl(self, sql: str) -> str:
        for pat, repl in _PG_TYPES:
            sql = pat.sub(repl, sql)
        return sql

    def try_lock(self, key: int) -> _PgLock | None:
        con = self.pool.getconn()
        try:
            got = con.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        except BaseException:
            self.pool.putconn(con)
            raise
        if not got:
            self.pool.putconn(con)
            return None
        return _PgLock(self, con, key)

    def describe(self) -> str:
        return "PostgreSQL " + re.sub(r"//[^@/]*@", "//…@", self.url)  # never print a password

    def close(self) -> None:
        self.pool.close()


def open_database(where: str | Path, pool_size: int = 8) -> Database:
    """A Path or ``sqlite:///path`` -> SQLite; ``postgresql://`` / ``postgres://`` -> PostgreSQL."""
    if isinstance(where, Path):
        return SqliteDatabase(where)
    if where.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(where, pool_size)
    if where.startswith("sqlite:///"):
        return SqliteDatabase(Path(where[len("sqlite:///") - 1:]))
    raise DatabaseError(f"unsupported database URL {where!r}; use postgresql://user@host/db or sqlite:///path")
