"""The real payment-channel contract in a TVM emulator, side by side with our local rules.

The compiled contract is taken at test time from the `tonweb` npm package (PAYMENT_CHANNEL_CODE_HEX) and run
with `pytvm`; nothing of it is committed. Every message goes to both the emulator and
`cocoon_faas.ton.rules.apply`; they must agree on the exit code, the new storage cell (by hash) and the payouts.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from pytoniq_core import Cell, Slice, begin_cell
from pytoniq_core.tlb.transaction import OutList

from cocoon_faas.ton import rules
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.channel import (
    CHANNEL_CODE_DEPTH,
    CHANNEL_CODE_HASH,
    ChannelConfig,
    ChannelData,
    ClosingConfig,
    SemiChannel,
    SemiChannelBody,
)
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import (
    ChallengeQuarantinedState,
    CooperativeClose,
    CooperativeCommit,
    FinishUncooperativeClose,
    InitChannel,
    StartUncooperativeClose,
    TopUp,
    sign_close,
    sign_commit,
)
from cocoon_faas.ton.wallet import Wallet

T = 10**9
TONWEB = "tonweb@0.0.66"


def _contract_code() -> Cell:
    cache = Path(os.environ.get("COCOON_TEST_CACHE", Path(tempfile.gettempdir()) / "cocoon-test-cache"))
    js = cache / "package" / "src" / "contract" / "payments" / "PaymentChannel.js"
    if not js.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot fetch the compiled contract from the tonweb package")
        cache.mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run(["npm", "pack", TONWEB, "--silent"], cwd=cache, capture_output=True, text=True,
                                 timeout=120, check=True).stdout.strip().splitlines()[-1]
        except (subprocess.SubprocessError, IndexError, OSError) as exc:
            pytest.skip(f"npm registry unavailable ({exc}): cannot fetch {TONWEB}")
        with tarfile.open(cache / out) as tar:
            tar.extractall(cache, filter="data")
    m = re.search(r"PAYMENT_CHANNEL_CODE_HEX\s*=\s*'([0-9A-Fa-f]+)'", js.read_text())
    assert m, "tonweb no longer ships PAYMENT_CHANNEL_CODE_HEX"
    code = Cell.one_from_boc(bytes.fromhex(m.group(1)))
    assert code.hash == CHANNEL_CODE_HASH and code.get_depth() == CHANNEL_CODE_DEPTH
    return code


@pytest.fixture(scope="module")
def code() -> Cell:
    return _contract_code()


def _engine():  # type: ignore[no-untyped-def]
    pytvm = pytest.importorskip("pytvm", reason="pytvm (TVM emulator) is not installed")
    from pytvm.engine import EmulatorEngineC

    lib = next(Path(pytvm.__file__).parent.joinpath("engine").glob("libemulator*"), None)
    if lib is None:
        pytest.skip("pytvm ships no emulator library for this platform")
    eng = EmulatorEngineC(str(lib))
    # pytvm 0.0.14 declares the balance and the message value as 32-bit C ints (the C API takes uint64):
    # amounts above 4.29 TON would wrap. Declare them as the library defines them.
    eng.lib.tvm_emulator_set_c7.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint64,
                                            ctypes.c_char_p, ctypes.c_char_p]
    eng.lib.tvm_emulator_send_internal_message.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64]
    eng.emulator_set_verbosity_level(0)
    return eng


class SideBySide:
    """One channel contract, run in TVM and in our rules; asserts agreement on each message."""

    def __init__(self, code: Cell, cfg: ChannelConfig) -> None:
        from pytvm.tvm_emulator import TvmEmulator
        from pytvm.utils import DEFAULT_CONFIG_BOC

        self._tvm_cls, self.engine = TvmEmulator, _engine()
        self.config_cell = Cell.one_from_boc(DEFAULT_CONFIG_BOC)
        self.code, self.cfg = code, cfg
        self.data = cfg.initial_data()
        self.balance = 0
        self.now = 1_700_000_000
        self.paid: list[rules.Payout] = []

    def send(self, body: Cell, value: int = T // 20) -> int:
        balance = self.balance + value
        ours = rules.apply(self.data, body, balance, self.now)
        em = self._tvm_cls(self.code, self.data.to_cell(), engine=self.engine)
        em.set_c7(self.cfg.address.raw, self.now, balance, "00" * 32, self.config_cell)
        from pytvm.utils import b64_to_cell

        res = em.raw_send_internal_message(body, value)
        assert res.get("success") in (True, "True"), f"emulator failed: {res.get('error')}"
        tvm_exit = int(res["vm_exit_code"])
        assert ours.exit_code == tvm_exit, f"rules say {ours.exit_code}, contract says {tvm_exit}"
        if tvm_exit != 0:
            self.balance = balance  # bounced value minus gas in reality; irrelevant here
            return tvm_exit
        new_data = b64_to_cell(res["new_data"])
        assert new_data.hash == ours.data.to_cell().hash, "storage differs from the contract's"
        assert ChannelData.from_cell(new_data) == ours.data
        out = OutList.deserialize(Slice.one_from_boc(base64.b64decode(res["actions"]))) if res["actions"] else []
        actions = [(a.out_msg.info.dest, a.out_msg.info.value.grams, a.mode, a.out_msg.body) for a in out]
        assert [(Address(d.wc, d.hash_part).raw, amt, mode) for d, amt, mode, _ in actions] == [
            (p.dest.raw, p.amount, p.mode) for p in ours.payouts]
        for *_, out_body in actions:
            s = out_body.begin_parse()
            assert s.load_uint(32) == 0xDDDC88BA and s.load_uint(128) == self.cfg.channel_id
        self.data = ours.data
        self.balance = balance
        for p in ours.payouts:
            amount = self.balance if p.mode & 128 else min(p.amount, self.balance)
            self.balance -= amount
            self.paid.append(rules.Payout(p.dest, amount, p.mode))
        return 0


KA, KB = PrivateKey(b"\x01" * 32), PrivateKey(b"\x02" * 32)
WA, WB = Wallet(KA.public_key()).address, Wallet(KB.public_key()).address
CLOSING = ClosingConfig(quarantine_duration=100, misbehavior_fine=T // 10, conditional_close_duration=50)


def _cfg(channel_id: int) -> ChannelConfig:
    return ChannelConfig(channel_id, KA.public_key(), KB.public_key(), WA, WB, CLOSING, excess_fee=0)


def _open(chain: SideBySide, deposit: int) -> None:
    cid = chain.cfg.channel_id
    assert chain.send(TopUp(deposit).to_cell(), deposit + T // 20) == 0
    # bad inits: wrong signer, foreign channel, balance below the topped-up one, a forged tag
    assert chain.send(InitChannel(True, KB.sign(InitChannel.payload(cid, deposit, 0).hash), cid, deposit,
                                  0).to_cell()) == 101
    assert chain.send(InitChannel.signed(KA, True, cid + 1, deposit, 0).to_cell()) == 114
    assert chain.send(InitChannel.signed(KA, True, cid, deposit - 1, 0).to_cell()) == 102
    assert chain.send(InitChannel.signed(KA, True, cid, deposit, 10 * T).to_cell()) == 102
    assert chain.send(InitChannel.signed(KA, True, cid, deposit, 0).to_cell()) == 0
    assert chain.send(InitChannel.signed(KA, True, cid, deposit, 0).to_cell()) == 100
    assert chain.send(TopUp(T).to_cell(), T) == 100


def _raw_close(cid: int, tag: int, args: tuple[int, ...], sigs: tuple[bytes, bytes]) -> Cell:
    payload = (begin_cell().store_uint(tag, 32).store_uint(cid, 128).store_coins(args[0]).store_coins(args[1])
               .store_uint(args[2], 64).store_uint(args[3], 64).end_cell())
    return (begin_cell().store_uint(0x5577587E, 32).store_ref(begin_cell().store_bytes(sigs[0]).end_cell())
            .store_ref(begin_cell().store_bytes(sigs[1]).end_cell()).store_cell(payload).end_cell())


def test_cooperative_lifecycle_with_our_client(code: Cell, tmp_path: Path) -> None:
    cid, deposit = 7001, 5 * T
    chain = SideBySide(code, _cfg(cid))
    _open(chain, deposit)
    # off-chain: our client pays 40 calls with holds; the payee tracks the charges
    signer = ChannelSigner(tmp_path / "ch.json", KA, cid, deposit)
    charged = 0
    for i in range(40):
        ticket = signer.sign_for_call(hold=10_000_000)
        assert ticket.state.is_signed_by(KA.public_key())
        cost = 1_000_000 + i * 1000
        signer.complete(ticket, cost)
        charged += cost
    assert signer.charged == charged and signer.sent >= charged
    seqno_a, seqno_b = signer.seqno, 2  # B never signed a state; its close seqno must pass the commit below
    args = (cid, deposit - charged, charged, seqno_a, seqno_b)
    sa, sb = sign_close(KA, *args), sign_close(KB, *args)
    # bad closes first: forged B signature, wrong tag, foreign id, regressing seqnos (after a commit)
    assert chain.send(CooperativeClose(sa, KA.sign(b"x" * 32), *args).to_cell()) == 101
    assert chain.send(_raw_close(cid, 0x11111111, args[1:], (sa, sb))) == 104
    assert chain.send(CooperativeClose(sa, sb, cid + 5, *args[1:]).to_cell()) == 114
    assert chain.send(CooperativeCommit(sign_commit(KA, cid, 1, 1), sign_commit(KB, cid, 1, 1), cid, 1, 1)
                      .to_cell()) == 0
    stale = (cid, deposit - charged, charged, 1, 1)
    assert chain.send(CooperativeClose(sign_close(KA, *stale), sign_close(KB, *stale), *stale).to_cell()) == 108
    assert chain.send(CooperativeClose(sa, sb, *args).to_cell()) == 0
    payouts = {p.dest.raw: p for p in chain.paid}
    assert payouts[WB.raw].amount == charged  # the payee gets exactly what was charged
    assert payouts[WA.raw].mode == 130 and payouts[WA.raw].amount == chain.paid[-1].amount
    assert payouts[WA.raw].amount >= deposit - charged
    assert not chain.data.inited and chain.data.committed_seqno_a == seqno_a
    # a replay of the close after it settled is refused
    assert chain.send(CooperativeClose(sa, sb, *args).to_cell()) == 108


def test_uncooperative_close_with_challenge(code: Cell, tmp_path: Path) -> None:
    cid, deposit = 7002, 3 * T
    chain = SideBySide(code, _cfg(cid))
    _open(chain, deposit)
    signer = ChannelSigner(tmp_path / "ch.json", KA, cid, deposit)
    t1 = signer.sign_for_call(hold=T // 2)
    signer.complete(t1, T // 2)
    old_a = signer.latest()
    t2 = signer.sign_for_call(hold=T // 2)
    signer.complete(t2, T // 4)
    new_a = signer.latest()
    b_state = SemiChannel(cid, SemiChannelBody(1, 0), SemiChannelBody(0, 0)).sign(KB)
    forged_b = SemiChannel(cid, SemiChannelBody(1, 0), SemiChannelBody(0, 0)).sign(KA)
    assert chain.send(FinishUncooperativeClose().to_cell()) == 107
    assert chain.send(ChallengeQuarantinedState.signed(KA, True, cid, new_a, b_state).to_cell()) == 107
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, old_a, forged_b).to_cell()) == 101
    assert chain.send(StartUncooperativeClose.signed(KA, False, cid, old_a, b_state).to_cell()) == 101
    # A (the payer) starts a close with an old state of its own, hoping to pay less
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, old_a, b_state).to_cell()) == 0
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, new_a, b_state).to_cell()) == 106
    assert chain.send(ChallengeQuarantinedState.signed(KA, True, cid, new_a, b_state).to_cell()) == 109
    chain.now += 10
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, new_a, b_state).to_cell()) == 0
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, new_a, b_state).to_cell()) == 115
    assert chain.send(FinishUncooperativeClose().to_cell()) == 113
    chain.now += 200
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, new_a, b_state).to_cell()) == 111
    assert chain.send(FinishUncooperativeClose().to_cell()) == 0
    payouts = {p.dest.raw: p.amount for p in chain.paid}
    # B gets A's latest sent plus the misbehaviour fine for A's stale commit
    assert payouts[WB.raw] == new_a.state.data.sent + CLOSING.misbehavior_fine
    assert chain.data.committed_seqno_a == new_a.state.data.seqno + 1


def test_error_table_agrees(code: Cell) -> None:
    """Odd messages: unknown op, truncated bodies, starts with states below the committed seqnos."""
    cid = 7003
    chain = SideBySide(code, _cfg(cid))
    assert chain.send(begin_cell().store_uint(0xDEADBEEF, 32).end_cell()) == 0xFFFF
    assert chain.send(begin_cell().store_uint(0x67C7D281, 32).end_cell()) == 9
    assert chain.send(begin_cell().store_uint(1, 8).end_cell()) == 9
    _open(chain, 2 * T)
    assert chain.send(CooperativeCommit(sign_commit(KA, cid, 5, 5), sign_commit(KB, cid, 5, 5), cid, 5, 5)
                      .to_cell()) == 0
    a = SemiChannel(cid, SemiChannelBody(3, T // 10), SemiChannelBody(0, 0)).sign(KA)
    b = SemiChannel(cid, SemiChannelBody(6, 0), SemiChannelBody(3, T // 10)).sign(KB)
    assert chain.send(StartUncooperativeClose.signed(KB, False, cid, a, b).to_cell()) == 105
    a_ok = SemiChannel(cid, SemiChannelBody(7, T // 10), SemiChannelBody(6, 0)).sign(KA)
    b_lying = SemiChannel(cid, SemiChannelBody(6, 0), SemiChannelBody(7, T)).sign(KB)  # claims A sent more
    assert chain.send(StartUncooperativeClose.signed(KB, False, cid, a_ok, b_lying).to_cell()) == 105
    assert chain.send(StartUncooperativeClose(False, KB.sign(b"\0" * 32), cid, a_ok, b).to_cell()) == 101
    assert chain.send(StartUncooperativeClose.signed(KB, False, cid, a_ok, b).to_cell()) == 0
