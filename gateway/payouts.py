"""The operator's payout channels to providers, kept in the ledger's database so any gateway can pay.

The operator (party A) pays a provider what it is due by signing a new cumulative state of the channel it opened
to that provider. The channel's facts (id, the provider's key and wallet, deposit) and its signing position
(last ``seqno`` and ``sent``) are a row of ``pay_payout_channels``; the one secret, the operator's key, is not
stored: every gateway reads it from its own ``$COCOON_HOME/operator_key`` (the same key on each, as the payment
channels already need). A payout is one transaction that locks the channel's row, reads what is due, signs
``seqno+1`` for the new cumulative ``sent`` and books the payout: two gateways paying the same provider at once
queue on the row, so no seqno is signed twice and nothing is paid twice. The database holds no secret here —
someone who can write it could only make the operator sign states that pay what the ledger says is due
(the ledger is the operator's books either way; docs/security.md).

Opening a channel (top-up and init on the settlement chain) claims the row first (status ``opening``), so two
gateways never fund two channels to one provider; an opening left unfinished is resumed from what the chain shows
(the rest of the top-up, then the init) by the next payout after ``OPENING_GRACE_S``, or at once after its own
gateway's failure. Files an older gateway kept under
``$COCOON_HOME/payout_channels/`` are imported the first time their provider is paid.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

from cocoon_faas.errors import ConflictError, PaymentRequiredError
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.chain import require_ok
from cocoon_faas.ton.channel import ChannelConfig, SemiChannelBody, StateTemplate
from cocoon_faas.ton.keys import PrivateKey, PublicKey
from cocoon_faas.ton.messages import InitChannel, TopUp
from cocoon_faas.ton.wallet import Wallet

from .db import IntegrityError, Tx
from .ledger import Ledger
from .migrations import Migration, migrate

PAYOUT_MIGRATIONS = [
    Migration(1, "the operator's payout channels to providers (facts and signing position; no key)", """
CREATE TABLE IF NOT EXISTS pay_payout_channels (
    provider_id TEXT PRIMARY KEY, channel_id INTEGER NOT NULL, key_b TEXT NOT NULL, dest_b TEXT NOT NULL,
    address TEXT NOT NULL, deposit INTEGER NOT NULL, seqno INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL, opened_at REAL NOT NULL)
"""),
    Migration(2, "payout channels whose deposit ran out: kept with their last state until the provider closes them", """
CREATE TABLE IF NOT EXISTS pay_payout_retired (
    channel_id INTEGER PRIMARY KEY, provider_id TEXT NOT NULL, key_b TEXT NOT NULL, dest_b TEXT NOT NULL,
    address TEXT NOT NULL, deposit INTEGER NOT NULL, seqno INTEGER NOT NULL, sent INTEGER NOT NULL,
    opened_at REAL NOT NULL, retired_at REAL NOT NULL)
"""),
]
GAS = 50_000_000
OPENING_GRACE_S = 300.0  # an opening older than this is taken over (its gateway died or gave up midway)


def _due(tx: Tx, provider_id: str) -> int:
    earned = tx.execute("SELECT COALESCE(SUM(amount), 0) FROM pay_balances WHERE party='provider' AND party_id=?",
                        (provider_id,)).fetchone()[0]
    paid = tx.execute("SELECT COALESCE(SUM(amount), 0) FROM pay_payouts WHERE provider_id=?",
                      (provider_id,)).fetchone()[0]
    return int(earned) - int(paid)


class PayoutChannels:
    """Open, fund and pay through the operator's channels to providers (any gateway holding the operator key)."""

    def __init__(self, ledger: Ledger, chain: Any, operator_key: PrivateKey) -> None:
        self.ledger, self.chain, self.key = ledger, chain, operator_key
        migrate(ledger.db, "payouts", PAYOUT_MIGRATIONS)

    def ensure_open(self, provider_id: str, provider_key: PublicKey, wallet: Address, deposit: int) -> int:
        """The channel to ``provider_id`` (opened and funded from the operator's wallet the first time);
        returns its id. Refuses a different key or wallet for a provider that already has one. An opening left
        unfinished (its gateway failed or died midway) is resumed from what the chain shows, never funded twice."""
        self._import_legacy(provider_id)
        now = time.time()
        row = self._row(provider_id)
        if row is None:
            claimed = now
            try:  # the claim: another gateway opening one at the same moment gets the conflict, not a second one
                self.ledger.db.execute(
                    "INSERT INTO pay_payout_channels (provider_id, channel_id, key_b, dest_b, address, deposit, "
                    "status, opened_at) VALUES (?,?,?,?,?,?,?,?)",
                    (provider_id, secrets.randbits(63), provider_key.hex(), wallet.raw, "", deposit, "opening", now))
            except IntegrityError:
                raise ConflictError(f"a payout channel to {provider_id!r} was just opened by another gateway; "
                                    "retry") from None
            row = self._row(provider_id)
            assert row is not None
        else:
            claimed = 0.0
        cid, key_b, dest_b, status, opened_at, deposit = row
        if key_b != provider_key.hex() or Address.parse(dest_b) != wallet:
            raise ConflictError(f"provider {provider_id!r} already has a payout channel to another key or wallet; "
                                "close it first")
        if status == "open":
            return cid
        if not claimed:  # an opening started earlier: take it over only once its opener must have given up
            if now - opened_at < OPENING_GRACE_S or not self.ledger.db.execute(
                    "UPDATE pay_payout_channels SET opened_at=? WHERE provider_id=? AND status='opening' AND "
                    "opened_at=?", (now, provider_id, opened_at)):
                raise ConflictError(f"a payout channel to {provider_id!r} is being opened (on this or another "
                                    "gateway); retry in a minute")
        w = Wallet(self.key.public_key())
        cfg = ChannelConfig(cid, self.key.public_key(), PublicKey(bytes.fromhex(key_b)), w.address, wallet)
        try:
            self._fund(cfg, w, deposit)
        except BaseException:
            if self.chain.channel_data(cfg) is None:  # nothing reached the chain: forget it (a retry starts anew)
                self.ledger.db.execute("DELETE FROM pay_payout_channels WHERE provider_id=? AND status='opening'",
                                       (provider_id,))
            else:  # funded in part: the next attempt resumes it at once
                self.ledger.db.execute("UPDATE pay_payout_channels SET opened_at=0 WHERE provider_id=? AND "
                                       "status='opening'", (provider_id,))
            raise
        self.ledger.db.execute("UPDATE pay_payout_channels SET status='open', address=? WHERE provider_id=?",
                               (cfg.address.friendly(), provider_id))
        return cid

    def _row(self, provider_id: str) -> tuple[int, str, str, str, float, int] | None:
        rows = self.ledger.query("SELECT channel_id, key_b, dest_b, status, opened_at, deposit FROM "
                                 "pay_payout_channels WHERE provider_id=?", (provider_id,))
        if not rows:
            return None
        r = rows[0]
        return int(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), int(r[5])

    def _fund(self, cfg: ChannelConfig, w: Wallet, deposit: int) -> None:
        """Do what the chain still lacks: the top-up (or its rest), then the init. Safe to repeat."""
        data = self.chain.channel_data(cfg)
        have = data.balance_a if data is not None else 0
        if have < deposit:
            require_ok(self.chain.send_to_channel(self.key, w, cfg, TopUp(deposit - have).to_cell(),
                                                  deposit - have + GAS), "payout channel top-up")
            data = self.chain.channel_data(cfg)
        if data is None or not data.inited:
            require_ok(self.chain.send_to_channel(self.key, w, cfg, InitChannel.signed(
                self.key, True, cfg.channel_id, deposit, 0).to_cell(), GAS), "payout channel init")

    def retire_if_short(self, provider_id: str, need: int) -> int | None:
        """Retire the provider's open channel when less than ``need`` is left in it (a channel cannot be topped up
        once open: the contract refuses), so that the next `ensure_open` opens a new one. The retired channel is
        kept with its last state, which the provider closes on chain to collect what was paid through it (the
        rest of its deposit returns to the operator). Returns its id, or None when the channel has room (or
        another gateway retired it first: the row lock orders them)."""
        with self.ledger.transaction() as tx:
            row = tx.execute("SELECT channel_id, key_b, dest_b, address, deposit, seqno, sent, status, opened_at FROM "
                             f"pay_payout_channels WHERE provider_id=?{self.ledger.db.for_update}",
                             (provider_id,)).fetchone()
            if row is None or row[7] != "open" or int(row[4]) - int(row[6]) >= need:
                return None
            tx.execute("INSERT INTO pay_payout_retired VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (row[0], provider_id, *row[1:7], row[8], time.time()))
            tx.execute("DELETE FROM pay_payout_channels WHERE provider_id=?", (provider_id,))
        return int(row[0])

    def pay(self, provider_id: str, amount: int | None = None) -> dict[str, Any]:
        """Pay ``amount`` (default: all that is due) with the next state of the provider's channel; books it."""
        with self.ledger.transaction() as tx:
            row = tx.execute("SELECT channel_id, deposit, seqno, sent, status FROM pay_payout_channels WHERE "
                             f"provider_id=?{self.ledger.db.for_update}", (provider_id,)).fetchone()
            if row is None or row[4] != "open":
                raise ConflictError(f"provider {provider_id!r} has no open payout channel; send its public_key "
                                    "and wallet to open one")
            cid, deposit, seqno, sent = (int(v) for v in row[:4])
            due = _due(tx, provider_id)
            amount = due if amount is None else amount
            if amount <= 0 or amount > due:
                raise ConflictError(f"provider {provider_id!r} is due {due} nanoton; cannot pay {amount}")
            if sent + amount > deposit:
                raise PaymentRequiredError(f"the payout channel to {provider_id!r} has {deposit - sent} nanoton "
                                           "left; pay again: the payout retires it and opens a new one",
                                           needed=sent + amount - deposit)
            seqno, sent = seqno + 1, sent + amount
            boc, state = StateTemplate(cid, SemiChannelBody()).build(seqno, sent, self.key.sign)
            tx.execute("UPDATE pay_payout_channels SET seqno=?, sent=? WHERE provider_id=?", (seqno, sent,
                                                                                             provider_id))
            tx.execute("INSERT INTO pay_payouts (provider_id, amount, channel_id, seqno, boc, at) VALUES "
                       "(?,?,?,?,?,?)", (provider_id, amount, cid, seqno, boc, time.time()))
        return {"provider_id": provider_id, "amount": amount, "channel_id": cid, "seqno": seqno,
                "state": base64.b64encode(boc).decode()}

    def _import_legacy(self, provider_id: str) -> None:
        """A channel an older gateway kept in files under its home becomes a row (once; the files stay)."""
        d = self.ledger.home / "payout_channels"
        stem = hashlib.sha256(provider_id.encode()).hexdigest()[:32]
        conf, state = d / f"{stem}.channel.json", d / f"{stem}.json"
        if not conf.exists():
            return
        c = json.loads(conf.read_text())
        s = json.loads(state.read_text()) if state.exists() else {}
        # a lease not given back may have been signed: resume past all of it (as the file signer did)
        seqno = max(int(s.get("seqno", 0)), int(s.get("lease_seqno", 0)))
        sent = max(int(s.get("sent", 0)), int(s.get("lease_sent", 0)))
        self.adopt(provider_id, int(c["channel_id"]), PublicKey(bytes.fromhex(c["key_b"])),
                   Address.parse(c["dest_b"]), int(c["deposit"]), seqno=seqno, sent=sent,
                   address=c.get("address", ""), opened_at=Path(conf).stat().st_mtime)

    def adopt(self, provider_id: str, channel_id: int, provider_key: PublicKey, wallet: Address, deposit: int, *,
              seqno: int = 0, sent: int = 0, address: str = "", opened_at: float | None = None) -> bool:
        """Record a channel already open and funded on chain (kept elsewhere before); False when the provider
        has one recorded already (that one stays)."""
        try:
            self.ledger.db.execute(
                "INSERT INTO pay_payout_channels (provider_id, channel_id, key_b, dest_b, address, deposit, seqno, "
                "sent, status, opened_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (provider_id, channel_id, provider_key.hex(), wallet.raw, address, deposit, seqno, sent, "open",
                 time.time() if opened_at is None else opened_at))
        except IntegrityError:
            return False  # imported already (or by another gateway)
        return True


def payout_channels_of(ledger: Ledger, provider_ids: list[str]) -> list[dict[str, Any]]:
    """These providers' payout channels with the latest signed state of each (base64 BOC; None before the first
    payout): what a provider needs to close its channel on chain and collect. For the provider's own view."""
    if not provider_ids:
        return []
    migrate(ledger.db, "payouts", PAYOUT_MIGRATIONS)  # a gateway that never paid out has no payout table yet
    marks = ",".join("?" * len(provider_ids))
    keys = ("provider_id", "channel_id", "address", "deposit", "seqno", "sent", "status", "opened_at")
    open_q = f"SELECT {', '.join(keys)}, 0 FROM pay_payout_channels WHERE provider_id IN ({marks})"
    retired_q = ("SELECT provider_id, channel_id, address, deposit, seqno, sent, 'retired', opened_at, retired_at "
                 f"FROM pay_payout_retired WHERE provider_id IN ({marks})")
    rows = ledger.query(f"{open_q} UNION ALL {retired_q}", tuple(provider_ids) * 2)
    # per provider, the open channel, then the retired ones newest first: each is closed with its own last state
    rows.sort(key=lambda r: (r[0], r[-1] != 0, -r[-1]))
    out = []
    for r in (r[:-1] for r in rows):
        ch = dict(zip(keys, r, strict=True))
        last = ledger.query("SELECT boc FROM pay_payouts WHERE channel_id=? AND seqno=?", (ch["channel_id"],
                                                                                          ch["seqno"]))
        ch["latest_state"] = base64.b64encode(bytes(last[0][0])).decode() if last else None
        ch["left"] = int(ch["deposit"]) - int(ch["sent"])
        out.append(ch)
    return out
