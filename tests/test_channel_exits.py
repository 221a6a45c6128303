"""Every way a channel ends, step by step, with the exit code of each step: in the real contract (pytvm) side by side
with our rules, and on the local chain (which runs those rules on its own clock) with the gateway's watchtower.

Paths: the caller's forced close (honest), a forced close with a stale state (challenged and fined), the operator's
forced close, the cooperative close; refusals: finish before the quarantine ends (113), challenge after it (111),
by the wrong side (109), twice (115), states or messages with a bad signature (101), a second start (106).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from pytoniq_core import Cell

from cocoon_faas.errors import InvalidRequestError, PaymentError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import FeePolicy, PaymentGate
from cocoon_faas.gateway.watchtower import Watchtower
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.chain import MESSAGE_FEE, LocalChain, require_ok
from cocoon_faas.ton.channel import (
    ChannelConfig,
    ClosingConfig,
    SemiChannel,
    SemiChannelBody,
    SignedSemiChannel,
)
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.closing import (
    ClosingTerms,
    check_closing,
    check_exit_state,
    operator_exit_state,
    phase_of,
    spendable,
)
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import (
    ChallengeQuarantinedState,
    CooperativeClose,
    FinishUncooperativeClose,
    InitChannel,
    StartUncooperativeClose,
    TopUp,
    sign_close,
)
from cocoon_faas.ton.wallet import Wallet
from tests.test_ton_contract import KA, KB, WA, WB, SideBySide, _contract_code

T = 10**9
GAS = 50_000_000
TERMS = ClosingTerms(quarantine_s=100, conditional_close_s=20, fine_bps=1000)
DEP = 2 * T
CLOSING = TERMS.config_for(DEP)
HOLD = 30_000_000


@pytest.fixture(scope="module")
def code() -> Cell:
    return _contract_code()


def _pair(code: Cell, cid: int, tmp_path: Path) -> tuple[SideBySide, ChannelSigner]:
    cfg = ChannelConfig(cid, KA.public_key(), KB.public_key(), WA, WB, CLOSING)
    chain = SideBySide(code, cfg)
    assert chain.send(TopUp(DEP).to_cell(), DEP + GAS) == 0
    assert chain.send(InitChannel.signed(KA, True, cid, DEP, 0).to_cell()) == 0
    signer = ChannelSigner(tmp_path / f"{cid}.json", KA, cid, DEP, limit=spendable(DEP, CLOSING))
    return chain, signer


def _pay(signer: ChannelSigner, n: int, cost: int = 10_000_000) -> list[tuple[int, int, bytes]]:
    """n calls, each holding HOLD and charged `cost`; the (seqno, sent, boc) the operator would store."""
    got = []
    for _ in range(n):
        t = signer.sign_for_call(HOLD)
        got.append((t.seqno, t.state.state.data.sent, t.state.to_boc()))
        signer.complete(t, cost)
    return got


def _paid_to(chain: SideBySide, addr: object) -> int:
    return sum(p.amount for p in chain.paid if p.dest == addr)


def test_caller_closes_alone_every_step(code: Cell, tmp_path: Path) -> None:
    cid = 8101
    chain, signer = _pair(code, cid, tmp_path)
    _pay(signer, 5)
    charged = signer.charged
    exit_state = operator_exit_state(KB, cid)
    check_exit_state(exit_state, KB.public_key(), cid)
    mine = signer.close_state(charged)
    assert mine.state.data.seqno == 6 and mine.state.data.sent == charged < signer.sent
    assert chain.send(FinishUncooperativeClose().to_cell()) == 107  # nothing to finish yet
    forged_b = SemiChannel(cid, SemiChannelBody(0, 0)).sign(KA)  # "the operator's" state signed by the caller
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, mine, forged_b).to_cell()) == 101
    not_mine = SemiChannel(cid, SemiChannelBody(7, 0), SemiChannelBody(0, 0)).sign(PrivateKey(b"\x05" * 32))
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, not_mine, exit_state).to_cell()) == 101
    assert chain.send(StartUncooperativeClose.signed(KB, True, cid, mine, exit_state).to_cell()) == 101
    start = chain.now
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, mine, exit_state).to_cell()) == 0
    ph = phase_of(chain.data, chain.now)
    assert (ph.name, ph.started_by, ph.challenge_until, ph.finish_after) == ("quarantine", "caller", start + 100,
                                                                              start + 120)
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, mine, exit_state).to_cell()) == 106
    assert chain.send(ChallengeQuarantinedState.signed(KA, True, cid, mine, exit_state).to_cell()) == 109
    assert chain.send(FinishUncooperativeClose().to_cell()) == 113
    chain.now = start + 100  # the quarantine is over: a challenge is too late, the conditional window runs
    assert phase_of(chain.data, chain.now).name == "settling"
    latest = SemiChannel(cid, SemiChannelBody(signer.seqno + 5, signer.sent), SemiChannelBody(0, 0)).sign(KA)
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, latest, exit_state).to_cell()) == 111
    chain.now = start + 120
    assert phase_of(chain.data, chain.now).name == "awaiting_finish"
    assert chain.send(FinishUncooperativeClose().to_cell()) == 113  # strictly after quarantine + window
    chain.now += 1
    assert chain.send(FinishUncooperativeClose().to_cell()) == 0
    assert _paid_to(chain, WB) == charged  # the operator gets what it charged, not the holds signed for
    assert _paid_to(chain, WA) >= DEP - charged
    assert phase_of(chain.data, chain.now).name == "closed"
    assert chain.data.committed_seqno_a == mine.state.data.seqno + 1
    assert chain.send(FinishUncooperativeClose().to_cell()) == 107


def test_stale_close_is_challenged_and_fined(code: Cell, tmp_path: Path) -> None:
    cid = 8102
    chain, signer = _pair(code, cid, tmp_path)
    states = _pay(signer, 6)
    charged = signer.charged
    stale = SemiChannel(cid, SemiChannelBody(signer.seqno + 1, charged // 3), SemiChannelBody(0, 0)).sign(KA)
    exit_state = operator_exit_state(KB, cid)
    start = chain.now
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, stale, exit_state).to_cell()) == 0
    chain.now += 50
    # the operator's best: the tightest stored state covering what was charged (an older seqno, a higher sent)
    seqno, sent, boc = min((s for s in states if s[1] >= charged), key=lambda s: s[1])
    best = SignedSemiChannel.from_boc(boc)
    forged = ChallengeQuarantinedState(False, KA.sign(b"\x00" * 32), cid, best, exit_state)
    assert chain.send(forged.to_cell()) == 101
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, best, exit_state).to_cell()) == 0
    assert chain.data.quarantine is not None and chain.data.quarantine.challenged
    assert chain.data.quarantine.state_a.sent == sent + CLOSING.misbehavior_fine
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, best, exit_state).to_cell()) == 115
    chain.now = start + 120
    assert chain.send(FinishUncooperativeClose().to_cell()) == 113
    chain.now += 1
    assert chain.send(FinishUncooperativeClose().to_cell()) == 0
    assert _paid_to(chain, WB) == sent + CLOSING.misbehavior_fine and sent >= charged > charged // 3
    assert seqno < stale.state.data.seqno


def test_operator_closes_alone(code: Cell, tmp_path: Path) -> None:
    cid = 8103
    chain, signer = _pair(code, cid, tmp_path)
    states = _pay(signer, 3)
    exit_state = operator_exit_state(KB, cid)
    best = SignedSemiChannel.from_boc(states[-1][2])
    start = chain.now
    assert chain.send(StartUncooperativeClose.signed(KB, False, cid, best, exit_state).to_cell()) == 0
    assert phase_of(chain.data, chain.now).started_by == "operator"
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, best, exit_state).to_cell()) == 109
    # the caller may challenge; the operator's state (seqno 0, nothing sent) is its only one, so nothing changes
    assert chain.send(ChallengeQuarantinedState.signed(KA, True, cid, best, exit_state).to_cell()) == 0
    assert chain.data.quarantine is not None and chain.data.quarantine.state_a.sent == best.state.data.sent
    chain.now = start + 121
    assert chain.send(FinishUncooperativeClose().to_cell()) == 0
    assert _paid_to(chain, WB) == best.state.data.sent


def test_cooperative_close_with_a_closing_config(code: Cell, tmp_path: Path) -> None:
    cid = 8104
    chain, signer = _pair(code, cid, tmp_path)
    _pay(signer, 4)
    args = (cid, DEP - signer.charged, signer.charged, signer.seqno, 1)
    bad = CooperativeClose(sign_close(KA, *args), sign_close(KA, *args), *args)
    assert chain.send(bad.to_cell()) == 101
    assert chain.send(CooperativeClose(sign_close(KA, *args), sign_close(KB, *args), *args).to_cell()) == 0
    assert _paid_to(chain, WB) == signer.charged
    assert phase_of(chain.data, chain.now).name == "closed"


def test_a_fine_past_the_deposit_would_lock_the_channel(code: Cell, tmp_path: Path) -> None:
    """Why no state may send more than deposit - fine: the contract's finish then fails for good (exit 5)."""
    cid = 8105
    chain, _ = _pair(code, cid, tmp_path)
    over = SemiChannel(cid, SemiChannelBody(2, DEP - CLOSING.misbehavior_fine + 1), SemiChannelBody(0, 0)).sign(KA)
    stale = SemiChannel(cid, SemiChannelBody(1, 0), SemiChannelBody(0, 0)).sign(KA)
    exit_state = operator_exit_state(KB, cid)
    assert chain.send(StartUncooperativeClose.signed(KA, True, cid, stale, exit_state).to_cell()) == 0
    assert chain.send(ChallengeQuarantinedState.signed(KB, False, cid, over, exit_state).to_cell()) == 0
    chain.now += 200
    assert chain.send(FinishUncooperativeClose().to_cell()) == 5
    assert chain.send(FinishUncooperativeClose().to_cell()) == 5


def test_caller_checks_terms_and_the_exit_state_before_funding() -> None:
    check_closing(CLOSING, DEP, 200)
    for bad, why in ((ClosingConfig(0, 0, 0), "zero quarantine"), (ClosingConfig(150, 0, 60), "longer"),
                     (ClosingConfig(100, DEP // 2, 0), "fine")):
        with pytest.raises(InvalidRequestError, match=why):
            check_closing(bad, DEP, 200)
    with pytest.raises(PaymentError, match="not signed"):
        check_exit_state(SemiChannel(9, SemiChannelBody(0, 0)).sign(KA), KB.public_key(), 9)
    with pytest.raises(PaymentError, match="seqno-0"):
        check_exit_state(operator_exit_state(KB, 9), KB.public_key(), 10)
    with pytest.raises(PaymentError, match="seqno-0"):
        check_exit_state(SemiChannel(9, SemiChannelBody(1, 0)).sign(KB), KB.public_key(), 9)
    assert spendable(DEP, CLOSING) == DEP - DEP // 10


# --- the local chain and the watchtower -------------------------------------------------------------------------

OP, CALLER = PrivateKey(b"\x17" * 32), PrivateKey(b"\x18" * 32)


class ContractCheckedChain(LocalChain):
    """The local chain with every message also run in the real contract (TVM, SideBySide): the chain's verdict
    must be the contract's (exit code, storage, payouts), so each step the watchtower or a caller takes below is
    checked against the contract too."""

    def __init__(self, path: Path, clock: Any, code: Cell) -> None:
        super().__init__(path, clock=clock)
        self.code = code
        self.sides: dict[str, SideBySide] = {}
        self.verdicts: list[int] = []

    def send_to_channel(self, key: PrivateKey, wallet: Wallet, cfg: ChannelConfig, body: Cell,
                        value: int) -> Any:
        side = self.sides.get(cfg.address.raw) or self.sides.setdefault(cfg.address.raw, SideBySide(self.code, cfg))
        side.data = self.channel_data(cfg) or cfg.initial_data()
        side.balance, side.now = self.contract_balance(cfg), self.now()
        contract = side.send(body, value)  # asserts our rules agree with the contract
        res = super().send_to_channel(key, wallet, cfg, body, value)
        assert res.exit_code == contract, (res.exit_code, contract)
        if contract == 0:
            assert self.channel_data(cfg) == side.data
        self.verdicts.append(contract)
        return res


class Env:
    """A local chain on a settable clock (each message checked in the real contract), the operator's ledger, gate
    and watchtower, and one funded caller."""

    def __init__(self, tmp_path: Path, cid: int, code: Cell, db: object = None) -> None:
        self.t = [1_800_000_000]
        self.chain = ContractCheckedChain(tmp_path / "chain.db", lambda: self.t[0], code)
        self.ledger = Ledger(db if db is not None else tmp_path / "ledger.db", home=tmp_path)  # type: ignore[arg-type]
        self.gate = PaymentGate(self.ledger, OP, FeePolicy(bps=500), chain=self.chain, terms=TERMS)
        self.tower = Watchtower(self.ledger, self.chain, OP, interval_s=0.01)
        self.cid = cid
        self.wallet = Wallet(CALLER.public_key())
        self.chain.faucet(self.wallet.address, 3 * T)
        self.cfg = ChannelConfig(cid, CALLER.public_key(), OP.public_key(), self.wallet.address,
                                 Wallet(OP.public_key()).address, CLOSING)
        self.send(TopUp(DEP).to_cell(), 0, DEP + GAS)
        self.send(InitChannel.signed(CALLER, True, cid, DEP, 0).to_cell(), 0)
        self.gate.register(cid, CALLER.public_key(), self.wallet.address, closing=CLOSING)
        self.signer = ChannelSigner(tmp_path / "signer.json", CALLER, cid, DEP, limit=spendable(DEP, CLOSING))
        self.exit_state = operator_exit_state(OP, cid)

    def send(self, body: Cell, expect: int, value: int = GAS) -> None:
        assert self.chain.send_to_channel(CALLER, self.wallet, self.cfg, body, value).exit_code == expect

    def pay(self, n: int) -> None:
        for i in range(n):
            t = self.signer.sign_for_call(HOLD)
            hold = self.gate.authorize(t.header, f"call-{self.signer.seqno}-{i}", "f", HOLD)
            self.signer.complete(t, self.gate.settle(hold, "prov", 7_000_000, "dev", 1_000_000))

    def op_paid(self) -> int:
        return sum(a for d, a in self.chain.payouts(self.cfg) if d == self.cfg.dest_b)

    def caller_paid(self) -> int:
        return sum(a for d, a in self.chain.payouts(self.cfg) if d == self.cfg.dest_a)


def test_watchtower_wins_against_a_stale_close_on_the_local_chain(code: Cell, tmp_path: Path, database: Any) -> None:
    """On both ledger backends (SQLite, PostgreSQL): the books and the chain agree after the challenge."""
    env = Env(tmp_path, 501, code, database())
    env.pay(5)
    charged = env.ledger.channel(501).charged
    assert charged == env.signer.charged > 0
    assert env.tower.tick() == []  # an open channel: nothing to do
    stale = env.signer.close_state(charged // 2)
    env.send(StartUncooperativeClose.signed(CALLER, True, 501, stale, env.exit_state).to_cell(), 0)
    env.t[0] += 10
    acts = env.tower.tick()
    assert [(a.what, a.exit_code) for a in acts] == [("saw_close", 0), ("challenged", 0)]
    assert env.ledger.channel(501).status == "quarantine"
    late = env.signer.sign_for_call(HOLD)
    with pytest.raises(PaymentError, match="closing on chain") as refused:
        env.gate.authorize(late.header, "late", "f", HOLD)
    assert refused.value.status == 409
    env.signer.complete(late, 0)
    q = env.chain.channel_data(env.cfg).quarantine  # type: ignore[union-attr]
    assert q is not None and q.challenged and q.state_a.sent >= charged + CLOSING.misbehavior_fine
    assert env.tower.tick() == []  # challenged once; nothing more until it is due
    env.send(FinishUncooperativeClose().to_cell(), 113)  # the caller tries to finish early
    env.t[0] += 111
    acts = env.tower.tick()
    assert [(a.what, a.exit_code) for a in acts] == [("finished", 0), ("recorded", 0)]
    (close,) = env.ledger.closes()
    assert close["how"] == "forced_by_caller_challenged" and close["paid_b"] == env.op_paid()
    assert close["adjustment"] == env.op_paid() - charged >= CLOSING.misbehavior_fine
    assert env.caller_paid() >= DEP - env.op_paid()
    v = env.ledger.verify()
    assert v["ok"], v["problems"]
    bal = env.ledger.balances()
    assert sum(bal["caller"].values()) == env.op_paid()  # the ledger's debit of the caller = the chain's payout
    assert env.tower.tick() == []  # closed channels are no longer watched
    # every step, in the real contract too: top-up, init, the stale start, the challenge, an early finish, finish
    assert env.chain.verdicts == [0, 0, 0, 0, 113, 0]
    assert env.tower.check_payouts() == {"checked": 1, "problems": []}
    # books that agree with themselves but not with the chain are caught by the chain check alone
    with env.ledger.transaction() as tx:
        tx.execute("UPDATE pay_closes SET paid_b = paid_b + 1, adjustment = adjustment + 1")
        tx.execute("UPDATE pay_balances SET amount = amount + 1 WHERE party IN ('caller', 'operator')")
    assert env.ledger.verify()["ok"]
    (problem,) = env.tower.check_payouts()["problems"]
    assert f"the chain paid the operator {env.op_paid()} nanoton, the ledger books {env.op_paid() + 1}" in problem


def test_watchtower_leaves_an_honest_close_alone_and_finishes_it(code: Cell, tmp_path: Path) -> None:
    env = Env(tmp_path, 502, code)
    env.pay(3)
    charged = env.signer.charged
    env.send(StartUncooperativeClose.signed(CALLER, True, 502, env.signer.close_state(charged), env.exit_state)
             .to_cell(), 0)
    assert [a.what for a in env.tower.tick()] == ["saw_close"]
    env.t[0] += 120
    env.send(FinishUncooperativeClose().to_cell(), 113)
    assert [a.what for a in env.tower.tick()] == []  # not due yet: quarantine + window must have passed
    env.t[0] += 1
    env.send(FinishUncooperativeClose().to_cell(), 0)  # the caller finishes it itself
    acts = env.tower.tick()
    assert [(a.what, a.exit_code) for a in acts] == [("recorded", 0)]
    (close,) = env.ledger.closes()
    assert close == {"channel_id": 502, "how": "forced_by_caller", "charged": charged, "paid_a": DEP - charged,
                     "paid_b": charged, "adjustment": 0}
    assert env.op_paid() == charged and env.ledger.verify()["ok"]


def test_a_close_made_while_the_gateway_was_down_is_booked_from_the_chain(code: Cell, tmp_path: Path) -> None:
    env = Env(tmp_path, 509, code)
    env.pay(2)
    charged = env.signer.charged
    env.send(StartUncooperativeClose.signed(CALLER, True, 509, env.signer.close_state(charged), env.exit_state)
             .to_cell(), 0)
    env.t[0] += 121
    env.send(FinishUncooperativeClose().to_cell(), 0)  # the watchtower never ran in between
    assert [a.what for a in env.tower.tick()] == ["recorded"]
    (close,) = env.ledger.closes()
    assert close["how"] == "closed_unwatched" and close["paid_b"] == env.op_paid() == charged
    assert env.ledger.verify()["ok"] and env.tower.check_payouts()["problems"] == []


def test_operator_closes_a_channel_alone(code: Cell, tmp_path: Path) -> None:
    env = Env(tmp_path, 503, code)
    env.pay(4)
    charged = env.signer.charged
    out = env.tower.start_operator_close(503)
    assert out["phase"] == "quarantine" and out["sent"] >= charged
    assert env.ledger.channel(503).status == "quarantine"
    env.send(StartUncooperativeClose.signed(CALLER, True, 503, env.signer.close_state(charged), env.exit_state)
             .to_cell(), 106)
    assert env.tower.tick() == []
    env.t[0] += 121
    assert [(a.what, a.exit_code) for a in env.tower.tick()] == [("finished", 0), ("recorded", 0)]
    (close,) = env.ledger.closes()
    assert close["how"] == "forced_by_operator" and close["paid_b"] == out["sent"] == env.op_paid()
    assert env.ledger.verify()["ok"]


def test_cooperative_close_is_booked_from_the_chain(code: Cell, tmp_path: Path) -> None:
    env = Env(tmp_path, 504, code)
    env.pay(2)
    charged = env.signer.charged
    args = (504, DEP - charged, charged, env.signer.seqno, 1)
    env.ledger.set_status(504, "closing")  # what POST /v1/channels/{id}/close does when it signs
    require_ok(env.chain.send_to_channel(CALLER, env.wallet, env.cfg, CooperativeClose(
        sign_close(CALLER, *args), sign_close(OP, *args), *args).to_cell(), GAS), "close")
    assert [a.what for a in env.tower.tick()] == ["recorded"]
    assert env.ledger.closes()[0]["how"] == "cooperative" and env.op_paid() == charged
    assert env.ledger.verify()["ok"]


def test_watchtower_errors_stay_inside_the_watchtower(code: Cell, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    env = Env(tmp_path, 505, code)
    env.pay(1)
    # a row with no payout address (imported by hand): skipped, never a crash
    env.ledger.add_channel(507, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "not-an-address", DEP,
                           closing=CLOSING)
    real = env.chain.channel_data
    calls = {"n": 0}

    def flaky(cfg: ChannelConfig):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if cfg.channel_id == 505 and calls["n"] == 1:
            raise ConnectionError("liteserver went away")
        return real(cfg)

    env.send(StartUncooperativeClose.signed(CALLER, True, 505, env.signer.close_state(0), env.exit_state)
             .to_cell(), 0)
    env.chain.channel_data = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="cocoon.watchtower"):
        assert env.tower.tick() == []  # the hiccup is logged, not raised
    assert "liteserver went away" in caplog.text
    assert [a.what for a in env.tower.tick()] == ["saw_close", "challenged"]

    ticks = {"n": 0}

    def tick() -> list[object]:
        ticks["n"] += 1
        if ticks["n"] == 1:
            raise RuntimeError("boom")
        return []

    env.tower.tick = tick  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(env.tower.run())
        for _ in range(500):
            await asyncio.sleep(0.01)
            if ticks["n"] >= 2:
                break
        task.cancel()
        assert not task.done() or task.cancelled()

    asyncio.run(main())
    assert ticks["n"] >= 2  # the loop went on after a round raised


def test_local_chain_charges_fees_for_refused_steps(code: Cell, tmp_path: Path) -> None:
    env = Env(tmp_path, 508, code)
    before = env.chain.balance(env.wallet.address)
    env.send(FinishUncooperativeClose().to_cell(), 107)
    assert env.chain.balance(env.wallet.address) == before - MESSAGE_FEE  # a bounced message costs only the fee


def test_watchtower_on_the_ton_backend_sends_a_challenge_the_contract_accepts(code: Cell, tmp_path: Path) -> None:
    """The `ton` backend: the watchtower reads the quarantine with get_channel_data (the real contract in the
    emulator), signs a wallet transfer carrying its challenge; delivered to the contract, the challenge wins."""
    from pytoniq_core.tlb.transaction import MessageAny

    from cocoon_faas.ton.tonlib import TonChain
    from tests.test_ton_backend import EmulatedNet

    cid, now = 8201, 1_700_000_000
    cfg = ChannelConfig(cid, KA.public_key(), KB.public_key(), WA, WB, CLOSING)
    side = SideBySide(code, cfg)  # the contract, fed by hand with what the network would deliver
    side.now = now
    assert side.send(TopUp(DEP).to_cell(), DEP + GAS) == 0
    assert side.send(InitChannel.signed(KA, True, cid, DEP, 0).to_cell()) == 0
    ledger = Ledger(tmp_path / "ledger.db")
    net = EmulatedNet()
    net.accounts[cfg.address.raw] = (code, side.data.to_cell())
    chain = TonChain(net, clock=lambda: side.now)
    gate = PaymentGate(ledger, KB, chain=chain, terms=TERMS)
    gate.register(cid, KA.public_key(), WA, closing=CLOSING)
    signer = ChannelSigner(tmp_path / "s.json", KA, cid, DEP, limit=spendable(DEP, CLOSING))
    for i in range(3):
        t = signer.sign_for_call(HOLD)
        signer.complete(t, gate.settle(gate.authorize(t.header, f"c{i}", "f", HOLD), "p", 9_000_000, "d", 0))
    stale = signer.close_state(signer.charged // 4)
    assert side.send(StartUncooperativeClose.signed(KA, True, cid, stale, operator_exit_state(KB, cid))
                     .to_cell()) == 0
    net.accounts[cfg.address.raw] = (code, side.data.to_cell())
    side.now += 30
    tower = Watchtower(ledger, chain, KB)
    acts = tower.tick()
    assert [(a.what, a.exit_code) for a in acts] == [("saw_close", 0), ("challenged", 0)]
    (boc,) = net.sent  # one external message to the operator's wallet
    ext = MessageAny.deserialize(Cell.one_from_boc(boc).begin_parse())
    inner = MessageAny.deserialize(ext.body.refs[0].begin_parse())  # the wallet's one outgoing message
    assert Address(inner.info.dest.wc, inner.info.dest.hash_part) == cfg.address
    assert side.send(inner.body, inner.info.value.grams) == 0  # the contract accepts the challenge
    assert side.data.quarantine is not None and side.data.quarantine.challenged
    assert side.data.quarantine.state_a.sent >= signer.charged + CLOSING.misbehavior_fine
    net.accounts[cfg.address.raw] = (code, side.data.to_cell())
    side.now += 121
    net.sent.clear()
    # the challenged split shows now (remembered: it is what the finish pays), the finish is sent, and the
    # network's answer shows on a later round
    assert [a.what for a in tower.tick()] == ["saw_close", "finished"]
    inner = MessageAny.deserialize(MessageAny.deserialize(Cell.one_from_boc(net.sent[0]).begin_parse())
                                   .body.refs[0].begin_parse())
    assert side.send(inner.body, inner.info.value.grams) == 0
    net.accounts[cfg.address.raw] = (code, side.data.to_cell())
    assert [a.what for a in tower.tick()] == ["recorded"]
    (close,) = ledger.closes()
    assert close["paid_b"] == sum(p.amount for p in side.paid if p.dest == WB) and ledger.verify()["ok"]
