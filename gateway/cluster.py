"""Gateways sharing one database: who is alive, what load each reports, and which one leads.

Each gateway process has a row in ``gateways`` (heartbeat every `beat_s`, with its load figures) and holds a
session lock named after its id for as long as it lives: a PostgreSQL advisory lock (released by the server the
moment the process's connection dies, SIGKILL included) or, on SQLite, a flock on a file beside the database.
So "is gateway X dead?" has a fast exact answer (the lock can be taken) as well as the slow one (its heartbeat
is older than `lease_s`, for a machine cut off without its connection being closed).

The leader is whoever holds the leader lock: it runs the decisions that must happen once (autoscaling, replica
lifecycle, releasing dead gateways' holds, failing their async calls). Followers retry the lock every beat, so a
new leader takes over within about one beat of the old one's death.

    cluster = Cluster(db, gateway_id, lease_s=10)
    cluster.beat({"echo": {"demand": 3}})        # each second
    if cluster.try_lead(): ...                   # leader-only work
    cluster.close()
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .db import Database, IntegrityError
from .migrations import Migration, migrate

CLUSTER_MIGRATIONS = [
    Migration(1, "gateways: heartbeat, leader flag, load", """
CREATE TABLE IF NOT EXISTS gateways (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, started REAL NOT NULL, last_seen REAL NOT NULL,
    leader INTEGER NOT NULL DEFAULT 0, load TEXT NOT NULL DEFAULT '{}')
"""),
]

LEADER_KEY = zlib.crc32(b"cocoon-gateway-leader")


def lock_key(gateway_id: str) -> int:
    """The gateway's liveness lock id: a signed 64-bit integer (PostgreSQL advisory lock keys are bigint)."""
    return int.from_bytes(hashlib.sha256(gateway_id.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class GatewayInfo:
    id: str
    url: str
    started: float
    last_seen: float
    leader: bool
    load: dict[str, Any]


class Cluster:
    def __init__(self, db: Database, gateway_id: str, lease_s: float = 10.0, url: str = "") -> None:
        self.db, self.id, self.lease_s, self.url = db, gateway_id, lease_s, url
        migrate(db, "cluster", CLUSTER_MIGRATIONS)
        self._life = db.try_lock(lock_key(gateway_id))
        if self._life is None:
            raise IntegrityError("gateways", f"gateway id {gateway_id!r} is already alive; ids must be unique")
        self._leader: Any = None
        now = time.time()
        db.execute("INSERT INTO gateways (id, url, started, last_seen) VALUES (?,?,?,?) ON CONFLICT (id) DO "
                   "UPDATE SET last_seen=excluded.last_seen", (gateway_id, url, now, now))

    @property
    def is_leader(self) -> bool:
        return self._leader is not None

    def beat(self, load: dict[str, Any] | None = None) -> None:
        """Say this gateway is alive, with its load figures (per function: demand = in flight + queued)."""
        self.db.execute("UPDATE gateways SET last_seen=?, leader=?, load=? WHERE id=?",
                        (time.time(), int(self.is_leader), json.dumps(load or {}), self.id))

    def try_lead(self) -> bool:
        """Take the leader lock if free; keep it while the connection holding it lives. True when leading."""
        if self._leader is not None:
            alive = getattr(self._leader, "alive", None)
            if alive is None or alive():
                return True
            self._leader.release()  # the session holding the lock died with the database connection
            self._leader = None
        self._leader = self.db.try_lock(LEADER_KEY)
        return self._leader is not None

    def resign(self) -> None:
        if self._leader is not None:
            self._leader.release()
            self._leader = None

    def gateways(self) -> list[GatewayInfo]:
        return [GatewayInfo(r[0], r[1], r[2], r[3], bool(r[4]), json.loads(r[5])) for r in self.db.query(
            "SELECT id, url, started, last_seen, leader, load FROM gateways ORDER BY started")]

    def alive(self) -> list[GatewayInfo]:
        """Gateways whose heartbeat is recent and whose liveness lock is still held."""
        cutoff = time.time() - self.lease_s
        return [g for g in self.gateways() if g.id == self.id or (g.last_seen >= cutoff and not self.is_dead(g.id))]

    def is_dead(self, gateway_id: str) -> bool:
        if gateway_id == self.id:
            return False
        rows = self.db.query("SELECT last_seen FROM gateways WHERE id=?", (gateway_id,))
        if not rows or rows[0][0] < time.time() - self.lease_s:
            return True
        probe = self.db.try_lock(lock_key(gateway_id))
        if probe is None:
            return False  # its process still holds its lock
        probe.release()
        return True

    def forget_dead(self) -> list[str]:
        """Leader housekeeping: drop the rows (and SQLite lock files) of gateways that are gone."""
        gone = [g.id for g in self.gateways() if self.is_dead(g.id)]
        for gid in gone:
            self.db.execute("DELETE FROM gateways WHERE id=?", (gid,))
            path = getattr(self.db, "path", None)
            if path is not None:
                Path(f"{path}.lock-{lock_key(gid)}").unlink(missing_ok=True)
        return gone

    def demand(self, exclude_self: bool = False) -> dict[str, int]:
        """Per function: the demand every live gateway reported (what the leader's autoscaler scales to)."""
        total: dict[str, int] = {}
        for g in self.alive():
            if exclude_self and g.id == self.id:
                continue
            for fn, figures in g.load.items():
                total[fn] = total.get(fn, 0) + int(figures.get("demand", 0))
        return total

    def close(self) -> None:
        """A clean exit: hand leadership over at once and leave the table."""
        self.resign()
        try:
            self.db.execute("DELETE FROM gateways WHERE id=?", (self.id,))
        finally:
            if self._life is not None:
                self._life.release()
                self._life = None
            path = getattr(self.db, "path", None)
            if path is not None:
                Path(f"{path}.lock-{lock_key(self.id)}").unlink(missing_ok=True)
