"""The store on both backends (the `database` fixture: SQLite file, and a real throwaway PostgreSQL server)."""

import threading

import pytest

from cocoon_faas.errors import ConflictError, NotFoundError, PermissionDeniedError
from cocoon_faas.gateway.db import DatabaseError, IntegrityError, open_database
from cocoon_faas.gateway.migrations import Migration, SchemaTooNewError, migrate, schema_version
from cocoon_faas.gateway.store import STORE_MIGRATIONS, Store, hash_key


def test_versions_ownership_and_call_records(database):
    s = Store(database())
    key, dev = s.create_key("alice")
    assert s.keys()[hash_key(key)] == dev
    assert s.key_developer(hash_key(key)) == dev and s.key_developer("nope") is None
    _, bob = s.create_key("bob")
    with pytest.raises(ConflictError):
        s.create_key("alice", for_developer=bob)
    v1 = s.add_version("f", dev, {"name": "f"}, {"params": []}, b"code", "m1", {})
    s.set_current("f", v1)
    with pytest.raises(PermissionDeniedError):
        s.add_version("f", bob, {"name": "f"}, {"params": []}, b"code", "m2", {})
    v2 = s.add_version("f", dev, {"name": "f"}, {"params": []}, b"code2", "m2", {})
    assert (v1, v2) == (1, 2)
    assert s.functions() == [("f", dev, 1)]
    assert [v for v, _, _ in s.versions("f")] == [1, 2]
    with pytest.raises(NotFoundError):
        s.version("f", 9)
    s.record_call("c1", "f", 1, "succeeded", 1.0, 2.0, 3.0, None, b'{"ok":1}', dev)
    s.record_call("c2", "f", 1, "running", 1.0, None, None, None, None, dev)
    s.record_logs("f", 1, "c1", [("stdout", "hello")])
    s.log_call("c3", "f", 1, "failed", 1.0, 2.0, 1.0, {"type": "timeout", "message": "m"}, dev)
    s.flush()
    assert s.get_call("c1")["result"] == b'{"ok":1}'
    assert s.get_call("nope") is None
    assert s.logs("f", 10)[0]["text"] == "hello"
    assert s.mark_unfinished_failed() == 1
    assert s.get_call("c2")["status"] == "failed"
    assert s.call_counts() == {"f": (3, 2)}  # async records and the sync call log together
    s.record_call("c1", "f", 1, "failed", 1.0, 2.0, 3.0, {"type": "x", "message": "y"}, None, dev)
    s.flush()  # the upsert replaces the record
    assert s.get_call("c1")["error"] == {"type": "x", "message": "y"} and s.get_call("c1")["result"] is None
    s.drop_version("f", 2)
    assert [v for v, _, _ in s.versions("f")] == [1]
    s.close()
    s2 = Store(database())  # durable, and a second open applies no migration again
    assert s2.version("f", 1).code == b"code"
    s2.delete_function("f")
    assert s2.functions() == [] and s2.owner("f") is None
    assert s2.developer_name(dev) == "alice" and s2.developer_id("bob") == bob


def test_a_failed_write_never_leaves_the_store_inside_a_transaction(database):
    s = Store(database())
    _, dev = s.create_key("alice")
    with pytest.raises(UnicodeEncodeError):  # a name the database cannot take, inside the version transaction
        s.add_version("f\ud800", dev, {"name": "f"}, {"params": []}, b"code", "m", {})
    s.record_call("c1", "f", 1, "succeeded", 1.0, 2.0, 3.0, None, b"1", "x\ud800")  # fails the batch's insert
    with pytest.raises(UnicodeEncodeError):
        s.flush()
    # every later write still works: no "cannot start a transaction within a transaction"
    assert s.add_version("g", dev, {"name": "g"}, {"params": []}, b"code", "m", {}) == 1
    s.create_key("bob")
    s.record_logs("g", 1, "c2", [("stdout", "lone \ud800 surrogate")])  # function output: kept escaped
    s.flush()
    assert s.logs("g", 10)[0]["text"] == "lone \\ud800 surrogate"


def test_two_gateways_share_async_calls_and_cancel_requests(database):
    a, b = Store(database(), gateway_id="gw-a"), Store(database(), gateway_id="gw-b")
    a.record_call("q1", "f", 1, "queued", 1.0, None, None, None, None, "dev", durable=True)
    a.record_call("q2", "f", 1, "running", 1.0, None, None, None, None, "dev", durable=True)
    b.record_call("q3", "f", 1, "running", 1.0, None, None, None, None, "dev", durable=True)
    row = b.get_call("q1")  # written through: visible to the other gateway at once
    assert row is not None and row["gateway"] == "gw-a" and row["status"] == "queued"
    assert b.request_cancel("q1") and not b.request_cancel("missing")
    assert a.cancel_requests(["q1", "q2"]) == ["q1"]
    # gateway A died: only its unfinished calls fail, B's keep running
    assert b.mark_unfinished_failed(alive=["gw-b"]) == 2
    assert b.get_call("q3")["status"] == "running" and a.get_call("q2")["status"] == "failed"
    assert not b.request_cancel("q2")  # finished calls cannot be cancelled
    a.close()
    b.close()


def test_migrations_versioned_and_newer_schema_refused(database):
    db = database()
    Store(db)
    assert schema_version(db, "store") == len(STORE_MIGRATIONS)
    extra = [*STORE_MIGRATIONS, Migration(len(STORE_MIGRATIONS) + 1, "a test table",
                                          "CREATE TABLE t_extra (id INTEGER PRIMARY KEY, v BLOB)")]
    assert migrate(db, "store", extra) == 1
    assert migrate(db, "store", extra) == 0  # idempotent
    db.execute("INSERT INTO t_extra VALUES (?, ?)", (2**62, b"\x00\xff"))
    assert db.query("SELECT id, v FROM t_extra") == [(2**62, b"\x00\xff")]
    with pytest.raises(SchemaTooNewError, match="Upgrade this gateway"):
        Store(database())  # this code knows fewer migrations than the database has
    with pytest.raises(ValueError, match="numbered"):
        migrate(db, "other", [Migration(2, "gap")])


def test_concurrent_start_applies_migrations_once(database):
    errors: list[BaseException] = []
    dbs = [database() for _ in range(4)]

    def start(db):
        try:
            Store(db)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert schema_version(dbs[0], "store") == len(STORE_MIGRATIONS)


def test_integrity_error_names_table_and_rolls_back(database):
    db = database()
    Store(db)
    db.execute("INSERT INTO developers VALUES (?,?,?)", ("d1", "n1", 1.0))
    with pytest.raises(IntegrityError) as ei:
        with db.transaction() as tx:
            tx.execute("INSERT INTO developers VALUES (?,?,?)", ("d2", "n2", 1.0))
            tx.execute("INSERT INTO developers VALUES (?,?,?)", ("d1", "n3", 1.0))
    assert ei.value.table == "developers"
    assert [r[0] for r in db.query("SELECT id FROM developers ORDER BY id")] == ["d1"]  # d2 rolled back
    with pytest.raises(RuntimeError):
        with db.transaction() as tx:
            tx.execute("INSERT INTO developers VALUES (?,?,?)", ("d3", "n3", 1.0))
            raise RuntimeError("any error rolls the transaction back")
    assert db.query("SELECT COUNT(*) FROM developers") == [(1,)]
    assert db.query("SELECT SUM(created) FROM developers") == [(1.0,)]


def test_row_locks_serialize_read_modify_write(database):
    """Concurrent increments through SELECT … FOR UPDATE from separate connections lose no update."""
    db0 = database()
    db0.execute("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    db0.execute("INSERT INTO counter VALUES (1, 0)")
    conns = [database() for _ in range(4)]

    def bump(db):
        for _ in range(25):
            with db.transaction() as tx:
                n = tx.execute(f"SELECT n FROM counter WHERE id=?{db.for_update}", (1,)).fetchone()[0]
                tx.execute("UPDATE counter SET n=? WHERE id=?", (n + 1, 1))

    threads = [threading.Thread(target=bump, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db0.query("SELECT n FROM counter") == [(100,)]


def test_session_lock_is_exclusive_until_released(database):
    a, b = database(), database()
    held = a.try_lock(42)
    assert held is not None
    assert b.try_lock(42) is None
    held.release()
    again = b.try_lock(42)
    assert again is not None
    again.release()


def test_bad_urls_name_the_fix(tmp_path):
    with pytest.raises(DatabaseError, match="postgresql://"):
        open_database("mysql://x")
    with pytest.raises(DatabaseError, match="COCOON_DATABASE_URL"):
        open_database("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", pool_size=1)
    db = open_database(f"sqlite:///{tmp_path}/x.db")
    assert db.describe().endswith("x.db")
    db.close()


def test_replica_registry_and_client_call_ids(database):
    from cocoon_faas.gateway.store import ReplicaRow

    a, b = Store(database(), "gw-a"), Store(database(), "gw-b")
    a.put_replica(ReplicaRow("r1", "f", 2, "127.0.0.1", 4001, "local", '{"pid": 7}', "gw-a", 1.0))
    a.put_replica(ReplicaRow("r1", "f", 2, "127.0.0.1", 4002, "local", '{"pid": 8}', "gw-a", 2.0))  # re-register
    assert [(r.id, r.port, r.facts) for r in b.replicas()] == [("r1", 4002, '{"pid": 8}')]
    b.delete_replica("r1")
    assert a.replicas() == []
    a.claim_call_id("client-chosen-id-0001")
    with pytest.raises(ConflictError, match="not run again"):
        b.claim_call_id("client-chosen-id-0001")  # a resend to another gateway is refused
    assert b.prune_call_ids(older_than=0) == 0 and a.prune_call_ids(older_than=2**40) == 1
    b.claim_call_id("client-chosen-id-0001")  # forgotten after retention: usable again
    a.add_version("f", "dev", {"name": "f"}, {"params": []}, b"c", "m", {})
    assert b.current_version("f") == 0 and b.current_version("nope") is None
    a.close()
    b.close()


def test_delete_function_takes_its_logs_and_call_records_and_retention(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    _, dev = s.create_key("alice")
    for v in range(1, 5):
        s.add_version("f", dev, {"name": "f"}, {"params": []}, b"code", f"m{v}", {})
    s.set_current("f", 4)
    assert s.prune_versions("f", 2, 4) == 2 and [v for v, _, _ in s.versions("f")] == [3, 4]
    s.record_call("c1", "f", 1, "succeeded", 1.0, 2.0, 3.0, None, b"1", dev)
    s.log_call("c2", "f", 1, "succeeded", 1.0, 2.0, 1.0, None, dev)
    s.record_logs("f", 1, "c1", [("stdout", "secret of the first owner")])
    s.delete_function("f")
    assert s.logs("f", 10) == [] and s.get_call("c1") is None and s.call_counts() == {}
    for i in range(5):
        s.record_logs("g", 1, f"c{i}", [("stdout", f"line {i}")])
    s.record_call("old", "g", 1, "succeeded", 1.0, 2.0, 3.0, None, b"1", dev)
    s.flush()
    s.apply_retention(calls_before=10.0, logs_before=0.0, max_log_rows=2)
    assert [x["text"] for x in s.logs("g", 10)] == ["line 4", "line 3"] and s.get_call("old") is None


def test_sqlite_transaction_commits_rolls_back_and_always_frees_its_lock(tmp_path):
    """The SQLite transaction object (a paid call's two transactions use it): commits on success; on an exception
    inside, rolls back and re-raises; a COMMIT that fails (a deferred constraint) rolls back and raises; in every
    case the connection is left outside any transaction and its lock is free for another thread."""
    import sqlite3

    db = open_database(tmp_path / "t.sqlite")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")
    db.execute("CREATE TABLE u (k TEXT PRIMARY KEY)")
    with db.transaction() as tx:
        tx.execute("INSERT INTO p VALUES (1)")
        tx.execute("INSERT INTO c VALUES (1, 1)")
    with pytest.raises(RuntimeError, match="inside"), db.transaction() as tx:
        tx.execute("INSERT INTO p VALUES (2)")
        raise RuntimeError("inside")
    with pytest.raises(IntegrityError) as exc, db.transaction() as tx:
        tx.execute("INSERT INTO u VALUES ('a')")
        tx.execute("INSERT INTO u VALUES ('a')")  # a unique key: named by table, the whole transaction undone
    assert exc.value.table == "u"
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), db.transaction() as tx:
        tx.execute("INSERT INTO c VALUES (2, 99)")  # accepted now, refused by the COMMIT
    assert db.query("SELECT id FROM p") == [(1,)] and db.query("SELECT id FROM c") == [(1,)]
    assert db.query("SELECT k FROM u") == []
    done: list[int] = []

    def other() -> None:  # would block forever on a lock left held
        with db.transaction() as tx:
            tx.execute("INSERT INTO p VALUES (3)")
        done.append(1)

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=30)
    assert done == [1] and db.query("SELECT id FROM p ORDER BY id") == [(1,), (3,)]
    db.close()


def test_sqlite_checkpoints_in_background_not_inside_commits(tmp_path):
    """The gateway's SQLite files checkpoint on a thread: no commit crosses SQLite's automatic checkpoint (whose
    fsync made one paid call in a few hundred wait milliseconds); the thread still moves the WAL into the file."""
    import time

    db = open_database(tmp_path / "x.db")
    db.checkpoint_in_background(interval_s=0.05)
    assert db.query("PRAGMA wal_autocheckpoint") == [(0,)]
    assert any(t.name == "wal-checkpoint x.db" for t in threading.enumerate())
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(1500):  # past 1000 WAL pages: where a commit would have checkpointed by itself
        db.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 3000))

    deadline = time.monotonic() + 10
    while (tmp_path / "x.db").stat().st_size < 1500 * 3000:  # the rows reach the database file itself
        assert time.monotonic() < deadline, "the checkpointer never moved the WAL into the database file"
        time.sleep(0.05)
    db.close()
    assert not any(t.name == "wal-checkpoint x.db" for t in threading.enumerate())
