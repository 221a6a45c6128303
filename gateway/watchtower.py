"""The operator's watchtower: follows every open channel on the settlement chain and defends the operator's claim.

Each round (`tick`, every COCOON_WATCHTOWER_INTERVAL_S; the gateway runs `run` as a background task) and per
channel:

- a close under way (the contract holds a quarantine): the channel stops serving calls (status ``quarantine``)
  and the split is remembered. When the caller started it with a state that sends less than the ledger charged,
  and the quarantine still runs, the watchtower challenges with the stored state that covers the charges (and
  the holds in flight) most tightly; the contract then also fines the caller. A caller's close that already pays
  what was charged is left alone: challenging it would take holds that were never charged.
- a close that is due (quarantine and conditional window over): the watchtower sends the finish itself.
- a channel no longer initialised on chain: closed. What the operator was paid (from the last quarantine seen, or
  the cooperative close it signed) is booked with `Ledger.record_close`, so `cocoon ledger --verify` matches the
  chain's payouts to the nanoton.

`start_operator_close` is the operator's own forced exit (the caller vanished, or the operator leaves). Errors in one
channel are logged and never stop the rest, nor the task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytoniq_core import Cell

from cocoon_faas.errors import ConflictError, InvalidRequestError
from cocoon_faas.ton import rules
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.chain import require_ok
from cocoon_faas.ton.channel import (
    ChannelConfig,
    ChannelData,
    ClosingConfig,
    QuarantinedState,
    SignedSemiChannel,
)
from cocoon_faas.ton.closing import operator_exit_state, phase_of, started_by_a
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.messages import (
    ChallengeQuarantinedState,
    FinishUncooperativeClose,
    StartUncooperativeClose,
)
from cocoon_faas.ton.wallet import Wallet

from .ledger import ChannelRow, Ledger

log = logging.getLogger("cocoon.watchtower")

GAS = 50_000_000  # 0.05 TON attached to each message (what the contract does not burn goes to the caller)
LOCAL_GAS_FLOAT = 10**9  # the local dev chain: the operator's wallet is topped up from the faucet to this


@dataclass(frozen=True)
class Action:
    """What one round did for one channel (for logs and tests)."""

    channel_id: int
    what: str  # saw_close | challenged | finished | recorded
    exit_code: int = 0
    detail: str = ""


def split_of(deposit: int, q: QuarantinedState, closing: ClosingConfig, channel_id: int,
             cfg: ChannelConfig) -> tuple[int, int]:
    """(to caller, to operator) of a finish on quarantine `q`, by the contract's own rule (rules.apply)."""
    data = ChannelData(True, deposit, 0, cfg.key_a, cfg.key_b, channel_id, closing, 0, 0, q, cfg.payment)
    out = rules.apply(data, FinishUncooperativeClose().to_cell(), deposit, 2**32 - 1)
    if not out.accepted:
        raise ConflictError(f"channel {channel_id}: the quarantined split cannot be finished (exit "
                            f"{out.exit_code}: {rules.ERR_NAMES.get(out.exit_code, '?')})", exit_code=out.exit_code)
    paid_b = next(p.amount for p in out.payouts if p.dest == cfg.dest_b)
    return deposit - paid_b, paid_b


class Watchtower:
    """See the module docstring. `chain` is the settlement backend (LocalChain or TonChain)."""

    def __init__(self, ledger: Ledger, chain: Any, operator_key: PrivateKey, interval_s: float = 10.0) -> None:
        self.ledger, self.chain, self.key = ledger, chain, operator_key
        self.wallet = Wallet(operator_key.public_key())
        self.interval_s = interval_s

    def config(self, ch: ChannelRow) -> ChannelConfig:
        return ChannelConfig(ch.channel_id, ch.key_a, ch.key_b, Address.parse(ch.caller), self.wallet.address,
                             ch.closing)

    def _now(self) -> int:
        return int(self.chain.now())

    def _send_result(self, cfg: ChannelConfig, body: Cell) -> Any:
        if hasattr(self.chain, "faucet") and self.chain.balance(self.wallet.address) < GAS * 4:
            self.chain.faucet(self.wallet.address, LOCAL_GAS_FLOAT)  # dev chain only: gas for the watchtower
        return self.chain.send_to_channel(self.key, self.wallet, cfg, body, GAS)

    def _send(self, cfg: ChannelConfig, body: Cell) -> int:
        return int(self._send_result(cfg, body).exit_code)

    # -- one round ---------------------------------------------------------------------------------------------
    def tick(self) -> list[Action]:
        actions: list[Action] = []
        for ch in self.ledger.watched_channels():
            try:
                actions.extend(self.watch(ch))
            except Exception:  # noqa: BLE001  one bad channel (or a chain hiccup) must not blind the rest
                log.exception("watchtower: channel %s", ch.channel_id)
        return actions

    def watch(self, ch: ChannelRow) -> list[Action]:
        try:
            cfg = self.config(ch)
        except (InvalidRequestError, ValueError):
            return []  # registered without a payout address (tests, imports): nothing on chain to watch
        data = self.chain.channel_data(cfg)
        if data is None:
            return []
        if not data.inited:
            return [self._record_closed(ch, cfg, data)]
        q = data.quarantine
        if q is None:
            return []
        out: list[Action] = []
        if ch.chain_q is None or QuarantinedState.from_cell(Cell.one_from_boc(ch.chain_q)) != q:
            self.ledger.saw_quarantine(ch.channel_id, q.to_cell().to_boc())
            out.append(Action(ch.channel_id, "saw_close", detail=f"by {'caller' if started_by_a(q) else 'operator'}"
                              f", sent {q.state_a.sent}"))
        now = self._now()
        ph = phase_of(data, now)
        assert ph.challenge_until is not None and ph.finish_after is not None
        if q.committed_by_a and not q.challenged and now < ph.challenge_until:
            act = self._maybe_challenge(ch, cfg, q)
            if act is not None:
                out.append(act)
                data = self.chain.channel_data(cfg) or data
                if data.quarantine is not None:
                    self.ledger.saw_quarantine(ch.channel_id, data.quarantine.to_cell().to_boc())
        elif now > ph.finish_after:
            code = self._send(cfg, FinishUncooperativeClose().to_cell())
            out.append(Action(ch.channel_id, "finished", code))
            after = self.chain.channel_data(cfg)
            if after is not None and not after.inited:
                out.append(self._record_closed(self.ledger.channel(ch.channel_id), cfg, after))
        return out

    def _maybe_challenge(self, ch: ChannelRow, cfg: ChannelConfig, q: QuarantinedState) -> Action | None:
        if q.state_a.sent >= ch.charged:
            return None  # the close pays every charge; in-flight holds are re-checked next round
        owed = ch.charged + self.ledger.reserved(ch.channel_id)
        best = self.ledger.best_state(ch.channel_id, owed)
        if best is None or best[1] <= q.state_a.sent:
            log.error("watchtower: channel %s closes with sent %s below the %s charged, and no stored state beats "
                      "it", ch.channel_id, q.state_a.sent, ch.charged)
            return None
        a_state = SignedSemiChannel.from_boc(best[2])
        msg = ChallengeQuarantinedState.signed(self.key, False, ch.channel_id, a_state,
                                               operator_exit_state(self.key, ch.channel_id))
        code = self._send(cfg, msg.to_cell())
        (log.warning if code == 0 else log.error)(
            "watchtower: channel %s: challenged a stale close (sent %s < charged %s) with seqno %s sent %s: exit %s",
            ch.channel_id, q.state_a.sent, ch.charged, best[0], best[1], code)
        return Action(ch.channel_id, "challenged", code, f"seqno {best[0]} sent {best[1]}")

    def _record_closed(self, ch: ChannelRow, cfg: ChannelConfig, data: ChannelData) -> Action:
        """The channel is no longer initialised on chain: book what the operator was paid."""
        paid_a: int | None
        paid_b: int | None
        q = QuarantinedState.from_cell(Cell.one_from_boc(ch.chain_q)) if ch.chain_q is not None else None
        if q is not None and data.committed_seqno_a == q.state_a.seqno + 1:
            paid_a, paid_b = split_of(ch.deposit, q, ch.closing, ch.channel_id, cfg)
            how = ("forced_by_caller" if started_by_a(q) else "forced_by_operator") + (
                "_challenged" if q.challenged else "")
        elif ch.status == "closing":
            paid_a, paid_b, how = ch.deposit - ch.charged, ch.charged, "cooperative"
        else:  # closed while nobody watched (the gateway was down): from the chain's payout record where it keeps
            # one (the local chain), else from the state the close committed when we hold it, else unknown
            if hasattr(self.chain, "payouts"):
                sent: int | None = sum(a for d, a in self.chain.payouts(cfg) if d == cfg.dest_b)
            else:
                sent = self.ledger.state_by_seqno(ch.channel_id, data.committed_seqno_a - 1)
            paid_b = sent
            paid_a = None if sent is None else ch.deposit - sent
            how = "closed_unwatched"
        rec = self.ledger.record_close(ch.channel_id, how, paid_a, paid_b)
        log.info("watchtower: channel %s closed on chain (%s): operator paid %s", ch.channel_id, how, paid_b)
        return Action(ch.channel_id, "recorded", 0, f"{how}: paid_b {paid_b}, adjustment {rec['adjustment']}")

    def check_payouts(self) -> dict[str, Any]:
        """Each booked close against the chain's own record of what the contract paid the operator (the local
        chain keeps one; on TON that history lives in the account's transactions, not in get methods, so there the
        books rest on the quarantine read before the finish)."""
        if not hasattr(self.chain, "payouts"):
            return {"checked": 0, "problems": [], "note": "this settlement backend keeps no payout record"}
        problems: list[str] = []
        closes = self.ledger.closes()
        for c in closes:
            ch = self.ledger.channel(c["channel_id"])
            try:
                cfg = self.config(ch)
            except (InvalidRequestError, ValueError):
                problems.append(f"channel {ch.channel_id}: no payout address to look its contract up by")
                continue
            paid = sum(a for d, a in self.chain.payouts(cfg) if d == cfg.dest_b)
            if c["paid_b"] is not None and paid != c["paid_b"]:
                problems.append(f"channel {ch.channel_id}: the chain paid the operator {paid} nanoton, the ledger "
                                f"books {c['paid_b']}")
        return {"checked": len(closes), "problems": problems}

    # -- the operator's own exit ---------------------------------------------------------------------------------
    def start_operator_close(self, channel_id: int) -> dict[str, Any]:
        """Start an uncooperative close of a caller's channel with the state that covers the charges."""
        ch = self.ledger.channel(channel_id)
        if ch.status != "open":
            raise ConflictError(f"channel {channel_id} is {ch.status}; only an open channel can be closed")
        if self.ledger.reserved(channel_id):
            raise ConflictError(f"channel {channel_id} has calls in flight; close it when they have finished")
        best = self.ledger.best_state(channel_id, ch.charged)
        if best is None:
            raise ConflictError(f"channel {channel_id} never paid for a call: the operator holds no state of the "
                                "caller to close with, and is owed nothing")
        cfg = self.config(ch)
        self.ledger.set_status(channel_id, "quarantine")  # no more calls from here on
        msg = StartUncooperativeClose.signed(self.key, False, channel_id, SignedSemiChannel.from_boc(best[2]),
                                             operator_exit_state(self.key, channel_id))
        try:
            require_ok(self._send_result(cfg, msg.to_cell()), "forced close")
        except Exception:
            self.ledger.set_status(channel_id, ch.status)
            raise
        data = self.chain.channel_data(cfg)
        if data is not None and data.quarantine is not None:
            self.ledger.saw_quarantine(channel_id, data.quarantine.to_cell().to_boc())
        ph = phase_of(data, self._now())
        return {"channel_id": channel_id, "phase": ph.name, "seqno": best[0], "sent": best[1],
                "charged": ch.charged, "finish_after": ph.finish_after}

    async def run(self, active: Callable[[], bool] = lambda: True) -> None:
        """The gateway's background task: a round every `interval_s` while `active()` (gateways sharing a database:
        the leader alone), each guarded against its own errors."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if not active():
                    continue
                for a in await loop.run_in_executor(None, self.tick):
                    log.info("watchtower: %s", a)
            except Exception:  # noqa: BLE001
                log.exception("watchtower round failed")

