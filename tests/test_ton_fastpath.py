"""The fast SignedSemiChannel BOC reader agrees with the general pytoniq-core path, or steps aside."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pytoniq_core import Cell

from cocoon_faas.errors import PaymentError
from cocoon_faas.ton.channel import SemiChannel, SemiChannelBody, SignedSemiChannel, _fast_signed_state
from cocoon_faas.ton.keys import PrivateKey

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "ton" / "payment_channel_vectors.json"


def _slow(boc: bytes) -> SignedSemiChannel:
    return SignedSemiChannel.from_cell(Cell.one_from_boc(boc))


def test_random_states_parse_identically() -> None:
    rng = random.Random(7)
    key = PrivateKey(b"\x05" * 32)
    for _ in range(400):
        cp = None if rng.random() < 0.3 else SemiChannelBody(rng.getrandbits(rng.choice([0, 8, 64])),
                                                             rng.getrandbits(rng.choice([0, 1, 8, 40, 120])))
        body = SemiChannelBody(rng.getrandbits(rng.choice([0, 1, 64])), rng.getrandbits(rng.choice([0, 7, 9, 120])))
        st = SemiChannel(rng.getrandbits(rng.choice([1, 64, 128])), body, cp).sign(key)
        fast = _fast_signed_state(st.to_boc())
        assert fast is not None and fast == _slow(st.to_boc())
        assert fast.signed_hash() == st.state.to_cell().hash and fast.is_signed_by(key.public_key())


def test_vectors_and_other_encodings() -> None:
    v = json.loads(VECTORS.read_text())
    for name in ("signedSemiA3_boc", "signedSemiB3_boc"):
        boc = bytes.fromhex(v[name]) if all(c in "0123456789abcdefABCDEF" for c in v[name]) else None
        if boc is None:
            import base64

            boc = base64.b64decode(v[name])
        fast = SignedSemiChannel.from_boc(boc)
        assert fast == _slow(boc) and fast.signed_hash() == _slow(boc).signed_hash()
    st = SemiChannel(9, SemiChannelBody(3, 10**9), SemiChannelBody(0, 0)).sign(PrivateKey(b"\x06" * 32))
    cell = st.to_cell()
    for other in (cell.to_boc(has_idx=True), cell.to_boc(hash_crc32=True)):
        got = SignedSemiChannel.from_boc(other)  # fast or general path: the same state and signed hash
        assert got == st and got.signed_hash() == st.state.to_cell().hash


def test_tampering_and_truncation() -> None:
    key = PrivateKey(b"\x06" * 32)
    boc = bytearray(SemiChannel(9, SemiChannelBody(3, 10**9)).sign(key).to_boc())
    boc[-3] ^= 1  # a bit of `sent`
    assert not SignedSemiChannel.from_boc(bytes(boc)).is_signed_by(key.public_key())
    for cut in (5, 20, len(boc) - 1):
        with pytest.raises(PaymentError):
            SignedSemiChannel.from_boc(bytes(boc[:cut]))


def test_counterparty_cells_are_reused_only_for_the_same_bytes() -> None:
    """The reader keeps parsed counterparty cells by their exact bytes: a repeated cell gives the same body and
    signed hash as pytoniq-core, another cell (a new payee state) is parsed afresh, a cell that is not a plain
    body is never kept, and the cache stays bounded."""
    from cocoon_faas.ton import channel as ch

    key = PrivateKey(b"\x09" * 32)
    for seqno in range(1, 4):  # the same counterparty body each time: the second and third reuse the first
        st = SemiChannel(11, SemiChannelBody(seqno, 10**6 * seqno), SemiChannelBody(2, 0)).sign(key)
        got = SignedSemiChannel.from_boc(st.to_boc())
        assert got == _slow(st.to_boc()) and got.signed_hash() == st.state.to_cell().hash
    other = SemiChannel(11, SemiChannelBody(9, 10**7), SemiChannelBody(3, 5)).sign(key)
    got = SignedSemiChannel.from_boc(other.to_boc())
    assert got.state.counterparty == SemiChannelBody(3, 5) and got.signed_hash() == other.state.to_cell().hash
    # a counterparty body carrying conditionals is not what the fast reader reads: general path, nothing kept
    cond = SemiChannel(11, SemiChannelBody(10, 10**7),
                       SemiChannelBody(4, 0, SemiChannelBody(1, 1).to_cell())).sign(key)
    before = dict(ch._COUNTERPARTY)
    assert _fast_signed_state(cond.to_boc()) is None and ch._COUNTERPARTY == before
    assert SignedSemiChannel.from_boc(cond.to_boc()) == _slow(cond.to_boc())
    # a kept cell tampered with by one bit is another key: read afresh, and the signature no longer verifies
    boc = bytearray(SemiChannel(11, SemiChannelBody(12, 10**7), SemiChannelBody(2, 0)).sign(key).to_boc())
    boc[-2] ^= 0x10  # inside the counterparty's seqno
    forged = SignedSemiChannel.from_boc(bytes(boc))
    assert forged == _slow(bytes(boc)) and not forged.is_signed_by(key.public_key())
    for i in range(ch._COUNTERPARTY_MAX + 10):  # many distinct payee states: the cache is cleared, never grows
        boc_i, _ = ch.StateTemplate(11, SemiChannelBody(i, 0)).build(1, 1, lambda h: bytes(64))
        assert _fast_signed_state(boc_i).state.counterparty == SemiChannelBody(i, 0)  # type: ignore[union-attr]
        assert len(ch._COUNTERPARTY) <= ch._COUNTERPARTY_MAX


def test_bytearray_and_memoryview_inputs_read_the_same() -> None:
    st = SemiChannel(5, SemiChannelBody(3, 10**9), SemiChannelBody(0, 0)).sign(PrivateKey(b"\x06" * 32))
    boc = st.to_boc()
    for form in (bytearray(boc), memoryview(boc)):
        fast = _fast_signed_state(form)  # type: ignore[arg-type]
        assert fast is not None and fast == st and fast.signed_hash() == st.state.to_cell().hash
