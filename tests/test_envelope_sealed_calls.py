"""Sealed calls end to end in memory: known answers, round trips, streaming, and tampering of every kind."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.caller import ClientCallContext, seal_request
from cocoon_faas.confidential.document import ClientPolicy, dev_public_key_hex, verify_document
from cocoon_faas.confidential.envelope import (
    CONTENT_NONCE,
    WRAP_INFO,
    Receipt,
    peek_envelope,
    peek_response,
    wrap_aad,
)
from cocoon_faas.confidential.errors import EnvelopeError, NotSealedToThisReplica, ReplayError
from cocoon_faas.confidential.replica import ReplayGuard, ReplicaIdentity
from cocoon_faas.errors import CocoonError, FunctionError

M = "5e" * 32
NOW = 1_780_000_000


def fixed_rng(seed: bytes):
    counter = [0]

    def rng(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(seed + counter[0].to_bytes(4, "big")).digest()[:n]
    return rng


@pytest.fixture(scope="module")
def dev_key():
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _replica(dev_key, fn="echo", measurement=M, seed=None, **kw):
    rng = fixed_rng(seed) if seed else None
    return ReplicaIdentity.create(fn, measurement, "0.1.0", dev_key=dev_key, now=NOW, rng=rng, **kw)


def _verified(rep, dev_key, measurements=(M,)):
    return verify_document(rep.document, ClientPolicy.build(list(measurements),
                                                            allow_dev_keys=[dev_public_key_hex(dev_key)]), NOW + 1)


def _call(rep, v, args=b'{"text":"hi"}', **kw):
    body, ctx = seal_request(args, rep.function, v if isinstance(v, list) else [v], now_ms=NOW * 1000, **kw)
    _CTX_CACHE[bytes(body)] = ctx
    return body, ctx


_CTX_CACHE: dict = {}


def test_known_answer(dev_key):
    rep = _replica(dev_key, seed=b"replica")
    v = _verified(rep, dev_key)
    body, ctx = _call(rep, v, rng=fixed_rng(b"client"))
    opened = rep.open_request(body, now_ms=NOW * 1000)
    frame = rep.seal_response(opened.ctx, "call-1", b'{"echo":"hi"}', 1.25, 1000)
    # Independent check of the layout with raw primitives and the client's known randomness.
    crng = fixed_rng(b"client")
    content_key, rid = crng(32), crng(16).hex()
    hdr = peek_envelope(body)
    assert hdr.request_id == rid and hdr.function == "echo" and hdr.key_ids == (rep.key_id,)
    keys = hpke.open_(hpke.derive_key_pair(fixed_rng(b"replica")(32)), WRAP_INFO,
                      wrap_aad("echo", rid, rep.key_id), hdr.recipients[0].wrapped_key)
    assert keys[:32] == content_key
    assert keys[32:] == hpke.public_bytes(hpke.derive_key_pair(crng(32)).public_key())  # the reply key
    inner = ChaCha20Poly1305(content_key).decrypt(CONTENT_NONCE, bytes(body[hdr.header_end:]),
                                                  bytes(body[:hdr.header_end]))
    assert inner == b'{"text":"hi"}'
    # v2 header layout: magic+version, hlen, fn, rid, ts, one recipient (kid, enc ‖ wrapped ct)
    assert body[:4] == b"CSQ\x02" and struct.unpack_from(">I", body, 4)[0] == hdr.header_end - 8
    assert body[8:14] == b"\x00\x04echo" and body[14:30].hex() == rid
    assert struct.unpack_from(">QB", body, 30) == (NOW * 1000, 1) and body[39:55].hex() == rep.key_id
    # the response frame: head (= AAD), ciphertext under the HPKE context to the reply key, signed receipt
    assert frame[:5] == b"CSR\x02\x01" and frame[5:21].hex() == rid and frame[21:37].hex() == rep.key_id
    clen = struct.unpack_from(">I", frame, 73)[0]
    c2 = fixed_rng(b"client")
    c2(32), c2(16)
    rctx = hpke.setup_receiver(frame[37:69], hpke.derive_key_pair(c2(32)),
                               b"cocoon/v2 response\x00" + hashlib.sha256(body).digest())
    assert rctx.open(frame[:73], frame[77:77 + clen]) == b'{"echo":"hi"}'
    receipt = Receipt.from_bytes(frame[77 + clen + 4:])
    assert (receipt.call_id, receipt.request_id, receipt.function, receipt.measurement, receipt.exec_ms,
            receipt.price_nanoton, receipt.frames) == ("call-1", rid, "echo", M, 1.25, 1000, 1)
    assert receipt.request_sha256 == hashlib.sha256(body).hexdigest()
    receipt.verify(rep.receipt_public_key)
    assert receipt.to_bytes() == frame[77 + clen + 4:]
    # Pinned bytes: any change to the format or the derivations changes these.
    assert hashlib.sha256(body).hexdigest() == KAT_REQUEST_SHA256
    assert hashlib.sha256(frame).hexdigest() == KAT_FRAME_SHA256
    assert rep.key_id == KAT_KEY_ID
    assert ctx.open_response(frame)[0] == b'{"echo":"hi"}'


KAT_KEY_ID = "9b7decc212539aee4f4e853c8b3036a7"
KAT_REQUEST_SHA256 = "e729cd08c3fb4afa02f6eb4f0185fb29878cd93d1743d6e0570cf195bc6842ea"
KAT_FRAME_SHA256 = "3d716530e6cfc282766c13d1b300c52292bbd3ba668c838d9b70b3eef3fc932a"


def test_round_trip_to_several_replicas(dev_key):
    reps = [_replica(dev_key) for _ in range(3)]
    vs = [_verified(r, dev_key) for r in reps]
    body, ctx = _call(reps[0], vs)
    assert set(peek_envelope(body).key_ids) == {r.key_id for r in reps}
    assert b"hi" not in body  # the gateway sees ciphertext only
    chosen = reps[2]
    o = chosen.open_request(body, now_ms=NOW * 1000)
    assert o.args_json == b'{"text":"hi"}'
    frame = chosen.seal_response(o.ctx, "c1", b'{"ok":true}', 3.0, 42)
    view = peek_response(frame)
    assert view.kind == "res" and view.receipt is not None and view.receipt.price_nanoton == 42
    view.receipt.verify(chosen.receipt_public_key)
    result, receipt = ctx.open_response(frame)
    assert result == b'{"ok":true}' and receipt.exec_ms == 3.0 and receipt.measurement == M
    assert receipt.request_sha256 == hashlib.sha256(body).hexdigest()


def test_streaming_ordered_and_end_authenticated(dev_key):
    rep = _replica(dev_key)
    body, ctx = _call(rep, _verified(rep, dev_key))
    o = rep.open_request(body, now_ms=NOW * 1000)
    frames = [rep.seal_chunk(o.ctx, i, json.dumps({"i": i}, separators=(",", ":")).encode()) for i in range(3)]
    frames.append(rep.seal_end(o.ctx, "c2", 9.5, 7))
    with pytest.raises(EnvelopeError) as ei:
        rep.seal_chunk(o.ctx, 4, b"{}")
    assert ei.value.check == "order"
    # reordered, dropped and truncated streams fail
    _, c2 = body, ctx
    with pytest.raises(EnvelopeError) as ei:
        c2.open_chunk(frames[1])
    assert ei.value.check == "order"
    items = [ctx.open_chunk(f) for f in frames[:3]]
    assert items == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    receipt = ctx.open_chunk(frames[3])
    assert not isinstance(receipt, bytes) and receipt.frames == 4 and receipt.price_nanoton == 7
    with pytest.raises(EnvelopeError):
        ctx.open_chunk(frames[3])


def test_sealed_function_error(dev_key):
    rep = _replica(dev_key)
    body, ctx = _call(rep, _verified(rep, dev_key))
    o = rep.open_request(body, now_ms=NOW * 1000)
    frame = rep.seal_error(o.ctx, "c3", "ValueError", "secret input was bad", 0.5, 0)
    assert b"secret input" not in frame
    with pytest.raises(FunctionError) as ei:
        ctx.open_response(frame)
    assert "secret input was bad" in ei.value.message and ei.value.details["exception_type"] == "ValueError"


def test_every_byte_of_the_request_is_authenticated(dev_key):
    rep = _replica(dev_key)
    body, _ = _call(rep, _verified(rep, dev_key), args=b'{"a":1}')
    for i in range(len(body)):
        bad = bytearray(body)
        bad[i] ^= 0x01
        fresh = ReplayGuard()
        rep.replay = fresh
        with pytest.raises(CocoonError):
            rep.open_request(bytes(bad), now_ms=NOW * 1000)
    rep.replay = ReplayGuard()
    assert rep.open_request(body, now_ms=NOW * 1000).args_json == b'{"a":1}'


def test_every_byte_of_the_response_is_authenticated(dev_key):
    rep = _replica(dev_key)
    v = _verified(rep, dev_key)
    body, _ = _call(rep, v)
    o = rep.open_request(body, now_ms=NOW * 1000)
    frame = rep.seal_response(o.ctx, "c4", b'{"r":1}', 1.0, 5)
    for i in range(len(frame)):
        for bit in (0, 5):
            bad = bytearray(frame)
            bad[i] ^= 1 << bit
            ctx = _fresh_ctx(body, v)
            with pytest.raises(CocoonError):
                ctx.open_response(bytes(bad))
    assert _fresh_ctx(body, v).open_response(frame)[0] == b'{"r":1}'


def _fresh_ctx(body, v):
    """A pristine context for an already-sealed body (same reply key), to open a frame again."""
    c = _CTX_CACHE[bytes(body)]
    return ClientCallContext(c.function, c.request_id, c.body, c.replicas, c.reply_key)


def test_replay_and_window(dev_key):
    rep = _replica(dev_key)
    body, _ = _call(rep, _verified(rep, dev_key))
    rep.open_request(body, now_ms=NOW * 1000)
    with pytest.raises(ReplayError) as ei:
        rep.open_request(body, now_ms=NOW * 1000 + 5)
    assert ei.value.check == "replay" and ei.value.status == 409
    other = _replica(dev_key)
    body2, _ = _call(other, _verified(other, dev_key))
    with pytest.raises(ReplayError) as ei:
        other.open_request(body2, now_ms=(NOW + 3600) * 1000)
    assert ei.value.check == "replay_window"


def test_replay_guard_is_bounded_and_never_readmits():
    g = ReplayGuard(window_s=60, capacity=3)
    for i in range(5):
        g.check(f"r{i}", 1000 + i, 2000)
    assert len(g._seen) == 3
    with pytest.raises(ReplayError):
        g.check("r0", 1000, 2000)  # forgotten id, but below the floor: still refused
    with pytest.raises(ReplayError):
        g.check("r4", 1004, 2000)


def test_replay_guard_keeps_honest_calls_whatever_timestamps_others_send():
    """A request dated at the window's future edge, then a full guard: honest requests keep passing (forgetting
    goes by timestamp, so the far-future id is forgotten last and never raises the floor over them)."""
    g = ReplayGuard(window_s=60, capacity=3)
    now = 1_000_000
    g.check("edge", now + 59_000, now)  # the attacker's request, accepted once like any other
    for i in range(20):  # honest callers, one per millisecond
        g.check(f"honest{i}", now + i, now + i)
    with pytest.raises(ReplayError):
        g.check("edge", now + 59_000, now + 30)  # still remembered: its replay is refused
    with pytest.raises(ReplayError):
        g.check("honest3", now + 3, now + 30)  # forgotten, but at or below the floor: still refused


def test_response_from_another_replica_or_call(dev_key):
    a, b = _replica(dev_key), _replica(dev_key)
    va = _verified(a, dev_key)
    body, ctx = _call(a, [va])
    # b was not sealed to: it cannot open, and a frame it makes for its own call is refused
    with pytest.raises(NotSealedToThisReplica) as ei:
        b.open_request(body, now_ms=NOW * 1000)
    assert ei.value.status == 421
    vb = _verified(b, dev_key)
    body_b, _ = _call(b, [vb])
    ob = b.open_request(body_b, now_ms=NOW * 1000)
    with pytest.raises(EnvelopeError) as ei:
        ctx.open_response(b.seal_response(ob.ctx, "x", b"{}", 1, 1))
    assert ei.value.check in ("request_id", "replica")
    # an answer to an earlier call of the same client is refused too
    body2, ctx2 = _call(a, [va])
    o1 = a.open_request(body, now_ms=NOW * 1000)
    with pytest.raises(EnvelopeError) as ei:
        ctx2.open_response(a.seal_response(o1.ctx, "x", b"{}", 1, 1))
    assert ei.value.check == "request_id"


def test_forged_receipt_and_wrong_measurement(dev_key):
    a = _replica(dev_key)
    va = _verified(a, dev_key)
    body, ctx = _call(a, [va])
    o = a.open_request(body, now_ms=NOW * 1000)
    a.measurement = "00" * 32  # a replica lying about what it runs, signing with its real key
    frame = a.seal_response(o.ctx, "x", b"{}", 1, 1)
    with pytest.raises(EnvelopeError) as ei:
        ctx.open_response(frame)
    assert ei.value.check == "measurement"
    # a receipt signed by someone else
    a2 = _replica(dev_key)
    body2, ctx2 = _call(a2, [_verified(a2, dev_key)])
    o2 = a2.open_request(body2, now_ms=NOW * 1000)
    a2._receipt_key = Ed25519PrivateKey.generate()
    with pytest.raises(EnvelopeError) as ei:
        ctx2.open_response(a2.seal_response(o2.ctx, "x", b"{}", 1, 1))
    assert ei.value.check == "receipt_signature"


def test_gateway_views_need_no_keys(dev_key):
    rep = _replica(dev_key)
    body, _ = _call(rep, _verified(rep, dev_key))
    hdr = peek_envelope(body)
    assert hdr.function == "echo" and len(hdr.request_id) == 32 and hdr.timestamp_ms == NOW * 1000
    for bad in (b"", b"CSQ1", b"XXXX" + body[4:], body[:4] + struct.pack(">I", 10**7) + body[8:]):
        with pytest.raises(EnvelopeError) as ei:
            peek_envelope(bad)
        assert ei.value.check == "envelope" and ei.value.status == 400


def test_body_is_the_buffer_the_content_was_encrypted_into(dev_key):
    rep = _replica(dev_key, seed=b"replica")
    v = _verified(rep, dev_key)
    body, ctx = seal_request(b'{"z":1}', "echo", [v], rng=fixed_rng(b"c"), now_ms=NOW * 1000)
    again, _ = seal_request(b'{"z":1}', "echo", [v], rng=fixed_rng(b"c"), now_ms=NOW * 1000)
    assert isinstance(body, bytearray) and body == again  # deterministic under fixed randomness
    hdr = peek_envelope(body)
    assert len(body) == hdr.header_end + len(b'{"z":1}') + 16  # one buffer: prefix, ciphertext, tag
    o = rep.open_request(bytes(body), now_ms=NOW * 1000)
    assert ctx.open_response(rep.seal_response(o.ctx, "z", b"1", 1, 1))[0] == b"1"


def test_version_1_envelopes_are_refused_by_version(dev_key):
    rep = _replica(dev_key)
    body, _ = _call(rep, _verified(rep, dev_key))
    with pytest.raises(EnvelopeError) as ei:
        peek_envelope(b"CSQ\x01" + bytes(body[4:]))
    assert ei.value.check == "envelope" and "version 1" in ei.value.message


class _Handle:
    def __init__(self, rep):
        self.extra = {"document": rep.document, "key_id": rep.key_id}


def test_gateway_checks_receipts_with_a_mac_sealed_to_the_replica(dev_key):
    from cocoon_faas.gateway.sealed import check_receipt, gateway_mac_key

    rep, other = _replica(dev_key), _replica(dev_key)
    handle = _Handle(rep)
    key, wrapped = gateway_mac_key(handle)
    assert gateway_mac_key(handle) == (key, wrapped)  # one key per replica
    body, ctx = _call(rep, _verified(rep, dev_key))
    o = rep.open_request(body, now_ms=NOW * 1000)
    frame = rep.seal_response(o.ctx, "call-9", b"1", 2.5, 10)
    tag = rep.gateway_tag(o.ctx, wrapped)
    assert tag is not None and rep.gateway_tag(o.ctx, wrapped) == tag
    kind, receipt = check_receipt(frame, handle, "call-9", tag)
    assert kind == "res" and receipt.exec_ms == 2.5 and receipt.price_nanoton == 10
    assert other.gateway_tag(o.ctx, wrapped) is None  # sealed to rep's key only
    for bad_tag in ("00" * 32, tag[:-2] + ("00" if tag[-2:] != "00" else "01")):
        with pytest.raises(CocoonError) as ei:
            check_receipt(frame, handle, "call-9", bad_tag)
        assert ei.value.status == 502
    with pytest.raises(CocoonError):
        check_receipt(frame, handle, "another-call", tag)  # names another call
    # an edited receipt (exec time) fails the MAC, and without a tag the signature check catches it
    rb = peek_response(frame).receipt.raw
    edited = bytearray(frame)
    pos = len(frame) - 64 - 16
    edited[pos] ^= 1
    assert bytes(edited[-len(rb):]) != rb
    for t in (tag, None):
        with pytest.raises(CocoonError):
            check_receipt(bytes(edited), handle, "call-9", t)
    assert check_receipt(frame, handle, "call-9", None)[0] == "res"  # signature fallback
    assert ctx.open_response(frame)[0] == b"1"


def test_replica_ephemerals_are_made_ahead_and_used_once(dev_key):
    rep = _replica(dev_key)
    v = _verified(rep, dev_key)
    rep.prepare()
    encs = set()
    for _ in range(3):
        body, ctx = _call(rep, v)
        o = rep.open_request(body, now_ms=NOW * 1000)
        frame = rep.seal_response(o.ctx, "c", b"1", 1, 1)
        encs.add(peek_response(frame).enc)
        assert ctx.open_response(frame)[0] == b"1"
        rep.prepare()
    assert len(encs) == 3
