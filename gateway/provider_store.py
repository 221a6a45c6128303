"""Provider nodes in the shared database: what every gateway knows about every node.

A node registers, heartbeats and leaves through whichever gateway it reaches; each of those writes one row here
(``provider_nodes``) and every gateway's marketplace is refreshed from the rows (gateway/provider_book.py).
State changes are single conditional statements, so two gateways never undo each other: a heartbeat revives a
node only while it is revivable, the sweep marks down only a node whose last heartbeat is old *in the row*, a
leave or revoke names the states it moves from. Session tokens are kept as SHA-256 hashes, checked in the same
statement that records a heartbeat. Registration nonces are claimed here too, so a registration replayed to
another gateway is refused like one replayed to the same gateway.

Versioned as the ``providers`` component (gateway/migrations.py) on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

from cocoon_faas.errors import AuthenticationError, NotFoundError
from cocoon_faas.runtime.hardware import Hardware

from .db import Database, IntegrityError
from .market_nodes import DOWN, DRAINING, LEFT, UP, Node, NodeRecord
from .migrations import Migration, migrate

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
]

_COLS = ("node_id, wallet, public_key, hardware, gpu_price, cpu_price, name, status, registered, last_seen, "
         "utilisation, attested, revivable, calls, earned")
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
                          int(r[13]), int(r[14]))

    def records(self) -> list[NodeRecord]:
        """Every node's record; a row unchanged since the last read gives the very same record object (so a
        refresh can skip it: most rows change only with a heartbeat, every few seconds)."""
        out, seen = [], {}
        for r in self.db.query(f"SELECT {_COLS} FROM provider_nodes ORDER BY node_id"):
            last = self._rows.get(r[0])
            rec = last[1] if last is not None and last[0] == r else self._record(r)
            seen[r[0]] = (r, rec)
            out.append(rec)
        self._rows = seen
        return out

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
        self.db.execute(
            "INSERT INTO provider_nodes (node_id, wallet, wallet_key, public_key, name, hardware, gpu_price, "
            "cpu_price, status, registered, last_seen, attested, token_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (node_id) DO UPDATE SET wallet=excluded.wallet, wallet_key=excluded.wallet_key, "
            "public_key=excluded.public_key, name=excluded.name, hardware=excluded.hardware, "
            "gpu_price=excluded.gpu_price, cpu_price=excluded.cpu_price, status=excluded.status, "
            "registered=excluded.registered, last_seen=excluded.last_seen, utilisation=0, "
            "attested=excluded.attested, revivable=1, token_hash=excluded.token_hash, "
            f"calls=CASE WHEN provider_nodes.status='{LEFT}' THEN 0 ELSE provider_nodes.calls END, "
            f"earned=CASE WHEN provider_nodes.status='{LEFT}' THEN 0 ELSE provider_nodes.earned END",
            (node.node_id, node.wallet, wallet_key, node.public_key, node.name,
             json.dumps(node.hardware.to_dict(), sort_keys=True), node.gpu_price, node.cpu_price, UP, now, now,
             None if attested is None else int(attested), token_hash))
        rec = self.record(node.node_id)
        assert rec is not None
        return rec

    def heartbeat(self, node_id: str, token_hash: str, load: float, now: float) -> NodeRecord:
        """Record a heartbeat (the token is checked in the same statement); a down node that may come back does."""
        rows = self.db.query(
            f"UPDATE provider_nodes SET last_seen=?, utilisation=?, status=CASE WHEN status='{DOWN}' AND "
            f"revivable=1 THEN '{UP}' ELSE status END WHERE node_id=? AND token_hash=? AND status<>'{LEFT}' "
            f"RETURNING {_COLS}", (now, max(0.0, load), node_id, token_hash))
        return self._record(rows[0]) if rows else self._refused(node_id, token_hash)

    def leave(self, node_id: str, token_hash: str) -> NodeRecord:
        """Start draining an up or down node (authenticated by its token)."""
        rows = self.db.query(
            f"UPDATE provider_nodes SET status=CASE WHEN status IN ('{UP}','{DOWN}') THEN '{DRAINING}' ELSE "
            f"status END WHERE node_id=? AND token_hash=? RETURNING {_COLS}", (node_id, token_hash))
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
        return self.db.execute(
            "UPDATE provider_nodes SET status=?, revivable=? WHERE node_id=? AND registered=? AND status IN (?,?)",
            (status, int(revivable), node_id, registered, *allowed)) > 0

    def revoke_wallet(self, wallet_key: str) -> list[NodeRecord]:
        """The wallet's nodes go down for good and lose their session (joining again is refused)."""
        rows = self.db.query(
            f"UPDATE provider_nodes SET status={_DOWN}, revivable=0, token_hash=NULL WHERE wallet_key=? AND "
            f"status<>'{LEFT}' RETURNING {_COLS}", (wallet_key,))
        return [self._record(r) for r in rows]

    def sweep(self, silent_before: float, expired_before: float, keep: Collection[str]) -> list[str]:
        """Mark down every node whose last heartbeat (whichever gateway took it) is older than
        ``silent_before``; forget down or left nodes not heard from since ``expired_before`` unless in ``keep``
        (they still hold replicas). Returns the ids marked down. Run by one gateway (the leader)."""
        down = [str(r[0]) for r in self.db.query(
            f"UPDATE provider_nodes SET status={_DOWN} WHERE status IN ('{UP}','{DRAINING}') AND last_seen < ? "
            "RETURNING node_id", (silent_before,))]
        old = [str(r[0]) for r in self.db.query(
            f"SELECT node_id FROM provider_nodes WHERE status IN ('{DOWN}','{LEFT}') AND last_seen < ?",
            (expired_before,)) if r[0] not in keep]
        if old:
            with self.db.transaction() as tx:
                tx.executemany(f"DELETE FROM provider_nodes WHERE node_id=? AND status IN ('{DOWN}','{LEFT}') "
                               "AND last_seen < ?", [(nid, expired_before) for nid in old])
        return down

    def add_usage(self, usage: Iterable[tuple[str, tuple[int, int]]]) -> None:
        """Add calls and earnings counted by one gateway to the nodes' shared totals."""
        with self.db.transaction() as tx:
            tx.executemany("UPDATE provider_nodes SET calls=calls+?, earned=earned+? WHERE node_id=?",
                           [(calls, earned, nid) for nid, (calls, earned) in usage])
