"""A replica's data port serves only the gateway: the first frame must be HELLO with the per-replica secret."""

from __future__ import annotations

from typing import Any

from cocoon_faas import protocol as P
from cocoon_faas.runtime.replica import Replica, _ServerConn
from cocoon_faas.spec import make_spec


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None


def _conn(secret: bytes) -> tuple[_ServerConn, _Transport]:
    replica = Replica("f", 1, b"", make_spec(name="f").to_json(), "127.0.0.1", secret=secret)
    conn = _ServerConn(replica)
    t = _Transport()
    conn.proto.connection_made(t)  # type: ignore[arg-type]
    return conn, t


def test_a_call_without_hello_gets_nothing_and_is_disconnected():
    conn, t = _conn(b"s" * 32)
    conn.proto.data_received(P.encode(1, P.CALL, {"t": 1}, b"{}") + P.encode(2, P.PING))
    assert t.closed and t.written == [] and conn.proto.closed and not conn.tasks


def test_a_wrong_secret_gets_nothing_and_is_disconnected():
    conn, t = _conn(b"s" * 32)
    conn.proto.data_received(P.encode(1, P.HELLO, None, b"x" * 32))
    assert t.closed and t.written == [] and not conn.authenticated


def test_the_right_secret_is_answered(monkeypatch):
    sent: list[bytes] = []
    conn, t = _conn(b"s" * 32)
    monkeypatch.setattr(conn.proto, "send", sent.append)
    conn.proto.data_received(P.encode(7, P.HELLO, None, b"s" * 32) + P.encode(8, P.PING))
    assert conn.authenticated and not t.closed
    assert [P.HEADER.unpack_from(f)[1:3] for f in sent] == [(7, P.HELLO), (8, P.PONG)]
