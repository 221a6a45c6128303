"""Provider nodes in the shared database: what every gateway knows about every node.

A node registers, heartbeats and leaves through whichever gateway it reaches; each of those writes one row here
(``provider_nodes``) and every gateway's marketplace is refreshed from the rows (gateway/provider_book.py).
State changes are single conditional statements, so two gateways never undo each other: a heartbeat revives a
node only while it is revivable, the sweep marks down only a node whose last heartbeat is old *in the row*, a
leave or revoke names the states it moves from. Session tokens are kept as SHA-256 hashes, checked in the same
statement that records a heartbeat. Registration nonces are claimed here too, so a registration replayed to
another gateway is refused like one replayed to the same gateway.

Versioned as the ``providers`` component (gateway/migrations.py) on SQLite and PostgreSQL alike.

Reputation is shared here too: each gateway adds the outcomes of its calls on a node (how many, how many
succeeded, their latency) once per refresh (`add_usage`), decayed to an average over about the last 100 calls on
any gateway, so a node that fails on one gateway is demoted on all.

Incremental reads. Every write that matters for routing or placement stamps the rows it changes with a change
stamp ``ver`` (registration, status, revivability, attestation, a heartbeat that revives a node or moves its load
by `LOAD_STEP` or more); `changes` then reads only rows stamped at or after a *watermark* taken before the
previous read. What a stamp is, and why no row is skipped:

- PostgreSQL: the writing transaction's id (``pg_current_xact_id()``); the watermark is the ``xmin`` of a
  snapshot, the oldest transaction still running then. Transaction ids are handed out at the first write but
  commit in any order, so a plain "greater than the largest stamp read" would skip a row whose lower stamp
  commits after the read. Every transaction below ``xmin`` has ended, so it was visible to the read that
  followed it; every one at or above it is read again next time (a row may be read twice, never missed). A
  long transaction anywhere on the server holds ``xmin`` back: reads then grow toward a full one until it ends.
- SQLite: one more than a counter (``provider_feed``) that a trigger moves up to each stamp written, in the
  writing statement. Writers are serialized by SQLite's lock, so stamps commit in order; the watermark is the
  counter (plus one) read before the rows.

A heartbeat's ``last_seen`` alone is not stamped: which nodes are silent is decided from the rows themselves by
the leader's `sweep`, whose status change is stamped (see gateway/provider_book.py for how the other gateways
count a node as heard from). Nor are the call and earning totals (`add_usage`: shown, not routed on; only a move
of the shared success rate by `SUCCESS_STEP` is stamped), nor the
deletion of long-expired down or left rows: a *full* read (every row; `records`), which each gateway makes now
and then, brings those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from cocoon_faas.errors import AuthenticationError, NotFoundError
from cocoon_faas.runtime.hardware import Hardware

from .db import Database, IntegrityError, Tx
from .market_nodes import DOWN, DRAINING, LEFT, UP, Node, NodeRecord, Usage
from .migrations import Migration, migrate


def _feed(tx: Tx, db: Database) -> None:
    """SQLite's change counter, which follows the highest stamp written (PostgreSQL stamps with transaction ids)."""
    if db.dialect == "sqlite":
        tx.execute("CREATE TABLE provider_feed (ver INTEGER NOT NULL)")
        tx.execute("INSERT INTO provider_feed VALUES (0)")
        for event in ("INSERT", "UPDATE OF ver"):
            tx.execute(f"CREATE TRIGGER provider_feed_{event.split()[0].lower()} AFTER {event} ON provider_nodes "
                       "WHEN NEW.ver > (SELECT ver FROM provider_feed) BEGIN UPDATE provider_feed SET ver=NEW.ver; "
                       "END")


PROVIDER_MIGRATIONS = [
    Migration(1, "provider nodes (registration, status, heartbeat, load, attestation, usage) and nonces", """
CREATE TABLE IF NOT EXISTS provider_nodes (
    node_id TEXT PRIMARY KEY, wallet TEXT NOT NULL, wallet_key TEXT NOT NULL, public_key TEXT NOT NULL,
    name TEXT NOT NULL, hardware TEXT NOT NULL, gpu_price INTEGER NOT NULL, cpu_price INTEGER NOT NULL,
    status TEXT NOT NULL, registered REAL NOT NULL, last_seen REAL NOT NULL, utilisation REAL NOT NULL DEFAULT 0,
    attested INTEGER, revivable INTEGER NOT NULL DEFAULT 1, token_hash TEXT, calls INTEGER NOT NULL DEFAULT 0,
    earned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS provider_nodes_by_wallet ON provider_nodes (wallet_key);
CREATE TABLE IF NOT EXISTS provider_nonces (nonce TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS provider_nonces_by_at ON provider_nonces (at)
"""),
    Migration(2, "provider nodes: change stamps for incremental reads", """
ALTER TABLE provider_nodes ADD COLUMN ver INTEGER NOT NULL DEFAULT 0;
ALTER TABLE provider_nodes ADD COLUMN shared_load REAL NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS provider_nodes_by_ver ON provider_nodes (ver)
""", step=_feed),
    Migration(3, "provider nodes: the reputation every gateway shares", """
ALTER TABLE provider_nodes ADD COLUMN rep_calls REAL NOT NULL DEFAULT 0;
ALTER TABLE provider_nodes ADD COLUMN rep_ok REAL NOT NULL DEFAULT 0;
ALTER TABLE provider_nodes ADD COLUMN rep_latency REAL NOT NULL DEFAULT 0;
ALTER TABLE provider_nodes ADD COLUMN rep_stamped REAL NOT NULL DEFAULT 1
"""),
]

# a heartbeat whose load moved this far from the load last stamped is stamped (ranking weighs 1 + load)
LOAD_STEP = 0.25
# stored outcomes that move a node's shared success rate this far from the rate last stamped are stamped
# (ranking divides by success squared: 0.1 below 1.0 is a fifth worse)
SUCCESS_STEP = 0.1
_SUCCESS = "(rep_ok + 2) / (rep_calls + 2)"  # as Reputation.success
_PG_STAMP = "pg_current_xact_id()::text::bigint"
_PG_WATERMARK = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_SQLITE_STAMP = "(SELECT ver + 1 FROM provider_feed)"

_COLS = ("node_id, wallet, public_key, hardware, gpu_price, cpu_price, name, status, registered, last_seen, "
         "utilisation, attested, revivable, calls, earned, rep_calls, rep_ok, rep_latency")
# a node that dies while draining has left; otherwise it is down
_DOWN = f"CASE WHEN status='{DRAINING}' THEN '{LEFT}' ELSE '{DOWN}' END"
_STATUSES = (UP, DOWN, DRAINING, LEFT)


class ProviderStore:
    """The ``provider_nodes`` rows over a `Database` (the store's own: SQLite file or shared PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db, "providers", PROVIDER_MIGRATIONS)
        self._hardware: dict[str, Hardware] = {}  # JSON text -> parsed (rows are re-read every second)
        self._rows: dict[str, tuple[tuple[Any, ...], NodeRecord]] = {}  # node -> (row, record) last read
        self._since: int | None = None  # the watermark for the next incremental read (None: read every row)

    # -- rows -> records -----------------------------------------------------------------------------------
    def _record(self, r: tuple[Any, ...]) -> NodeRecord:
        hw = self._hardware.get(r[3])
        if hw is None:
            if len(self._hardware) > 10_000:
                self._hardware.clear()
            hw = self._hardware[r[3]] = Hardware.from_dict(json.loads(r[3]))
        status = str(r[7]) if r[7] in _STATUSES else DOWN  # a value this release does not know routes nothing
        return NodeRecord(Node(r[0], r[1], r[2], hw, int(r[4]), int(r[5]), r[6]), status, float(r[8]),
                          float(r[9]), float(r[10]), None if r[11] is None else bool(r[11]), bool(r[12]),
                          int(r[13]), int(r[14]), float(r[15]), float(r[16]), float(r[17]))

    def _cached(self, r: tuple[Any, ...]) -> NodeRecord:
        """A row unchanged since the last read gives the very same record object (a refresh skips it)."""
        last = self._rows.get(r[0])
        rec = last[1] if last is not None and last[0] == r else self._record(r)
        self._rows[r[0]] = (r, rec)
        return rec

    def records(self) -> list[NodeRecord]:
        """Every node's record (a full read)."""
        rows = self.db.query(f"SELECT {_COLS} FROM provider_nodes ORDER BY node_id")
        self._rows = {r[0]: self._rows[r[0]] for r in rows if r[0] in self._rows}  # forget deleted rows
        return [self._cached(r) for r in rows]

    def changes(self, full: bool = False) -> tuple[list[NodeRecord], bool]:
        """The records stamped since the previous call (see the module docstring), or every record when ``full``
        or on the first call. Returns them and whether the read was full (a node missing from it is gone)."""
        mark = self._watermark()  # before the rows: what commits after it is read again next time
        if full or self._since is None:
            out = self.records()
        else:
            out = [self._cached(r) for r in self.db.query(
                f"SELECT {_COLS} FROM provider_nodes WHERE ver >= ? ORDER BY node_id", (self._since,))]
        full = full or self._since is None
        self._since = mark
        return out, full

    def _watermark(self) -> int:
        if self.db.dialect == "postgresql":
            return int(self.db.query(_PG_WATERMARK)[0][0])
        return int(self.db.query("SELECT ver FROM provider_feed")[0][0]) + 1

    def _stamped(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one write that stamps the rows it changes (``{ver}`` in ``sql``); returns its RETURNING rows."""
        return self.db.query(sql.replace("{ver}", _PG_STAMP if self.db.dialect == "postgresql" else _SQLITE_STAMP),
                             args)

    def record(self, node_id: str) -> NodeRecord | None:
        rows = self.db.query(f"SELECT {_COLS} FROM provider_nodes WHERE node_id=?", (node_id,))
        return self._record(rows[0]) if rows else None

    # -- writes ------------------------------------------------------------------------------------------
    def claim_nonce(self, nonce: str, now: float) -> bool:
        """True the first time any gateway sees ``nonce`` (within the window kept; see `prune_nonces`)."""
        try:
            self.db.execute("INSERT INTO provider_nonces VALUES (?,?)", (nonce, now))
        except IntegrityError:
            return False
        return True

    def prune_nonces(self, before: float) -> None:
        self.db.execute("DELETE FROM provider_nonces WHERE at < ?", (before,))

    def register(self, node: Node, wallet_key: str, token_hash: str, attested: bool | None,
                 now: float) -> NodeRecord:
        """Add or refresh a node: up, revivable, with a new session token. A node that had left starts its
        counters afresh (it is a new registration); one registering again keeps them."""
        rows = self._stamped(
            "INSERT INTO provider_nodes (node_id, wallet, wallet_key, public_key, name, hardware, gpu_price, "
            "cpu_price, status, registered, last_seen, attested, token_hash, ver) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,{ver}) "
            "ON CONFLICT (node_id) DO UPDATE SET wallet=excluded.wallet, wallet_key=excluded.wallet_key, "
            "public_key=excluded.public_key, name=excluded.name, hardware=excluded.hardware, "
            "gpu_price=excluded.gpu_price, cpu_price=excluded.cpu_price, status=excluded.status, "
            "registered=excluded.registered, last_seen=excluded.last_seen, utilisation=0, shared_load=0, "
            "attested=excluded.attested, revivable=1, token_hash=excluded.token_hash, ver=excluded.ver, "
            f"calls=CASE WHEN provider_nodes.status='{LEFT}' THEN 0 ELSE provider_nodes.calls END, "
            f"earned=CASE WHEN provider_nodes.status='{LEFT}' THEN 0 ELSE provider_nodes.earned END "
            f"RETURNING {_COLS}",
            (node.node_id, node.wallet, wallet_key, node.public_key, node.name,
             json.dumps(node.hardware.to_dict(), sort_keys=True), node.gpu_price, node.cpu_price, UP, now, now,
             None if attested is None else int(attested), token_hash))
        return self._record(rows[0])

    def heartbeat(self, node_id: str, token_hash: str, load: float, now: float) -> NodeRecord:
        """Record a heartbeat (the token is checked in the same statement); a down node that may come back does.
        Stamped only when it revives the node or moves its load by `LOAD_STEP` (module docstring)."""
        load = max(0.0, load)
        revives = f"status='{DOWN}' AND revivable=1"
        stamp = f"({revives} OR ABS(shared_load - ?) >= {LOAD_STEP})"
        where = f"WHERE node_id=? AND token_hash=? AND status<>'{LEFT}'"
        # most heartbeats change nothing routing uses: they touch neither the stamp, its index nor (SQLite) the
        # trigger; the others take the stamped statement
        rows = self.db.query(f"UPDATE provider_nodes SET last_seen=?, utilisation=? {where} AND NOT {stamp} "
                             f"RETURNING {_COLS}", (now, load, node_id, token_hash, load))
        if not rows:  # (or a refused token: this matches nothing either)
            rows = self._stamped(
                f"UPDATE provider_nodes SET last_seen=?, utilisation=?, status=CASE WHEN {revives} THEN '{UP}' "
                f"ELSE status END, ver={{ver}}, shared_load=? {where} RETURNING {_COLS}",
                (now, load, load, node_id, token_hash))
        return self._record(rows[0]) if rows else self._refused(node_id, token_hash)

    def leave(self, node_id: str, token_hash: str) -> NodeRecord:
        """Start draining an up or down node (authenticated by its token)."""
        rows = self._stamped(
            f"UPDATE provider_nodes SET status=CASE WHEN status IN ('{UP}','{DOWN}') THEN '{DRAINING}' ELSE "
            f"status END, ver={{ver}} WHERE node_id=? AND token_hash=? RETURNING {_COLS}", (node_id, token_hash))
        return self._record(rows[0]) if rows else self._refused(node_id, token_hash)

    def _refused(self, node_id: str, token_hash: str) -> NodeRecord:
        """Why a token-checked update matched nothing: unknown node, no or wrong token, or it has left."""
        rows = self.db.query("SELECT token_hash, status FROM provider_nodes WHERE node_id=?", (node_id,))
        if not rows:
            raise NotFoundError(f"no provider node {node_id!r}; register it with `cocoon provider join`")
        if rows[0][0] is None:
            raise AuthenticationError(f"node {node_id} has no session (its wallet was revoked or it never "
                                      "joined); join again")
        if rows[0][0] != token_hash:
            raise AuthenticationError("missing or wrong node token; use the token the registration returned")
        rec = self.record(node_id)  # it has left: the agent stops on this status
        assert rec is not None
        return rec

    def mark(self, node_id: str, registered: float, status: str, revivable: bool) -> bool:
        """Store a change one gateway decided (its Ray node died: down; drained: left) for the registration it
        saw; a newer registration, or a node already left, is not touched. True when stored."""
        allowed = (UP, DRAINING) if status == DOWN else (DRAINING, DOWN)
        return bool(self._stamped(
            "UPDATE provider_nodes SET status=?, revivable=?, ver={ver} WHERE node_id=? AND registered=? AND "
            "status IN (?,?) RETURNING node_id", (status, int(revivable), node_id, registered, *allowed)))

    def revoke_wallet(self, wallet_key: str) -> list[NodeRecord]:
        """The wallet's nodes go down for good and lose their session (joining again is refused)."""
        rows = self._stamped(
            f"UPDATE provider_nodes SET status={_DOWN}, revivable=0, token_hash=NULL, ver={{ver}} WHERE "
            f"wallet_key=? AND status<>'{LEFT}' RETURNING {_COLS}", (wallet_key,))
        return [self._record(r) for r in rows]

    def sweep(self, silent_before: float, expired_before: float, keep: Callable[[str], bool]) -> list[str]:
        """Mark down every node whose last heartbeat (whichever gateway took it) is older than
        ``silent_before``; forget down or left nodes not heard from since ``expired_before`` unless ``keep``
        says they still hold replicas. Returns the ids marked down. Run by one gateway (the leader)."""
        down = [str(r[0]) for r in self._stamped(
            f"UPDATE provider_nodes SET status={_DOWN}, ver={{ver}} WHERE status IN ('{UP}','{DRAINING}') AND "
            "last_seen < ? RETURNING node_id", (silent_before,))]
        old = [str(r[0]) for r in self.db.query(
            f"SELECT node_id FROM provider_nodes WHERE status IN ('{DOWN}','{LEFT}') AND last_seen < ?",
            (expired_before,)) if not keep(r[0])]
        if old:
            with self.db.transaction() as tx:
                tx.executemany(f"DELETE FROM provider_nodes WHERE node_id=? AND status IN ('{DOWN}','{LEFT}') "
                               "AND last_seen < ?", [(nid, expired_before) for nid in old])
        return down

    def add_usage(self, usage: Iterable[tuple[str, Usage]], window: int = 100) -> None:
        """Add what one gateway counted (one batch per refresh, not a write per call) to the nodes' shared totals
        and reputation (see `Usage`). Stamped only where the shared success rate moved `SUCCESS_STEP` from the
        rate last stamped (totals alone reach the other gateways at their next full read)."""
        usage = list(usage)
        keep = 1.0 - 1.0 / max(1, window)
        stamp = _PG_STAMP if self.db.dialect == "postgresql" else _SQLITE_STAMP
        with self.db.transaction() as tx:
            tx.executemany(
                "UPDATE provider_nodes SET calls=calls+?, earned=earned+?, rep_calls=rep_calls*?+?, "
                "rep_ok=rep_ok*?+?, rep_latency=rep_latency*?+? WHERE node_id=?",
                [(u.calls, u.earned, keep ** u.calls, u.calls, keep ** u.calls, u.ok, keep ** u.calls,
                  u.latency_s, nid) for nid, u in usage])
            tx.executemany(
                f"UPDATE provider_nodes SET ver={stamp}, rep_stamped={_SUCCESS} WHERE node_id=? AND "
                f"ABS({_SUCCESS} - rep_stamped) >= {SUCCESS_STEP}", [(nid,) for nid, u in usage if u.calls])
