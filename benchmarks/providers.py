"""What sharing provider nodes through the database costs a gateway (gateway/provider_book.py).

For N nodes on SQLite and on a throwaway PostgreSQL (tests/pg.py), the two backends interleaved round by round:
the time of one refresh (what each gateway does every COCOON_PROVIDER_SYNC_S: read the rows changed since the last
refresh and apply them; a fifth of the nodes heartbeated meanwhile, their load within `LOAD_STEP`, so nothing
routing uses changed), of one full refresh (every row, every COCOON_PROVIDER_FULL_SYNC_S) and of one heartbeat
(the token-checked UPDATE … RETURNING and the apply). Before the stamps (7297abf^) every refresh was a full one.

    python benchmarks/providers.py [--nodes 100,1000,5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for tests/pg.py

from cocoon_faas.gateway.db import open_database  # noqa: E402
from cocoon_faas.gateway.marketplace import Marketplace, Node  # noqa: E402
from cocoon_faas.gateway.provider_book import ProviderBook, token_hash  # noqa: E402
from cocoon_faas.gateway.provider_store import ProviderStore  # noqa: E402
from cocoon_faas.runtime.hardware import GIB, Hardware  # noqa: E402

HW = Hardware("declared", "H100", 8, 80 * GIB, None, 64, 512 * GIB)


def fill(where: Any, n: int) -> ProviderBook:
    store = ProviderStore(open_database(where))
    for i in range(n):
        store.register(Node(f"n{i:05d}", f"w{i}", "00" * 32, HW, 1000 + i, 10, f"box{i}"), f"0:{i:064x}",
                       token_hash(f"t{i}"), None, time.time())
    return ProviderBook(Marketplace(heartbeat_interval=5.0), store, full_every=3600.0,  # full reads: measured
                        leading=lambda: False)  # no sweep


async def measure(book: ProviderBook, n: int) -> tuple[float, float, float]:
    """(ms per refresh with a fifth of the nodes heartbeating in between, ms per full refresh, ms per heartbeat)."""
    for j in range(n):  # every node has reported its load once (the steady state)
        await book.heartbeat(f"n{j:05d}", f"t{j}", 0.5)
    await book.refresh(full=True)
    beats = max(1, n // 5)  # heartbeats every 5 s, refresh every second: a fifth of the rows change
    spent_hb = spent_refresh = spent_full = 0.0
    for k in range(5):
        t0 = time.perf_counter()
        for i in range(beats):
            j = (k * beats + i) % n
            await book.heartbeat(f"n{j:05d}", f"t{j}", 0.5 + 0.1 * ((i + k) % 2))
        t1 = time.perf_counter()
        await book.refresh()
        t2 = time.perf_counter()
        await book.refresh(full=True)
        spent_hb += t1 - t0
        spent_refresh += t2 - t1
        spent_full += time.perf_counter() - t2
    return spent_refresh / 5 * 1000, spent_full / 5 * 1000, spent_hb / (5 * beats) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="100,1000,5000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from tests.pg import PgCluster, unavailable

    pg = None if unavailable() else PgCluster().start()
    work = Path(tempfile.mkdtemp(prefix="cocoon-bench-providers-"))
    try:
        print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
        print(f"{'nodes':>6} {'backend':>10} {'refresh ms':>11} {'full ms':>8} {'heartbeat ms':>13}")
        for n in [int(x) for x in args.nodes.split(",")]:
            books = {"sqlite": fill(work / f"{n}.db", n)}
            if pg is not None:
                books["postgresql"] = fill(pg.new_database(), n)
            figures: dict[str, list[tuple[float, float, float]]] = {k: [] for k in books}
            for _ in range(args.rounds):  # interleaved: both backends see the same box load
                for name, book in books.items():
                    figures[name].append(asyncio.run(measure(book, n)))
            for name, runs in figures.items():
                r, f, h = (sorted(x[i] for x in runs)[len(runs) // 2] for i in range(3))
                print(f"{n:>6} {name:>10} {r:>11.2f} {f:>8.2f} {h:>13.3f}")
            for book in books.values():
                book.store.db.close()
        print(f"load average {os.getloadavg()[0]:.2f}")
    finally:
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
