"""The gateway's money ledger: channels, received payment states, calls, charges and balances, in SQLite (WAL,
the embedded default) or in the PostgreSQL database several gateways share (`db.Database`; schema versioned by
`LEDGER_MIGRATIONS`).

Every write that moves money is one transaction; writes that depend on a channel's state lock its row
(`SELECT … FOR UPDATE` on PostgreSQL; SQLite serializes every writer), so gateways sharing the database never
accept the same seqno twice nor hold more than a channel's credit. A hold belongs to the gateway that took it
and carries a lease (``lease_until``) that gateway renews; another gateway releases it once the lease expires
or its owner is provably gone. Parties: ``caller`` (debited, one row per channel payer),
``provider``, ``developer`` and ``operator`` (credited). `verify` checks conservation to the nanoton (caller
debits = provider + developer + operator credits), that each charge is covered by a stored, correctly signed
state, that no call is charged twice, and that each channel closed on chain paid the operator its charges plus
the booked close adjustment (`record_close`). See DESIGN.md "Pay" and "Invariants".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cocoon_faas.errors import ConflictError, NotFoundError
from cocoon_faas.ton.channel import ClosingConfig, SignedSemiChannel
from cocoon_faas.ton.closing import closing_to_dict, spendable
from cocoon_faas.ton.keys import PublicKey

from .db import Database, SqliteDatabase, Tx, open_database
from .migrations import Migration, migrate

_V1 = """
CREATE TABLE IF NOT EXISTS pay_channels (
    channel_id INTEGER PRIMARY KEY, key_a BLOB NOT NULL, key_b BLOB NOT NULL, address TEXT NOT NULL,
    caller TEXT NOT NULL, deposit INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'open',
    max_seqno INTEGER NOT NULL DEFAULT 0, max_sent INTEGER NOT NULL DEFAULT 0,
    charged INTEGER NOT NULL DEFAULT 0, min_seqno INTEGER NOT NULL DEFAULT 0, opened_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pay_states (
    channel_id INTEGER NOT NULL, seqno INTEGER NOT NULL, sent INTEGER NOT NULL, boc BLOB NOT NULL,
    call_id TEXT, received_at REAL NOT NULL, PRIMARY KEY (channel_id, seqno));
CREATE TABLE IF NOT EXISTS pay_calls (
    call_id TEXT PRIMARY KEY, channel_id INTEGER NOT NULL, seqno INTEGER NOT NULL, function TEXT NOT NULL,
    hold INTEGER NOT NULL, status TEXT NOT NULL, charged INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    finished_at REAL);
CREATE TABLE IF NOT EXISTS pay_charges (
    call_id TEXT PRIMARY KEY, channel_id INTEGER NOT NULL, provider_id TEXT NOT NULL,
    provider_nanoton INTEGER NOT NULL, developer_id TEXT NOT NULL, royalty_nanoton INTEGER NOT NULL,
    operator_nanoton INTEGER NOT NULL, total INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pay_balances (
    party TEXT NOT NULL, party_id TEXT NOT NULL, amount INTEGER NOT NULL, PRIMARY KEY (party, party_id));
CREATE TABLE IF NOT EXISTS pay_payouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, provider_id TEXT NOT NULL, amount INTEGER NOT NULL,
    channel_id INTEGER NOT NULL, seqno INTEGER NOT NULL, boc BLOB NOT NULL, at REAL NOT NULL)
"""


def _backfill_reserved(tx: Tx, db: Database) -> None:
    tx.execute("UPDATE pay_channels SET reserved = (SELECT COALESCE(SUM(hold), 0) FROM pay_calls c "
               "WHERE c.channel_id = pay_channels.channel_id AND c.status = 'held')")


LEDGER_MIGRATIONS = [
    Migration(1, "channels, states, calls, charges, balances, payouts", _V1),
    # several gateways: the credit a channel has on hold is a column read under the channel's row lock (no
    # per-process cache), and each hold names its gateway and lease
    Migration(2, "holds: reserved per channel, owning gateway and lease", """
ALTER TABLE pay_channels ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pay_calls ADD COLUMN gateway TEXT;
ALTER TABLE pay_calls ADD COLUMN lease_until REAL;
CREATE INDEX IF NOT EXISTS pay_calls_held ON pay_calls (status, lease_until)
""", _backfill_reserved),
    # channels both sides can exit: each channel's closing config (part of its address: the watchtower rebuilds
    # it), the last quarantine seen on chain, and what each close paid
    Migration(3, "channel exits: closing config, quarantine seen, closes", """
ALTER TABLE pay_channels ADD COLUMN quarantine_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pay_channels ADD COLUMN conditional_s INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pay_channels ADD COLUMN fine INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pay_channels ADD COLUMN chain_q BLOB;
CREATE TABLE IF NOT EXISTS pay_closes (
    channel_id INTEGER PRIMARY KEY, how TEXT NOT NULL, charged INTEGER NOT NULL, paid_a INTEGER,
    paid_b INTEGER, adjustment INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL)
"""),
]

PARTIES = ("caller", "provider", "developer", "operator")
OPERATOR_ID = "operator"
MAX_INT = 2**63 - 1  # the most an integer column holds (SQLite INTEGER, PostgreSQL BIGINT): ids, seqnos, nanoton


@dataclass(frozen=True)
class ChannelRow:
    channel_id: int
    key_a: PublicKey
    key_b: PublicKey
    address: str
    caller: str
    deposit: int
    status: str
    max_seqno: int
    max_sent: int
    charged: int
    min_seqno: int
    closing: ClosingConfig = ClosingConfig()
    chain_q: bytes | None = None  # the last quarantine the watchtower saw on chain (a QuarantinedState cell BOC)

    @property
    def spendable(self) -> int:
        """The most a state may send: the fine on top of it must still fit the deposit (closing.spendable)."""
        return spendable(self.deposit, self.closing)

    def to_dict(self) -> dict[str, Any]:
        return {"channel_id": self.channel_id, "address": self.address, "caller": self.caller,
                "deposit": self.deposit, "status": self.status, "seqno": self.max_seqno, "sent": self.max_sent,
                "charged": self.charged, "key_a": self.key_a.hex(), "key_b": self.key_b.hex(),
                "closing": closing_to_dict(self.closing), "spendable": self.spendable}


@lru_cache(maxsize=4096)
def _key(raw: bytes) -> PublicKey:
    return PublicKey(raw)


@lru_cache(maxsize=256)
def _closing(quarantine_s: int, fine: int, conditional_s: int) -> ClosingConfig:
    return ClosingConfig(quarantine_s, fine, conditional_s)


def channel_row(r: tuple[Any, ...]) -> ChannelRow:
    """A row of CHANNEL_COLS; the per-channel constants (keys, closing config) are immutable values made once
    (this runs on every paid call)."""
    return ChannelRow(r[0], _key(bytes(r[1])), _key(bytes(r[2])), r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                      _closing(r[11], r[13], r[12]), bytes(r[14]) if r[14] is not None else None)


CHANNEL_COLS = ("channel_id, key_a, key_b, address, caller, deposit, status, max_seqno, max_sent, charged, min_seqno, "
                "quarantine_s, conditional_s, fine, chain_q")


class Ledger:
    """The ledger over a `Database`: a path opens SQLite (``synchronous='FULL'`` makes every commit survive power
    loss; the default ``NORMAL`` in WAL mode survives a killed process, what a crashed gateway is, at a fraction
    of the cost). `home` is where per-gateway files live (payout channel signers); default: the file's folder."""

    def __init__(self, where: Path | str | Database, synchronous: str = "NORMAL", home: Path | None = None) -> None:
        if isinstance(where, str) and where.startswith(("postgres://", "postgresql://")):
            self.db: Database = open_database(where)
        elif isinstance(where, (str, Path)):
            self.db = SqliteDatabase(Path(where), synchronous)
        else:
            self.db = where
        sqlite_path = getattr(self.db, "path", None)
        self.path = Path(sqlite_path) if sqlite_path is not None else (home or Path(".")) / "ledger.db"
        self.home = home or self.path.parent
        migrate(self.db, "ledger", LEDGER_MIGRATIONS)
        self.lock = threading.RLock()  # in-process order; the database serializes across processes

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> AbstractContextManager[Tx]:
        """One atomic, durable write; rolls back on any exception. On SQLite the connection's own lock already
        orders this process's writers for the whole transaction (a paid call runs two: one lock fewer each)."""
        if isinstance(self.db, SqliteDatabase):
            return self.db.transaction()
        return self._locked_transaction()

    @contextmanager
    def _locked_transaction(self) -> Iterator[Tx]:
        with self.lock, self.db.transaction() as tx:
            yield tx

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.db.query(sql, args)

    # channels
    def add_channel(self, channel_id: int, key_a: PublicKey, key_b: PublicKey, address: str, caller: str,
                    deposit: int, min_seqno: int = 0, closing: ClosingConfig = ClosingConfig()) -> ChannelRow:
        with self.transaction() as db:
            old = db.execute("SELECT status FROM pay_channels WHERE channel_id=?", (channel_id,)).fetchone()
            if old is not None:
                raise ConflictError(f"channel {channel_id} is already registered ({old[0]}); "
                                    "open a new channel with a fresh id")
            db.execute(f"INSERT INTO pay_channels ({CHANNEL_COLS}, opened_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (channel_id, key_a.raw, key_b.raw, address, caller, deposit, "open", min_seqno, 0, 0,
                        min_seqno, closing.quarantine_duration, closing.conditional_close_duration,
                        closing.misbehavior_fine, None, time.time()))  # a concurrent registration fails the primary key
        return self.channel(channel_id)

    def channel(self, channel_id: int) -> ChannelRow:
        # an id past the column's 64 bits (a URL may carry any integer) is no channel here, not a driver error
        rows = self.query(f"SELECT {CHANNEL_COLS} FROM pay_channels WHERE channel_id=?", (channel_id,)) \
            if 0 <= channel_id <= MAX_INT else []
        if not rows:
            raise NotFoundError(f"unknown channel {channel_id}; open one with `cocoon channel open`")
        return channel_row(rows[0])

    def channel_and_seen(self, channel_id: int, seqno: int) -> tuple[ChannelRow, bool] | None:
        """The channel and whether a state with `seqno` is stored for it, in one query (the per-call path);
        None for an unknown channel."""
        rows = self.query(f"SELECT {CHANNEL_COLS}, EXISTS(SELECT 1 FROM pay_states WHERE channel_id=? AND seqno=?) "
                          "FROM pay_channels WHERE channel_id=?", (channel_id, seqno, channel_id))
        return (channel_row(rows[0]), bool(rows[0][-1])) if rows else None

    def channels(self) -> list[ChannelRow]:
        return [channel_row(r) for r in self.query(f"SELECT {CHANNEL_COLS} FROM pay_channels ORDER BY channel_id")]

    def reserved(self, channel_id: int) -> int:
        return int(self.query("SELECT COALESCE(SUM(hold),0) FROM pay_calls WHERE channel_id=? AND status='held'",
                              (channel_id,))[0][0])

    def set_status_checked(self, channel_id: int, status: str, check: Callable[[ChannelRow, int], None]) -> ChannelRow:
        """Change a channel's status after `check(channel, reserved)` passes, under the channel's row lock (a
        hold taken on another gateway meanwhile waits for this, then sees the new status)."""
        with self.transaction() as tx:
            row = tx.execute(f"SELECT {CHANNEL_COLS}, reserved FROM pay_channels WHERE channel_id=?"
                             f"{self.db.for_update}", (channel_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"unknown channel {channel_id}; open one with `cocoon channel open`")
            ch = channel_row(row)
            check(ch, int(row[-1]))
            tx.execute("UPDATE pay_channels SET status=? WHERE channel_id=?", (status, channel_id))
        return ch

    def set_status(self, channel_id: int, status: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE pay_channels SET status=? WHERE channel_id=?", (status, channel_id))

    def watched_channels(self) -> list[ChannelRow]:
        """Channels the watchtower still follows on chain (every one not yet closed)."""
        return [channel_row(r) for r in self.query(f"SELECT {CHANNEL_COLS} FROM pay_channels WHERE status != 'closed' "
                                                   "ORDER BY channel_id")]

    def saw_quarantine(self, channel_id: int, quarantine_boc: bytes) -> None:
        """The watchtower saw a close under way: no more calls on the channel (a hold taken meanwhile on another
        gateway waits for the row lock, then sees the status), and remember the split."""
        with self.transaction() as db:
            db.execute("UPDATE pay_channels SET status='quarantine', chain_q=? WHERE channel_id=?",
                       (quarantine_boc, channel_id))

    def best_state(self, channel_id: int, covering: int) -> tuple[int, int, bytes] | None:
        """(seqno, sent, boc) of the stored state with the smallest `sent` >= `covering`, else the largest one:
        what the operator closes or challenges with, claiming what it is owed and no more than it must."""
        rows = self.query("SELECT seqno, sent, boc FROM pay_states WHERE channel_id=? AND sent >= ? "
                          "ORDER BY sent, seqno DESC LIMIT 1", (channel_id, covering))
        if not rows:
            rows = self.query("SELECT seqno, sent, boc FROM pay_states WHERE channel_id=? "
                              "ORDER BY sent DESC, seqno DESC LIMIT 1", (channel_id,))
        return (int(rows[0][0]), int(rows[0][1]), bytes(rows[0][2])) if rows else None

    def latest_state(self, channel_id: int) -> bytes | None:
        """The BOC of the stored state with the highest seqno (its `sent` is the highest too), or None."""
        rows = self.query("SELECT boc FROM pay_states WHERE channel_id=? ORDER BY seqno DESC LIMIT 1", (channel_id,))
        return bytes(rows[0][0]) if rows else None

    def state_by_seqno(self, channel_id: int, seqno: int) -> int | None:
        """`sent` of the stored state with `seqno` (None when the gateway never received it)."""
        rows = self.query("SELECT sent FROM pay_states WHERE channel_id=? AND seqno=?", (channel_id, seqno))
        return int(rows[0][0]) if rows else None

    def record_close(self, channel_id: int, how: str, paid_a: int | None, paid_b: int | None) -> dict[str, Any]:
        """The channel closed on chain paying the operator `paid_b` (None: unknown, the gateway did not watch the
        close). What the chain paid beyond the charges (a fine, holds the caller signed for) or short of them is
        booked as an adjustment between the caller and the operator, so the ledger matches the chain's payout to
        the nanoton. Once per channel (the primary key and the status guard)."""
        with self.transaction() as db:
            row = db.execute(f"SELECT charged, caller, status FROM pay_channels WHERE channel_id=?{self.db.for_update}",
                             (channel_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"unknown channel {channel_id}")
            charged, caller, status = int(row[0]), str(row[1]), str(row[2])
            if status == "closed":
                raise ConflictError(f"channel {channel_id} is already recorded as closed")
            adj = 0 if paid_b is None else paid_b - charged
            db.execute("INSERT INTO pay_closes (channel_id, how, charged, paid_a, paid_b, adjustment, at) "
                       "VALUES (?,?,?,?,?,?,?)", (channel_id, how, charged, paid_a, paid_b, adj, time.time()))
            db.execute("UPDATE pay_channels SET status='closed' WHERE channel_id=?", (channel_id,))
            if adj:
                db.executemany("INSERT INTO pay_balances VALUES (?,?,?) ON CONFLICT(party, party_id) "
                               "DO UPDATE SET amount = pay_balances.amount + excluded.amount",
                               (("caller", caller, adj), ("operator", OPERATOR_ID, adj)))
        return {"channel_id": channel_id, "how": how, "charged": charged, "paid_a": paid_a, "paid_b": paid_b,
                "adjustment": adj}

    def closes(self) -> list[dict[str, Any]]:
        keys = ("channel_id", "how", "charged", "paid_a", "paid_b", "adjustment")
        return [dict(zip(keys, r, strict=True)) for r in self.query(
            "SELECT channel_id, how, charged, paid_a, paid_b, adjustment FROM pay_closes ORDER BY channel_id")]

    def call(self, call_id: str) -> dict[str, Any] | None:
        """One paid call with its charge split (None when the ledger never saw it)."""
        rows = self.query("SELECT c.call_id, c.channel_id, c.seqno, c.function, c.hold, c.status, c.charged, "
                          "g.provider_id, g.provider_nanoton, g.developer_id, g.royalty_nanoton, g.operator_nanoton "
                          "FROM pay_calls c LEFT JOIN pay_charges g USING (call_id) WHERE c.call_id=?", (call_id,))
        if not rows:
            return None
        keys = ("call_id", "channel_id", "seqno", "function", "hold", "status", "charged", "provider_id",
                "provider_nanoton", "developer_id", "royalty_nanoton", "operator_nanoton")
        return dict(zip(keys, rows[0], strict=True))

    def held_calls(self) -> list[tuple[str, int, int]]:
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT call_id, channel_id, hold FROM pay_calls WHERE status='held'")]

    # balances and checks
    def balances(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {p: {} for p in PARTIES}
        for party, pid, amount in self.query("SELECT party, party_id, amount FROM pay_balances ORDER BY 1, 2"):
            out.setdefault(party, {})[pid] = amount
        return out

    def paid_out(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.query(
            "SELECT provider_id, SUM(amount) FROM pay_payouts GROUP BY provider_id")}

    # one provider's own books (the dashboard's provider session): only the given nodes' rows are read
    def payouts_to(self, provider_ids: list[str], limit: int = 200) -> list[dict[str, Any]]:
        """The latest payouts to these providers (nodes), newest first."""
        if not provider_ids:
            return []
        marks = ",".join("?" * len(provider_ids))
        keys = ("provider_id", "amount", "channel_id", "seqno", "at")
        return [dict(zip(keys, r, strict=True)) for r in self.query(
            f"SELECT provider_id, amount, channel_id, seqno, at FROM pay_payouts WHERE provider_id IN ({marks}) "
            "ORDER BY at DESC LIMIT ?", (*provider_ids, limit))]

    def provider_income(self, provider_ids: list[str], table: str, since: float,
                        bucket_s: float) -> tuple[int, list[tuple[float, int]]]:
        """Earned (``table="charges"``) or paid out (``"payouts"``) for these providers: the total before
        ``since`` and the sums per ``bucket_s`` since then, oldest first."""
        if not provider_ids:
            return 0, []
        col, tab = {"charges": ("provider_nanoton", "pay_charges"), "payouts": ("amount", "pay_payouts")}[table]
        marks = ",".join("?" * len(provider_ids))
        (before,), = self.query(f"SELECT COALESCE(SUM({col}), 0) FROM {tab} WHERE provider_id IN ({marks}) "
                                "AND at<?", (*provider_ids, since))
        rows = self.query(f"SELECT CAST(at / ? AS INTEGER), SUM({col}) FROM {tab} WHERE provider_id IN ({marks}) "
                          "AND at>=? GROUP BY 1 ORDER BY 1", (bucket_s, *provider_ids, since))
        return int(before), [(float(b) * bucket_s, int(s)) for b, s in rows]

    def verify(self) -> dict[str, Any]:
        """Conservation, coverage by signed states, at most one charge per call. ``ok`` is False with a list of
        problems when any check fails."""
        problems: list[str] = []
        bal = self.balances()
        debits = sum(bal["caller"].values())
        credits = sum(bal["provider"].values()) + sum(bal["developer"].values()) + sum(bal["operator"].values())
        if debits != credits:
            problems.append(f"not conserved: caller debits {debits} != credits {credits}")
        (n, total, prov, roy, op), = self.query(
            "SELECT COUNT(*), COALESCE(SUM(total),0), COALESCE(SUM(provider_nanoton),0), "
            "COALESCE(SUM(royalty_nanoton),0), COALESCE(SUM(operator_nanoton),0) FROM pay_charges")
        if prov + roy + op != total:
            problems.append(f"charge splits {prov}+{roy}+{op} do not add up to {total}")
        (adjusted,), = self.query("SELECT COALESCE(SUM(adjustment),0) FROM pay_closes")
        if total + adjusted != debits:
            problems.append(f"charges total {total} + close adjustments {adjusted} != caller balances {debits}")
        for c in self.closes():
            if c["paid_b"] is None:
                problems.append(f"channel {c['channel_id']} closed on chain while the gateway was not watching; "
                                "what the operator was paid is unknown")
            elif c["charged"] + c["adjustment"] != c["paid_b"]:
                problems.append(f"channel {c['channel_id']}: chain paid {c['paid_b']}, ledger books "
                                f"{c['charged']} + {c['adjustment']}")
        for cid, charged, at_close in self.query(
                "SELECT c.channel_id, c.charged, x.charged FROM pay_channels c JOIN pay_closes x "
                "ON x.channel_id = c.channel_id WHERE c.charged != x.charged"):
            problems.append(f"channel {cid}: {charged - at_close} nanoton charged after the channel closed on chain")
        for cid, charged in self.query(
                "SELECT c.channel_id, c.charged - COALESCE((SELECT SUM(total) FROM pay_charges g "
                "WHERE g.channel_id=c.channel_id),0) FROM pay_channels c"):
            if charged != 0:
                problems.append(f"channel {cid}: charged counter differs from its charges by {charged}")
        for row in self.channels():
            if row.charged == 0:
                continue
            best = self.query("SELECT seqno, sent, boc FROM pay_states WHERE channel_id=? ORDER BY sent DESC, "
                              "seqno DESC LIMIT 1", (row.channel_id,))
            if not best or best[0][1] < row.charged:
                problems.append(f"channel {row.channel_id}: charged {row.charged} is not covered by a stored state")
                continue
            st = SignedSemiChannel.from_boc(bytes(best[0][2]))
            if (not st.is_signed_by(row.key_a) or st.state.channel_id != row.channel_id
                    or st.state.data.sent != best[0][1]):
                problems.append(f"channel {row.channel_id}: stored state {best[0][0]} does not verify")
        for cid, off in self.query(
                "SELECT c.channel_id, c.reserved - COALESCE((SELECT SUM(hold) FROM pay_calls h WHERE "
                "h.channel_id=c.channel_id AND h.status='held'),0) FROM pay_channels c"):
            if off != 0:
                problems.append(f"channel {cid}: reserved counter differs from its open holds by {off}")
        for (cid,) in self.query("SELECT g.call_id FROM pay_charges g LEFT JOIN pay_calls c USING (call_id) "
                                 "WHERE c.call_id IS NULL OR c.status != 'charged' OR c.charged != g.total"):
            problems.append(f"charge for call {cid} has no matching charged call")
        for (cid,) in self.query("SELECT c.call_id FROM pay_calls c LEFT JOIN pay_states s "
                                 "ON s.channel_id=c.channel_id AND s.seqno=c.seqno WHERE s.seqno IS NULL"):
            problems.append(f"call {cid} has no stored payment state")
        return {"ok": not problems, "problems": problems, "charges": n, "caller_debits": debits,
                "close_adjustments": adjusted, "closes": len(self.closes()),
                "provider_credits": sum(bal["provider"].values()), "developer_credits": sum(
                    bal["developer"].values()), "operator_fees": sum(bal["operator"].values())}
