"""Strict, bounded decoders for everything a replica sends the gateway (gateway/replica_wire.py)."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from cocoon_faas import protocol as P
from cocoon_faas.gateway.replica_client import PendingCall, ReplicaHandle
from cocoon_faas.gateway.replica_wire import ReplicaProtocolError, decode_facts, decode_load, decode_meta
from cocoon_faas.replica_context import MAX_COUNT, LoadReport


def facts(**over):
    d = {"ok": True, "host": "127.0.0.1", "port": 4242, "pid": 7, "setup_s": 0.5, "runtime": "cocoon-runtime/1",
         "logs": [["stdout", "hi\n"]], "sandboxed": True}
    d.update(over)
    return json.dumps(d).encode()


def test_facts_round_trip_and_unknown_fields_ignored():
    f = decode_facts(facts(future_field={"x": 1}))
    assert (f.ok, f.host, f.port, f.logs, f.sandboxed) == (True, "127.0.0.1", 4242, (("stdout", "hi\n"),), True)
    bad = decode_facts(json.dumps({"ok": False, "error_type": "ImportError", "message": "no numpy"}).encode())
    assert not bad.ok and bad.error_type == "ImportError" and bad.message == "no numpy"


@pytest.mark.parametrize("raw, why", [
    (facts(port=0), "port"),
    (facts(port="80"), "port"),
    (facts(host="example.com"), "IP address"),
    (facts(setup_s=-1), "setup_s"),
    (facts(ok="yes"), "ok"),
    (facts(logs=[["kernel", "x"]]), "stream"),
    (facts(document=[1]), "document"),
    (facts(document={"key_id": "not hex!"}), "key_id"),
    (b'{"ok": true, "setup_s": NaN}', "NaN"),
    (b'{"ok": true, "setup_s": Infinity}', "Infinity"),
    (b"[" * 100 + b"]" * 100, "nested"),
    (pickle.dumps({"ok": True}), "not JSON"),
    (b"x" * (2 * 1024 * 1024), "allowed"),
])
def test_facts_refused(raw, why):
    with pytest.raises(ReplicaProtocolError, match=why):
        decode_facts(raw)


def test_frame_meta_keeps_only_checked_keys():
    m = decode_meta(P.RESULT, json.dumps({"ms": 1.5, "logs": [["stderr", "w"]], "provider": "evil",
                                          "wall_ms": 0, "status": 200}).encode())
    assert m == {"ms": 1.5, "logs": [("stderr", "w")]}  # the replica cannot set provider or wall time
    e = decode_meta(P.ERROR, b'{"type": "function_error", "message": "boom", "exc_type": "KeyError", "ms": 2}')
    assert e == {"type": "function_error", "message": "boom", "exc_type": "KeyError", "ms": 2.0}
    assert decode_meta(P.CHUNK, b"{}") == {}


@pytest.mark.parametrize("ftype, raw", [
    (P.RESULT, b'{"ms": -1}'),
    (P.RESULT, b'{"ms": NaN}'),
    (P.RESULT, b'{"ms": "3"}'),
    (P.END, b'{"seq": -2}'),
    (P.ERROR, b'{"type": 7}'),
    (P.ERROR, b'{"status": 200}'),
    (P.RESULT, b'[1]'),
    (P.RESULT, b'{"logs": "text"}'),
])
def test_frame_meta_refused(ftype, raw):
    with pytest.raises(ReplicaProtocolError):
        decode_meta(ftype, raw)


def test_a_refused_frame_drops_the_connection():
    lost = []
    proto = P.FrameProtocol(lambda *a: None, lost.append, decode_meta)
    proto.data_received(P.HEADER.pack(13 + 11, 1, P.RESULT, 11) + b'{"ms": NaN}')
    assert proto.closed and "bad frame meta" in str(lost[0])


def test_charged_time_is_capped_at_the_gateways_wall_time():
    async def main():
        r = ReplicaHandle(id="r", function="f", version=1, actor=None)
        pending = PendingCall(False)
        r._pending[1] = pending
        r._on_frame(1, P.RESULT, {"ms": 3_600_000.0}, b"{}")  # the replica claims an hour
        honest = PendingCall(False)
        r._pending[2] = honest
        r._on_frame(2, P.RESULT, {"ms": 0.0}, b"{}")
        return await pending.future, await honest.future

    frame, ok = asyncio.run(main())
    assert frame.meta["ms"] == frame.meta["wall_ms"] < 60_000
    assert ok.meta["ms"] == 0.0  # an honest, smaller time is kept


def test_a_sealed_receipt_may_not_bill_more_than_the_gateway_waited():
    from types import SimpleNamespace

    from cocoon_faas.errors import CocoonError
    from cocoon_faas.gateway.sealed import check_receipt_time

    check_receipt_time(SimpleNamespace(exec_ms=12.0), {"wall_ms": 12.5})  # honest: inside the wall time
    with pytest.raises(CocoonError, match="not charged") as e:
        check_receipt_time(SimpleNamespace(exec_ms=3_600_000.0), {"wall_ms": 12.5})
    assert e.value.status == 502


def test_the_gateway_bounds_a_replicas_frames_by_its_setting():
    lost = []
    proto = P.FrameProtocol(lambda *a: None, lost.append, decode_meta, max_frame=1024)
    proto.data_received(P.HEADER.pack(13 + 2000, 1, P.RESULT, 0))
    assert proto.closed and "bad frame" in str(lost[0])


def test_a_result_over_the_frame_limit_tells_the_developer_what_to_change():
    lost: list[Exception] = []
    proto = P.FrameProtocol(lambda *a: None, lost.append, decode_meta, max_frame=1024)
    proto.data_received(P.HEADER.pack(13 + 2000, 1, P.RESULT, 2))  # a big body, an ordinary meta
    assert isinstance(lost[0], P.FrameTooLarge) and (lost[0].length, lost[0].limit) == (2013, 1024)

    async def main() -> PendingCall:
        r = ReplicaHandle(id="r", function="big", version=1, actor=None)
        pending = PendingCall(False)
        r._pending[1] = pending
        r._lost(lost[0])
        return pending

    pending = asyncio.run(main())
    err = pending.future.exception()  # was "broke the frame protocol (bad frame: length 2013, meta 2)"
    assert "2013 bytes" in str(err) and "COCOON_MAX_FRAME_BYTES" in str(err) and "smaller stream items" in str(err)


def test_engine_load_reports_are_strict_and_clamped():
    good = {"waiting": 2, "running": 3, "max_seqs": 8, "kv_blocks": 64, "kv_used": 60, "max_waiting": 16, "new": 1}
    m = decode_meta(P.STATS, json.dumps(good).encode())
    assert m == {"load": LoadReport(2, 3, 8, 64, 60, 16)}
    # out of range: clamped, not believed (running within the batch, used within the pool, counts bounded)
    lie = decode_load({"waiting": 10**15, "running": 500, "max_seqs": 8, "kv_blocks": 10, "kv_used": 99})
    assert (lie.waiting, lie.running, lie.kv_used, lie.max_seqs) == (MAX_COUNT, 8, 10, 8)
    assert decode_load({}) == LoadReport(0, 0, 1, 0, 0, 0)
    for bad in ({"waiting": -1}, {"waiting": 1.5}, {"running": True}, {"kv_used": "9"}, {"waiting": 2**64}, [1]):
        with pytest.raises(ReplicaProtocolError):
            decode_load(bad)
    with pytest.raises(ReplicaProtocolError, match="NaN"):
        decode_meta(P.STATS, b'{"waiting": NaN}')


def test_a_load_report_updates_the_handle_and_answers_no_call():
    async def main():
        r = ReplicaHandle(id="r", function="f", version=1, actor=None)
        pending = PendingCall(False)
        r._pending[0] = pending  # even a call numbered 0 does not receive it
        r._on_frame(0, P.STATS, {"load": LoadReport(1, 2, 8, 10, 10, 4)}, b"")
        r._on_frame(0, P.STATS, {}, b"")  # an empty report keeps the last one
        return r, pending

    r, pending = asyncio.run(main())
    assert r.load == LoadReport(1, 2, 8, 10, 10, 4) and not pending.future.done()
