"""Known-answer tests: every value of testdata/ton/*.json reproduced by cocoon_faas.ton (cells by hash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytoniq_core import Cell

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.amounts import format_ton, to_nano
from cocoon_faas.ton.channel import (
    CHANNEL_CODE_HASH,
    ChannelConfig,
    ChannelData,
    SemiChannel,
    SemiChannelBody,
    SignedSemiChannel,
)
from cocoon_faas.ton.keys import PrivateKey, is_valid_mnemonic, new_mnemonic
from cocoon_faas.ton.messages import (
    CooperativeClose,
    FinishUncooperativeClose,
    InitChannel,
    StartUncooperativeClose,
    TopUp,
    parse_message,
    sign_close,
    sign_commit,
)
from cocoon_faas.ton.wallet import Wallet

DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "ton"
V = json.loads((DATA / "payment_channel_vectors.json").read_text())
M = json.loads((DATA / "mnemonic_vector.json").read_text())
T = 10**9
KA, KB = PrivateKey(bytes.fromhex(V["seedA"])), PrivateKey(bytes.fromhex(V["seedB"]))


def boc(name: str) -> Cell:
    return Cell.one_from_boc(bytes.fromhex(V[name]))


def config() -> ChannelConfig:
    assert V["walletClass"] == "v3R1"
    return ChannelConfig(124, KA.public_key(), KB.public_key(), Wallet(KA.public_key(), "v3r1").address,
                         Wallet(KB.public_key(), "v3r1").address)


def test_mnemonic_vector() -> None:
    key = PrivateKey.from_mnemonic(M["words"])
    assert key.seed.hex() == M["seed32"]
    assert key.public_key().hex() == M["pub"]


def test_new_mnemonic_is_valid_and_rejects_typos() -> None:
    words = new_mnemonic()
    assert len(words) == 24 and is_valid_mnemonic(words)
    assert PrivateKey.from_mnemonic(words).public_key() == PrivateKey.from_mnemonic(words).public_key()
    swapped = list(M["words"])
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(InvalidRequestError):
        PrivateKey.from_mnemonic(swapped)


def test_keys_and_wallet_addresses() -> None:
    assert KA.public_key().hex() == V["pubA"] and KB.public_key().hex() == V["pubB"]
    wa, wb = Wallet(KA.public_key(), "v3r1").address, Wallet(KB.public_key(), "v3r1").address
    assert wa.raw == V["walletA_raw"] and wb.raw == V["walletB_raw"]
    assert wa.friendly() == V["walletA_friendly_b_url"]
    assert wa.friendly(bounceable=False) == V["walletA_friendly_nb_url"]
    assert wb.friendly() == V["walletB_friendly_b_url"]
    for text in (V["walletA_raw"], V["walletA_friendly_b_url"], V["walletA_friendly_nb_url"]):
        assert Address.parse(text) == wa
    bad = V["walletA_friendly_b_url"][:-2] + ("AA" if not V["walletA_friendly_b_url"].endswith("AA") else "BB")
    with pytest.raises(InvalidRequestError):
        Address.parse(bad)


def test_channel_data_stateinit_and_address() -> None:
    cfg = config()
    data = cfg.initial_data().to_cell()
    assert data.hash.hex() == V["data_hash"] == boc("data_boc").hash.hex()
    assert ChannelData.from_cell(boc("data_boc")) == cfg.initial_data()
    assert CHANNEL_CODE_HASH.hex() == V["code_hash"]
    assert cfg.address.hash.hex() == V["stateinit_hash"]
    assert cfg.address.raw == V["channel_raw"] and cfg.address.friendly() == V["channel_friendly"]


def test_state1_signature() -> None:
    # tonweb always includes the counterparty body, even at seqno 0
    st = SemiChannel(124, SemiChannelBody(1, T // 10), SemiChannelBody(0, 0))
    signed = st.sign(KA)
    assert signed.signature.hex() == V["sigA_state1"]
    assert signed.is_signed_by(KA.public_key()) is V["verifyB_state1"]
    assert not signed.is_signed_by(KB.public_key())


def test_state3_signed_semichannels() -> None:
    a3 = SemiChannel(124, SemiChannelBody(2, 0), SemiChannelBody(1, 8 * T // 10)).sign(KA)
    b3 = SemiChannel(124, SemiChannelBody(1, 8 * T // 10), SemiChannelBody(2, 0)).sign(KB)
    assert a3.signature.hex() == V["sigA_state3"] and b3.signature.hex() == V["sigB_state3"]
    assert a3.to_cell().hash == boc("signedSemiA3_boc").hash
    assert b3.to_cell().hash == boc("signedSemiB3_boc").hash
    assert V["signedSemiA3_sig_equals_signState"] and V["signedSemiB3_sig_equals_signState"]
    assert SignedSemiChannel.from_cell(boc("signedSemiA3_boc")) == a3
    assert SignedSemiChannel.from_boc(b3.to_boc()) == b3
    msg = StartUncooperativeClose.signed(KA, True, 124, a3, b3)
    assert msg.to_cell().hash == boc("startUncoopClose_byA_boc").hash
    assert parse_message(boc("startUncoopClose_byA_boc")) == msg


def test_cooperative_close_and_commit() -> None:
    args = (124, 18 * T // 10, 12 * T // 10, 2, 1)
    sa, sb = sign_close(KA, *args), sign_close(KB, *args)
    assert sa.hex() == V["sigA_close3"] and sb.hex() == V["sigB_close3"]
    msg = CooperativeClose(sa, sb, *args)
    assert msg.to_cell().hash == boc("coopClose_boc").hash
    assert parse_message(boc("coopClose_boc")) == msg
    assert sign_commit(KA, 124, 2, 1).hex() == V["coopCommit_sigA"]


def test_init_topup_finish() -> None:
    init = InitChannel.signed(KA, True, 124, T, 2 * T)
    assert init.to_cell().hash == boc("initChannel_boc").hash
    assert parse_message(boc("initChannel_boc")) == init
    assert TopUp(T).to_cell().hash == boc("topUpA_boc").hash
    assert parse_message(boc("topUpA_boc")) == TopUp(T, 0)
    assert FinishUncooperativeClose().to_cell().hash == boc("finishUncoop_boc").hash


def test_amounts() -> None:
    assert to_nano("5") == 5 * T and to_nano("0.05") == 5 * 10**7 and to_nano(2) == 2 * T
    assert format_ton(1_500_000_000) == "1.5" and format_ton(1) == "0.000000001"
    for bad in ("0.0000000001", "x", 0.1, "-1"):
        with pytest.raises(InvalidRequestError):
            to_nano(bad)  # type: ignore[arg-type]
