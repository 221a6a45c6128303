"""Per-call payment: verify the caller's channel state, hold credit before dispatch, charge after.

    gate = PaymentGate(ledger, operator_key, FeePolicy(bps=500))
    hold = gate.authorize(request.headers["X-Cocoon-Payment"], call_id, function, max_cost_nanoton)
    ... run the call ...
    charged = gate.settle(hold, provider_id, provider_nanoton, developer_id, royalty_nanoton)   # or
    gate.release(hold)                                                     # failed call: nothing charged

`check_state` is the pure core (no I/O): signature, channel id, seqno and `sent` monotonic, `sent` within the
deposit, enough uncharged credit. Out-of-order arrival is fine (the client signs ahead, each state covering
every hold in flight): a state older than the newest is accepted once if it was never used and lies within
`REORDER_WINDOW`; credit is always measured against the newest `sent`. `authorize` persists the state and the
hold in one transaction before it returns; bad input raises and changes nothing.

Channels are registered from the settlement backend, never from the caller's word: `register` recomputes the
channel's address from its config (our operator key as party B), reads its storage from the chain and takes the
deposit, keys and committed seqno from there (`channel_on_chain`), and its closing config must meet the operator's
`ClosingTerms`. No state may send more than ``deposit - fine`` (closing.spendable).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nacl.bindings import crypto_sign_open
from nacl.exceptions import CryptoError

from cocoon_faas.errors import (
    ConflictError,
    InvalidRequestError,
    PaymentError,
    PaymentRequiredError,
)
from cocoon_faas.pricing import FeePolicy
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.channel import ChannelConfig, ChannelData, ClosingConfig, SignedSemiChannel
from cocoon_faas.ton.closing import ClosingTerms
from cocoon_faas.ton.keys import PrivateKey, PublicKey
from cocoon_faas.ton.wallet import Wallet

from .db import IntegrityError
from .ledger import CHANNEL_COLS, MAX_INT, OPERATOR_ID, ChannelRow, Ledger, channel_row

REORDER_WINDOW = 4096
MAX_CHANNEL_ID = MAX_INT  # the ledger keys channels by a signed 64-bit integer
MAX_SEQNO = MAX_INT  # and stores seqnos the same way
HOLD_LEASE_S = 30.0  # a hold's gateway renews its lease well within this; another releases it after


# the four balance moves of a charge in one statement (one row per party: the keys never repeat within it, which
# PostgreSQL's ON CONFLICT DO UPDATE requires)
_CREDIT_ALL = ("INSERT INTO pay_balances VALUES (?,?,?),(?,?,?),(?,?,?),(?,?,?) ON CONFLICT(party, party_id) "
               "DO UPDATE SET amount = pay_balances.amount + excluded.amount")


@dataclass(frozen=True)
class Hold:
    """Credit reserved for one call; `amount` is the most it may be charged."""

    call_id: str
    channel_id: int
    seqno: int
    amount: int
    function: str


@dataclass(frozen=True)
class Charge:
    call_id: str
    provider: int
    royalty: int
    operator: int

    @property
    def total(self) -> int:
        return self.provider + self.royalty + self.operator


def _bad(message: str, problem: str, status: int = 400, **details: Any) -> PaymentError:
    exc = PaymentError(message, problem=problem, **details)
    exc.status = status
    return exc


def decode_header(value: str) -> SignedSemiChannel:
    """X-Cocoon-Payment (base64 BOC) -> SignedSemiChannel; PaymentError 'malformed' otherwise."""
    return SignedSemiChannel.from_boc(_raw_header(value))


def _unknown_channel(cid: int) -> PaymentError:
    return _bad(f"payment state is for channel {cid}, unknown to this gateway; register it with `cocoon channel open`",
                "foreign")


# what a caller whose signing state fell behind the gateway's reads (a state file restored from a backup, or the
# channel used from a copy of the home on another machine): the CLI's resync checks the newest state is its own
_BEHIND = (" (if this caller's channel state file is behind the gateway's, e.g. restored from a backup or used from "
           "another machine, `cocoon channel resync` catches it up)")


def _replayed(cid: int, seqno: int) -> PaymentError:
    return _bad(f"replayed payment state: channel {cid} seqno {seqno} already paid for a call; sign a new state "
                f"for each call{_BEHIND}", "replayed", 409)


def _raw_header(value: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("X-Cocoon-Payment is not base64; send base64 of the SignedSemiChannel BOC",
                   "malformed") from None


def _signed_by(st: SignedSemiChannel, key: PublicKey) -> bool:
    """Ed25519 over the state's signed hash, through libsodium (half of OpenSSL's time, stricter encodings)."""
    try:
        crypto_sign_open(st.signature + st.signed_hash(), key.raw)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


_CLOSED = {
    "closing": "channel {cid} is being closed cooperatively",
    "quarantine": "channel {cid} is closing on chain (a forced close is under way; `cocoon channel show` says when "
                  "it can finish)",
    "closed": "channel {cid} is closed on chain",
}


def check_state(st: SignedSemiChannel, ch: ChannelRow, operator_key: PublicKey, reserved: int,
                max_cost: int) -> None:
    """Raise PaymentError/PaymentRequiredError unless `st` may pay a call costing up to `max_cost`."""
    if ch.key_b != operator_key:
        raise _bad(f"channel {ch.channel_id} pays another operator; open a channel to this gateway", "foreign")
    if ch.status != "open":
        raise _bad(_CLOSED.get(ch.status, f"channel {ch.channel_id} is {ch.status}").format(cid=ch.channel_id)
                   + "; no calls are served on it: open a new channel (`cocoon channel open`)", "closed", 409,
                   channel_status=ch.status)
    if not _signed_by(st, ch.key_a):
        raise _bad(f"payment state for channel {ch.channel_id} is not signed by the channel's payer key",
                   "forged", 401)
    body = st.state.data
    if st.state.counterparty is not None and st.state.counterparty.sent != 0:
        raise _bad("the state claims the operator paid the caller; this gateway never pays callers", "forged")
    if body.seqno <= ch.min_seqno or body.seqno < ch.max_seqno - REORDER_WINDOW:
        raise _bad(f"stale payment state: seqno {body.seqno} is too old (newest {ch.max_seqno}); sign a new state"
                   f"{_BEHIND}", "stale", 409, latest_seqno=ch.max_seqno)
    if body.seqno > ch.max_seqno and body.sent < ch.max_sent:
        raise _bad(f"payment state seqno {body.seqno} lowers sent to {body.sent} below {ch.max_sent}; "
                   f"sent may only grow{_BEHIND}", "stale", 409, latest_sent=ch.max_sent)
    if body.seqno < ch.max_seqno and body.sent > ch.max_sent:
        raise _bad(f"payment state seqno {body.seqno} sends more than the newer seqno {ch.max_seqno}",
                   "stale", 409)
    if body.sent > ch.spendable:
        raise PaymentRequiredError(
            f"state sends {body.sent} nanoton, over the channel's spendable {ch.spendable} (deposit {ch.deposit} "
            f"less the misbehaviour fine {ch.closing.misbehavior_fine}, which must fit beside it); close the channel "
            "and open one with a larger deposit", needed=body.sent - ch.spendable, channel_id=ch.channel_id)
    available = max(body.sent, ch.max_sent) - ch.charged - reserved
    if available < max_cost:
        raise PaymentRequiredError(
            f"channel {ch.channel_id} has {available} nanoton of uncharged credit, this call may cost {max_cost}; "
            "sign a state with a higher sent", needed=max_cost - available, channel_id=ch.channel_id)


def channel_on_chain(data: ChannelData | None, cfg: ChannelConfig, claimed_deposit: int | None) -> ChannelData:
    """Check the channel's on-chain storage against what the gateway expects; raise naming the mismatch."""
    cid = cfg.channel_id
    if data is None:
        raise _bad(f"channel {cid} is not deployed at {cfg.address.friendly()} on the settlement chain; top it up "
                   "and init it first (`cocoon channel open` does both)", "not_on_chain", 409)
    if data.channel_id != cid or data.key_a != cfg.key_a or data.key_b != cfg.key_b:
        raise _bad(f"the contract at {cfg.address.friendly()} holds other keys or another channel id", "mismatch", 409)
    if data.payment.dest_a != cfg.dest_a or data.payment.dest_b != cfg.dest_b:
        raise _bad(f"channel {cid} pays out to other addresses than registered", "mismatch", 409)
    if not data.inited:
        raise _bad(f"channel {cid} is deployed but not initialised; send its init message", "not_inited", 409)
    if data.quarantine is not None:
        raise _bad(f"channel {cid} is being closed on chain; open a new channel", "closed", 409)
    if claimed_deposit is not None and claimed_deposit != data.balance_a:
        raise _bad(f"claimed deposit {claimed_deposit} does not match the {data.balance_a} nanoton locked on chain "
                   f"for channel {cid}", "mismatch", 409, on_chain=data.balance_a)
    if data.balance_a <= 0:
        raise _bad(f"channel {cid} holds no deposit from the caller; top it up", "no_deposit", 409)
    return data


class PaymentGate:
    """The gateway's payment check around each call (see module docstring)."""

    def __init__(self, ledger: Ledger, operator_key: PrivateKey | PublicKey, fee_policy: FeePolicy | None = None,
                 recover: bool = True, chain: Any = None, gateway_id: str | None = None,
                 lease_s: float = HOLD_LEASE_S, terms: ClosingTerms | None = None) -> None:
        """`gateway_id` None: the only gateway on this ledger (its holds are all released at its next start);
        else holds carry the id and a lease (`renew_leases`, `release_orphans`)."""
        self.ledger = ledger
        self.operator_key = operator_key.public_key() if isinstance(operator_key, PrivateKey) else operator_key
        self.fees = fee_policy or FeePolicy()
        self.chain = chain
        self.gateway_id = gateway_id
        self.lease_s = lease_s
        self.terms = terms or ClosingTerms()
        self.is_dead: Callable[[str], bool] | None = None  # set by a gateway sharing the database (cluster.py)
        # the channel, what it has on hold, and who used this seqno (if anyone), under the channel's row lock
        self._hold_sql = (f"SELECT {CHANNEL_COLS}, reserved, (SELECT COALESCE(call_id, '') FROM pay_states WHERE "
                          f"channel_id=? AND seqno=?) FROM pay_channels WHERE channel_id=?{ledger.db.for_update}")
        if recover:
            self.recover()

    def recover(self, is_dead: Any = None) -> int:
        """At start-up: holds no live gateway can finish were never answered, so release them (not charged):
        those of a sole gateway (no id), those whose lease expired, those whose gateway `is_dead`."""
        return self.release_orphans(is_dead, include_unowned=True)

    def renew_leases(self) -> int:
        """Extend the lease of every hold this gateway still has open (its periodic heartbeat)."""
        if self.gateway_id is None:
            return 0
        return self.ledger.db.execute("UPDATE pay_calls SET lease_until=? WHERE gateway=? AND status='held'",
                                      (time.time() + self.lease_s, self.gateway_id))

    def release_orphans(self, is_dead: Any = None, include_unowned: bool = False) -> int:
        """Release holds whose gateway is gone: lease expired, or `is_dead(gateway_id)` says so. Each release
        is guarded by status='held', so a gateway settling the same call concurrently wins or loses cleanly."""
        now = time.time()
        rows = self.ledger.query("SELECT call_id, channel_id, hold, gateway, lease_until FROM pay_calls "
                                 "WHERE status='held'")
        dead: dict[str, bool] = {}
        n = 0
        for call_id, cid, amount, gw, lease in rows:
            if gw is None:
                if not include_unowned:
                    continue
            elif gw == self.gateway_id:
                continue
            elif not (lease is not None and lease < now):
                if is_dead is None:
                    continue
                if gw not in dead:
                    dead[gw] = bool(is_dead(gw))
                if not dead[gw]:
                    continue
            n += self._release(Hold(call_id, cid, 0, amount, ""))
        return n

    def authorize(self, header_value: str, call_id: str, function: str, max_cost_nanoton: int) -> Hold:
        try:
            return self._authorize(header_value, call_id, function, max_cost_nanoton)
        except PaymentRequiredError:
            # credit may be tied up by holds of a gateway that just died: release those (only if their gateway
            # is provably gone) and try once more, rather than refuse the caller until the leader's next sweep
            if self.is_dead is None or not self.release_orphans(self.is_dead):
                raise
            return self._authorize(header_value, call_id, function, max_cost_nanoton)

    def _authorize(self, header_value: str, call_id: str, function: str, max_cost_nanoton: int) -> Hold:
        if max_cost_nanoton < 0:
            raise ValueError("max_cost_nanoton must be >= 0")
        raw = _raw_header(header_value)
        st = SignedSemiChannel.from_boc(raw)  # stored as received: the bytes the caller signed, not re-encoded
        cid, body = st.state.channel_id, st.state.data
        # the ledger stores ids and seqnos as signed 64-bit integers: larger ones (uint128 / uint64 on the wire)
        # can name no registered channel and no state this gateway keeps, so they are refused before any SQL
        if cid > MAX_CHANNEL_ID:
            raise _unknown_channel(cid)
        if body.seqno > MAX_SEQNO:
            raise _bad(f"payment state seqno {body.seqno} is beyond {MAX_SEQNO}, the highest this gateway records; "
                       "close the channel and open a new one", "malformed")
        now = time.time()
        lease = now + self.lease_s if self.gateway_id is not None else None
        try:
            with self.ledger.transaction() as tx:
                # the channel's row lock orders every hold on this channel across gateways: reserved, max_seqno
                # and the replay check are read and updated under it
                row = tx.execute(self._hold_sql, (cid, body.seqno, cid)).fetchone()
                if row is None:
                    raise _unknown_channel(cid)
                ch, reserved, seen = channel_row(row), int(row[-2]), row[-1]
                if seen == call_id:  # the same call resent (its gateway died mid-call): it never runs twice
                    raise ConflictError(f"call {call_id!r} was already received with this payment (on this or "
                                        "another gateway); it is not run again: use a fresh call id for a new call")
                if seen is not None:
                    raise _replayed(cid, body.seqno)
                check_state(st, ch, self.operator_key, reserved, max_cost_nanoton)
                tx.execute("INSERT INTO pay_states VALUES (?,?,?,?,?,?)", (cid, body.seqno, body.sent, raw, call_id,
                                                                          now))
                tx.execute("INSERT INTO pay_calls (call_id, channel_id, seqno, function, hold, status, created_at, "
                           "gateway, lease_until) VALUES (?,?,?,?,?,'held',?,?,?)",
                           (call_id, cid, body.seqno, function, max_cost_nanoton, now, self.gateway_id, lease))
                if body.seqno > ch.max_seqno:
                    tx.execute("UPDATE pay_channels SET max_seqno=?, max_sent=?, reserved=reserved+? "
                               "WHERE channel_id=?", (body.seqno, body.sent, max_cost_nanoton, cid))
                else:
                    tx.execute("UPDATE pay_channels SET reserved=reserved+? WHERE channel_id=?",
                               (max_cost_nanoton, cid))
        except IntegrityError as exc:  # a taken seqno or call id fails its unique key
            if exc.table == "pay_calls":
                raise ConflictError(f"call id {call_id!r} was already paid for; use a fresh call id") from None
            raise _replayed(cid, body.seqno) from None
        return Hold(call_id, cid, body.seqno, max_cost_nanoton, function)

    def split(self, hold: Hold, provider: int, royalty: int) -> Charge:
        """Metered cost -> split, never above the hold: the fee gives way first, then royalty, then provider."""
        if provider < 0 or royalty < 0:
            raise ValueError("charges are non-negative")
        provider = min(provider, hold.amount)
        royalty = min(royalty, hold.amount - provider)
        fee = min(self.fees.fee(provider, royalty), hold.amount - provider - royalty)
        return Charge(hold.call_id, provider, royalty, fee)

    def settle(self, hold: Hold, provider_id: str, provider_nanoton: int, developer_id: str,
               royalty_nanoton: int) -> int:
        """Charge the call once, in one transaction; returns the total (for X-Cocoon-Charge)."""
        c = self.split(hold, provider_nanoton, royalty_nanoton)
        with self.ledger.transaction() as db:
            now = time.time()
            # the status guard makes the charge happen at most once, on whichever gateway gets there first
            if not db.execute("UPDATE pay_calls SET status='charged', charged=?, finished_at=? "
                              "WHERE call_id=? AND status='held'", (c.total, now, hold.call_id)).rowcount:
                row = db.execute("SELECT status FROM pay_calls WHERE call_id=?", (hold.call_id,)).fetchone()
                raise ConflictError(f"call {hold.call_id!r} is {row[0] if row else 'unknown'}; it cannot be "
                                    "charged again")
            caller = db.execute("UPDATE pay_channels SET charged = charged + ?, reserved = reserved - ? "
                                "WHERE channel_id=? RETURNING caller", (c.total, hold.amount, hold.channel_id)
                                ).fetchone()[0]
            db.execute("INSERT INTO pay_charges VALUES (?,?,?,?,?,?,?,?,?)",
                       (hold.call_id, hold.channel_id, provider_id, c.provider, developer_id, c.royalty,
                        c.operator, c.total, now))
            db.execute(_CREDIT_ALL, ("caller", caller, c.total, "provider", provider_id, c.provider,
                                     "developer", developer_id, c.royalty, "operator", OPERATOR_ID, c.operator))
        return c.total

    def release(self, hold: Hold) -> None:
        """A failed call: free its hold, charge nothing. Idempotent."""
        self._release(hold)

    def _release(self, hold: Hold) -> int:
        with self.ledger.transaction() as db:
            row = db.execute("UPDATE pay_calls SET status='released', finished_at=? WHERE call_id=? AND "
                             "status='held' RETURNING hold", (time.time(), hold.call_id)).fetchone()
            if row is None:
                return 0
            db.execute("UPDATE pay_channels SET reserved = reserved - ? WHERE channel_id=?", (row[0],
                                                                                           hold.channel_id))
        return 1

    def register(self, channel_id: int, key_a: PublicKey, dest_a: Address, address: str | None = None,
                 deposit: int | None = None, closing: ClosingConfig | None = None) -> ChannelRow:
        """Register a caller's channel to this operator after reading it from the settlement chain. Its closing
        config (part of its address) must give the watchtower at least the operator's quarantine and fine."""
        if self.chain is None:
            raise ConflictError("this gateway has no settlement backend to check channels against; set "
                                "COCOON_SETTLEMENT")
        if not 0 <= channel_id <= MAX_CHANNEL_ID:
            raise InvalidRequestError(f"channel id {channel_id} is out of range; use 0..2^63-1")
        closing = closing or ClosingConfig()
        cfg = ChannelConfig(channel_id, key_a, self.operator_key, dest_a, Wallet(self.operator_key).address, closing)
        if address is not None and Address.parse(address) != cfg.address:
            raise _bad(f"channel address {address} is not the address of channel {channel_id} between key_a and "
                       f"this operator with this closing config ({cfg.address.friendly()}); build the config with "
                       "GET /v1/payments/operator", "mismatch", 409)
        data = channel_on_chain(self.chain.channel_data(cfg), cfg, deposit)
        want = self.terms.config_for(data.balance_a)
        if closing.quarantine_duration < want.quarantine_duration or closing.misbehavior_fine < want.misbehavior_fine:
            raise _bad(f"channel {channel_id} closes with a {closing.quarantine_duration} s quarantine and a "
                       f"{closing.misbehavior_fine} nanoton fine; this operator needs at least "
                       f"{want.quarantine_duration} s and {want.misbehavior_fine} to contest a stale close (close it "
                       "and open one with the terms of GET /v1/payments/operator)", "terms", 409,
                       quarantine_s=want.quarantine_duration, fine=want.misbehavior_fine)
        return self.ledger.add_channel(channel_id, key_a, self.operator_key, cfg.address.raw, dest_a.friendly(),
                                       data.balance_a, min_seqno=data.committed_seqno_a, closing=closing)

    def channel_summary(self, channel_id: int) -> dict[str, Any]:
        ch = self.ledger.channel(channel_id)
        reserved = self.ledger.reserved(channel_id)
        latest = self.ledger.latest_state(channel_id)  # signed by the caller: `cocoon channel resync` checks it
        return {**ch.to_dict(), "reserved": reserved, "credit": ch.max_sent - ch.charged - reserved,
                "latest_state": None if latest is None else base64.b64encode(latest).decode()}


def provider_earnings(ledger: Ledger) -> list[dict[str, Any]]:
    """Per provider: earned (credited by charges), paid out, and due."""
    earned = ledger.balances()["provider"]
    paid = ledger.paid_out()
    return [{"provider_id": p, "earned": earned.get(p, 0), "paid": paid.get(p, 0),
             "due": earned.get(p, 0) - paid.get(p, 0)} for p in sorted(set(earned) | set(paid))]
