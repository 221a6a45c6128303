"""The payment-channel contract's rules as a pure function: (storage, message, balance, now) -> outcome.

This is what the local chain runs instead of a TVM. It follows the contract's code step by step, in the
same order, so that for any message it accepts and rejects exactly what the contract does, with the same
exit code, and leaves a bit-identical storage cell (tests/test_ton_contract.py runs both side by side).
Exit codes: 100 already inited / 101 bad signature / 102 balances / 104 wrong tag / 105 outdated state /
106 quarantine already active / 107 no quarantine / 108 seqno regress / 109 wrong challenger /
110 quarantine not finished / 111 quarantine already finished / 112 too late to settle /
113 too early to finish / 114 wrong channel id / 115 already challenged / 0xffff unknown op /
9 cell underflow (a truncated message) / 5 integer out of range (a finish that would pay A a negative amount).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pytoniq_core import Cell, Slice
from pytoniq_core.boc.tvm_bitarray import TvmBitarrayUnderflowException

from cocoon_faas.ton.address import Address
from cocoon_faas.ton.channel import TAG_SEMICHANNEL, ChannelData, QuarantinedState, SemiChannelBody
from cocoon_faas.ton.keys import PublicKey
from cocoon_faas.ton.messages import (
    OP_CHALLENGE,
    OP_COOPERATIVE_CLOSE,
    OP_COOPERATIVE_COMMIT,
    OP_FINISH_UNCOOPERATIVE_CLOSE,
    OP_INIT,
    OP_SETTLE_CONDITIONALS,
    OP_START_UNCOOPERATIVE_CLOSE,
    OP_TOP_UP,
    TAG_CHALLENGE,
    TAG_CLOSE,
    TAG_COMMIT,
    TAG_INIT,
    TAG_SETTLE,
    TAG_START_UNCOOPERATIVE_CLOSE,
)

ERR_NAMES = {
    0: "ok", 5: "integer out of range", 9: "cell underflow", 100: "already inited", 101: "wrong signature", 102: "wrong balances",
    104: "wrong tag", 105: "outdated state", 106: "quarantine already active", 107: "no quarantine",
    108: "seqno regress", 109: "wrong challenger", 110: "quarantine not finished",
    111: "quarantine already finished", 112: "too late to settle conditionals", 113: "too early to finish",
    114: "wrong channel id", 115: "already challenged", 0xFFFF: "unknown op",
}


class ContractExit(Exception):
    """Raised inside `apply` to abort like THROW; carries the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"exit code {code} ({ERR_NAMES.get(code, '?')})")
        self.code = code


@dataclass(frozen=True)
class Payout:
    """One outgoing message of the contract: value `amount`, or with mode 128 the whole remaining balance."""

    dest: Address
    amount: int
    mode: int


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    data: ChannelData
    payouts: tuple[Payout, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.exit_code == 0


def _check(cond: bool, code: int) -> None:
    if not cond:
        raise ContractExit(code)


def _sig_ok(key: PublicKey, sig: bytes, rest: Slice) -> bool:
    return key.is_valid(sig, rest.to_cell().hash)


def _tag_and_id(s: Slice, tag: int, channel_id: int) -> None:
    _check(s.load_uint(32) == tag, 104)
    _check(s.load_uint(128) == channel_id, 114)


def _one_sig(d: ChannelData, s: Slice, tag: int) -> tuple[bool, Slice]:
    by_a = s.load_int(1) != 0
    sig = s.load_bytes(64)
    _check(_sig_ok(d.key_a if by_a else d.key_b, sig, s), 101)
    _tag_and_id(s, tag, d.channel_id)
    return by_a, s


def _two_sigs(d: ChannelData, s: Slice, tag: int) -> Slice:
    sig_a = s.load_ref().begin_parse().load_bytes(64)
    sig_b = s.load_ref().begin_parse().load_bytes(64)
    msg_hash = s.to_cell().hash
    _tag_and_id(s, tag, d.channel_id)
    _check(d.key_a.is_valid(sig_a, msg_hash) and d.key_b.is_valid(sig_b, msg_hash), 101)
    return s


def _signed_semichannel(cell: Cell, key: PublicKey) -> Slice:
    s = cell.begin_parse()
    sig = s.load_bytes(64)
    _check(_sig_ok(key, sig, s), 101)
    return s


def _parse_semichannel(s: Slice, channel_id: int) -> tuple[SemiChannelBody, int, int]:
    """-> own body, counterparty seqno and sent as seen by this side (-1, -1 when absent)."""
    _tag_and_id(s, TAG_SEMICHANNEL, channel_id)
    body = SemiChannelBody.load(s)
    if s.load_int(1) == 0:
        return body, -1, -1
    cp = SemiChannelBody.from_cell(s.load_ref())
    return body, cp.seqno, cp.sent


def _two_states(d: ChannelData, s: Slice) -> tuple[SemiChannelBody, SemiChannelBody, int, int, int, int]:
    ca = _signed_semichannel(s.load_ref(), d.key_a)
    cb = _signed_semichannel(s.load_ref(), d.key_b)
    a, seqno_b_ref_a, sent_b_ref_a = _parse_semichannel(ca, d.channel_id)
    b, seqno_a_ref_b, sent_a_ref_b = _parse_semichannel(cb, d.channel_id)
    _check(a.seqno >= d.committed_seqno_a and b.seqno >= d.committed_seqno_b and b.seqno >= seqno_b_ref_a
           and a.seqno >= seqno_a_ref_b and b.sent >= sent_b_ref_a and a.sent >= sent_a_ref_b, 105)
    return a, b, seqno_a_ref_b, seqno_b_ref_a, sent_a_ref_b, sent_b_ref_a


def _close(d: ChannelData, total: int) -> tuple[ChannelData, tuple[Payout, ...]]:
    mode_b = 128 if d.balance_b > total else 2
    payouts = (Payout(d.payment.dest_b, d.balance_b, mode_b), Payout(d.payment.dest_a, d.balance_a, 130))
    return replace(d, inited=False, balance_a=0, balance_b=0, quarantine=None), payouts


def _apply(d: ChannelData, body: Cell, balance: int, now: int) -> tuple[ChannelData, tuple[Payout, ...]]:
    s = body.begin_parse()
    op = s.load_uint(32)
    if op == OP_TOP_UP:
        _check(not d.inited, 100)
        add_a, add_b = s.load_coins(), s.load_coins()
        d = replace(d, balance_a=d.balance_a + add_a, balance_b=d.balance_b + add_b)
        _check(d.balance_a + d.balance_b <= balance, 102)
        return d, ()
    if op == OP_INIT:
        _check(not d.inited, 100)
        _, s = _one_sig(d, s, TAG_INIT)
        new_a, new_b = s.load_coins(), s.load_coins()
        _check(new_a >= d.balance_a and new_b >= d.balance_b, 102)
        _check(new_a + new_b + d.payment.excess_fee < balance, 102)
        return replace(d, balance_a=new_a, balance_b=new_b, inited=True), ()
    if op == OP_COOPERATIVE_CLOSE:
        s = _two_sigs(d, s, TAG_CLOSE)
        bal_a, bal_b = s.load_coins(), s.load_coins()
        seqno_a, seqno_b = s.load_uint(64), s.load_uint(64)
        d = replace(d, balance_a=bal_a, balance_b=bal_b)
        _check(d.committed_seqno_a < seqno_a and d.committed_seqno_b < seqno_b, 108)
        return _close(replace(d, committed_seqno_a=seqno_a, committed_seqno_b=seqno_b), balance)
    if op == OP_COOPERATIVE_COMMIT:
        s = _two_sigs(d, s, TAG_COMMIT)
        seqno_a, seqno_b = s.load_uint(64), s.load_uint(64)
        _check(d.committed_seqno_a < seqno_a and d.committed_seqno_b < seqno_b, 108)
        q = d.quarantine
        if q is not None and (seqno_a > q.state_a.seqno or seqno_b > q.state_b.seqno):
            q = None
        return replace(d, committed_seqno_a=seqno_a, committed_seqno_b=seqno_b, quarantine=q), ()
    if op == OP_START_UNCOOPERATIVE_CLOSE:
        _check(d.quarantine is None, 106)
        by_a, s = _one_sig(d, s, TAG_START_UNCOOPERATIVE_CLOSE)
        a, b, *_ = _two_states(d, s)
        return replace(d, quarantine=QuarantinedState(a, b, now, by_a, False)), ()
    if op == OP_CHALLENGE:
        _check(d.quarantine is not None, 107)
        by_a, s = _one_sig(d, s, TAG_CHALLENGE)
        a, b, seqno_a_ref_b, seqno_b_ref_a, _, _ = _two_states(d, s)
        if seqno_b_ref_a > 0:
            _check(seqno_b_ref_a >= d.committed_seqno_b, 105)
        if seqno_a_ref_b > 0:
            _check(seqno_a_ref_b >= d.committed_seqno_a, 105)
        q = d.quarantine
        assert q is not None
        _check(q.quarantine_starts + d.closing.quarantine_duration > now, 111)
        _check(not q.challenged, 115)
        if q.committed_by_a:
            misbehaved = a.seqno > q.state_a.seqno or a.sent > q.state_a.sent
            fin_a, fin_b = a, q.state_b
        else:
            misbehaved = b.seqno > q.state_b.seqno or b.sent > q.state_b.sent
            fin_a, fin_b = q.state_a, b
        _check(q.committed_by_a != by_a, 109)
        if misbehaved:
            fine = d.closing.misbehavior_fine
            if q.committed_by_a:
                fin_a = replace(fin_a, sent=fin_a.sent + fine)
            else:
                fin_b = replace(fin_b, sent=fin_b.sent + fine)
        return replace(d, quarantine=QuarantinedState(fin_a, fin_b, q.quarantine_starts, by_a, True)), ()
    if op == OP_SETTLE_CONDITIONALS:
        _check(d.quarantine is not None, 107)
        _, s = _one_sig(d, s, TAG_SETTLE)
        conditionals = s.load_maybe_ref()
        q = d.quarantine
        assert q is not None
        finished = q.quarantine_starts + d.closing.quarantine_duration
        _check(finished < now, 110)
        _check(finished + d.closing.conditional_close_duration > now, 112)
        if conditionals is not None:
            raise NotImplementedError("conditional payments are not used by Cocoon; the local chain rejects them")
        return replace(d, quarantine=replace(q, challenged=None)), ()
    if op == OP_FINISH_UNCOOPERATIVE_CLOSE:
        q = d.quarantine
        _check(q is not None, 107)
        assert q is not None
        _check(q.quarantine_starts + d.closing.quarantine_duration + d.closing.conditional_close_duration < now,
               113)
        bal_a = d.balance_a + q.state_b.sent - q.state_a.sent
        bal_b = d.balance_b + q.state_a.sent - q.state_b.sent
        if bal_b < 0:
            bal_a, bal_b = bal_a + bal_b, 0
        if bal_a < 0:  # the contract zeroes B here too (sic), leaving A negative: storing it fails the range
            raise ContractExit(5)  # check, so the close can never finish (closing.spendable keeps clear of it)
        d = replace(d, balance_a=bal_a, balance_b=bal_b, committed_seqno_a=q.state_a.seqno + 1,
                    committed_seqno_b=q.state_b.seqno + 1)
        return _close(d, balance)
    raise ContractExit(0xFFFF)


def apply(data: ChannelData, body: Cell, balance: int, now: int) -> Outcome:
    """Run one internal message against the channel; `balance` includes the message's value."""
    try:
        new, payouts = _apply(data, body, balance, now)
    except ContractExit as exc:
        return Outcome(exc.code, data)
    except (TvmBitarrayUnderflowException, IndexError, ValueError, TypeError):  # ran off the end of a slice, as TVM's cell underflow
        return Outcome(9, data)
    return Outcome(0, new, payouts)


def channel_state(d: ChannelData, now: int) -> int:
    """get_channel_state: 0 uninited, 1 open, 2 closure started, 3 settling conditionals, 4 awaiting finish."""
    if not d.inited:
        return 0
    q = d.quarantine
    if q is None:
        return 1
    if q.quarantine_starts + d.closing.quarantine_duration > now:
        return 2
    if q.quarantine_starts + d.closing.quarantine_duration + d.closing.conditional_close_duration > now:
        return 3
    return 4
