"""How a channel can end: the operator's closing terms, the checks a caller makes before funding, the phase a
channel is in on chain, and the operator's seqno-0 state that gives the caller its own exit.

A channel's `ClosingConfig` is part of its address, so both sides fix it before the deposit moves:

- the operator offers `ClosingTerms` (quarantine, conditional-close window, fine as a share of the deposit);
- the caller checks them with `check_closing` before funding: a zero quarantine leaves no dispute window, a close
  longer than the caller accepts (COCOON_CHANNEL_MAX_CLOSE_S) locks its deposit too long, and a fine that is not
  well under the deposit could lock the channel for good: the contract's finish fails (exit 5) when a fined side's
  `sent` passes its balance, so both sides keep every state's `sent` within ``deposit - fine`` (`spendable`);
- at open the operator hands the caller `operator_exit_state`: its own semi-channel at seqno 0 with nothing sent,
  signed. With it the caller can start an uncooperative close alone (the contract wants both sides' signed
  states), and finish it after the quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass

from cocoon_faas.errors import InvalidRequestError, PaymentError
from cocoon_faas.ton.channel import (
    ChannelData,
    ClosingConfig,
    QuarantinedState,
    SemiChannel,
    SemiChannelBody,
    SignedSemiChannel,
)
from cocoon_faas.ton.keys import PrivateKey, PublicKey

MAX_FINE_BPS = 2500  # a caller accepts a fine of at most a quarter of its deposit
UINT32 = 2**32 - 1


@dataclass(frozen=True)
class ClosingTerms:
    """What an operator offers every new channel; the fine scales with the deposit."""

    quarantine_s: int = 86_400
    conditional_close_s: int = 0
    fine_bps: int = 1000

    def config_for(self, deposit: int) -> ClosingConfig:
        return ClosingConfig(self.quarantine_s, deposit * self.fine_bps // 10_000, self.conditional_close_s)

    def to_dict(self) -> dict[str, int]:
        return {"quarantine_s": self.quarantine_s, "conditional_close_s": self.conditional_close_s,
                "fine_bps": self.fine_bps}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ClosingTerms:
        try:
            return cls(int(d["quarantine_s"]), int(d["conditional_close_s"]), int(d["fine_bps"]))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            raise InvalidRequestError("the operator's closing terms are malformed: expected quarantine_s, "
                                      "conditional_close_s and fine_bps (integers)") from None


def closing_to_dict(c: ClosingConfig) -> dict[str, int]:
    return {"quarantine_s": c.quarantine_duration, "conditional_close_s": c.conditional_close_duration,
            "fine": c.misbehavior_fine}


def closing_from_dict(d: dict[str, object] | None) -> ClosingConfig:
    """A ClosingConfig from its JSON form; an absent one is the all-zero config of older channels."""
    if not d:
        return ClosingConfig()
    try:
        return ClosingConfig(int(d["quarantine_s"]), int(d["fine"]), int(d["conditional_close_s"]))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        raise InvalidRequestError("closing must be {quarantine_s, conditional_close_s, fine} (integers)") from None


def spendable(deposit: int, closing: ClosingConfig) -> int:
    """The most any state may send: a fine on top of it still fits the deposit, so a finish can always pay out."""
    return max(0, deposit - closing.misbehavior_fine)


def check_closing(c: ClosingConfig, deposit: int, max_close_s: int) -> None:
    """The caller's checks before funding; raises InvalidRequestError naming the problem and the way out."""
    if c.quarantine_duration <= 0:
        raise InvalidRequestError("the operator offers a zero quarantine: a stale close could never be contested; "
                                  "refusing to fund this channel (use a gateway whose COCOON_CHANNEL_QUARANTINE_S "
                                  "is above 0)")
    if c.quarantine_duration > UINT32 or c.conditional_close_duration > UINT32:
        raise InvalidRequestError("closing durations must fit uint32 seconds")
    wait = c.quarantine_duration + c.conditional_close_duration
    if wait > max_close_s:
        raise InvalidRequestError(f"a forced close of this channel would lock the deposit for {wait} s, longer "
                                  f"than the {max_close_s} s you accept (COCOON_CHANNEL_MAX_CLOSE_S); refusing "
                                  "to fund it")
    if c.misbehavior_fine < 0 or c.misbehavior_fine * 10_000 > deposit * MAX_FINE_BPS:
        raise InvalidRequestError(f"the misbehaviour fine {c.misbehavior_fine} nanoton is over "
                                  f"{MAX_FINE_BPS / 100:g}% of the {deposit} nanoton deposit; refusing to fund it")


def operator_exit_state(key_b: PrivateKey, channel_id: int) -> SignedSemiChannel:
    """The operator's own semi-channel, seqno 0, nothing sent: what the caller needs to close alone. Harmless to
    the operator: it claims nothing, and the operator never sends on a caller's channel."""
    return SemiChannel(channel_id, SemiChannelBody(0, 0)).sign(key_b)


def check_exit_state(st: SignedSemiChannel, key_b: PublicKey, channel_id: int) -> None:
    """The caller's check of the operator's exit state before it funds the channel."""
    body = st.state.data
    if st.state.channel_id != channel_id or body.seqno != 0 or body.sent != 0 or body.conditionals is not None:
        raise PaymentError(f"the operator's exit state is not a seqno-0 state of channel {channel_id} with nothing "
                           "sent; refusing to fund the channel", problem="mismatch")
    if not st.is_signed_by(key_b):
        raise PaymentError("the operator's exit state is not signed by the operator key; refusing to fund the "
                           "channel", problem="forged")


@dataclass(frozen=True)
class Phase:
    """Where a channel stands on chain and when its next step becomes possible (unix seconds, chain time)."""

    name: str  # not_deployed | uninited | open | quarantine | settling | awaiting_finish | closed
    started_by: str | None = None  # 'caller' (A) or 'operator' (B) for a close under way
    challenged: bool | None = None
    challenge_until: int | None = None  # a challenge is accepted while now < this
    finish_after: int | None = None  # finish is accepted once now > this

    def describe(self, now: int) -> str:
        if self.name == "open":
            return "open: calls can be paid; close cooperatively or with --force"
        if self.name in ("quarantine", "settling", "awaiting_finish"):
            assert self.finish_after is not None and self.challenge_until is not None
            who = f"started by the {self.started_by}"
            if now <= self.finish_after:
                left = self.finish_after + 1 - now
                chal = (f"; the other side may challenge for {self.challenge_until - now} s more"
                        if now < self.challenge_until else "")
                return f"closing ({who}){chal}; `cocoon channel finish` possible in {left} s"
            return f"closing ({who}); `cocoon channel finish` possible now"
        if self.name == "closed":
            return "closed: paid out on chain"
        if self.name == "uninited":
            return "deployed but not initialised"
        return "not on chain"


def phase_of(data: ChannelData | None, now: int) -> Phase:
    """The contract's get_channel_state, with the deadlines of the close under way."""
    if data is None:
        return Phase("not_deployed")
    if not data.inited:
        return Phase("closed" if data.committed_seqno_a or data.committed_seqno_b else "uninited")
    q = data.quarantine
    if q is None:
        return Phase("open")
    until = q.quarantine_starts + data.closing.quarantine_duration
    after = until + data.closing.conditional_close_duration
    name = "quarantine" if now < until else ("settling" if now < after else "awaiting_finish")
    return Phase(name, "caller" if started_by_a(q) else "operator", bool(q.challenged), until, after)


def started_by_a(q: QuarantinedState) -> bool:
    """Who started the close: a challenge rewrites `committed_by_a` to the challenger, the other side."""
    return q.committed_by_a != bool(q.challenged)
