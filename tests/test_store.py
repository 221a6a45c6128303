import pytest

from cocoon_faas.errors import ConflictError, PermissionDeniedError
from cocoon_faas.gateway.store import Store, hash_key


def test_versions_ownership_and_call_records(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    key, dev = s.create_key("alice")
    assert s.keys()[hash_key(key)] == dev
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
    s.record_call("c1", "f", 1, "succeeded", 1.0, 2.0, 3.0, None, b'{"ok":1}', dev)
    s.record_call("c2", "f", 1, "running", 1.0, None, None, None, None, dev)
    s.record_logs("f", 1, "c1", [("stdout", "hello")])
    s.log_call("c3", "f", 1, "failed", 1.0, 2.0, 1.0, {"type": "timeout", "message": "m"}, dev)
    s.flush()
    assert s.get_call("c1")["result"] == b'{"ok":1}'
    assert s.logs("f", 10)[0]["text"] == "hello"
    assert s.mark_unfinished_failed() == 1
    assert s.get_call("c2")["status"] == "failed"
    assert s.call_counts() == {"f": (3, 2)}  # async records and the sync call log together
    s.close()
    s2 = Store(tmp_path / "db.sqlite")  # durable
    assert s2.version("f", 2).code == b"code2"


def test_a_failed_write_never_leaves_the_store_inside_a_transaction(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    _, dev = s.create_key("alice")
    with pytest.raises(UnicodeEncodeError):  # a name SQLite cannot take, inside the version transaction
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
