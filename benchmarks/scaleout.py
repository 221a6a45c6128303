"""Several gateways on one PostgreSQL (`benchmarks/gateway.py --gateways 1,2`): throughput and CPU per call.

For each N: a throwaway PostgreSQL (tests/pg.py), `cocoon serve --workers N` on it (N gateway processes sharing
one port, one Ray), the no-op function deployed, then the same load generator as the gateway benchmark at each
concurrency. Reported per call: the gateway session's CPU (its processes, Ray and the replica included, as in the
gateway benchmark) and PostgreSQL's CPU (the server and its backends). Then the money path alone: paid-call
holds and charges (`PaymentGate.authorize` + `settle`, two transactions, the per-channel row lock) from T
threads against SQLite and PostgreSQL, with the Python side's and the database's CPU per paid call: the figures
the capacity model in RESULTS.md scales to 100k paid calls/s.

Everything runs on this machine (2 cores here, shared): N gateways compete with each other, the load generator
and PostgreSQL for the same two cores, so expect little gain; the CPU per call is the transferable figure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for tests/pg.py (appended: benchmarks/ stays first)

import gateway as bench  # noqa: E402 - benchmarks/gateway.py: load generators and process helpers

ROOT = bench.ROOT


def _ticks(pid: int) -> float:
    """CPU seconds of a process and of its children it has reaped."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def pg_cpu_s(pg: Any) -> float:
    """The PostgreSQL server's CPU so far: the postmaster (reaped backends included) and its live children."""
    try:
        master = int((pg.data / "postmaster.pid").read_text().split()[0])
    except OSError:
        return 0.0
    total = _ticks(master)
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == master:
                f = (p / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


def gateways_run(pg: Any, n: int, wrk: str | None, levels: list[int], seconds: float, work: Path) -> dict[str, Any]:
    port = bench.free_port()
    home = work / f"home-{n}"
    env = {**os.environ, "COCOON_HOME": str(home), "COCOON_GATEWAY_URL": f"http://127.0.0.1:{port}",
           "COCOON_RAY_NUM_CPUS": "8", "COCOON_DATABASE_URL": pg.new_database(), "PYTHONUNBUFFERED": "1"}
    log = open(work / f"gateways-{n}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port), "--workers", str(n)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not bench._get_ok(f"http://127.0.0.1:{port}/healthz"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateways did not start: {(work / f'gateways-{n}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        r = subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(bench.NOOP_APP)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"deploy failed: {r.stdout}{r.stderr}")
        headers = {"Authorization": f"Bearer {(home / 'api_key').read_text().strip()}"}
        target = bench.Target(f"http://127.0.0.1:{port}/fn/noop", headers, None, {})
        bench._wait_first_response(target.url, headers, deadline)
        drive = (lambda c, s: bench.run_wrk(wrk, target, c, s)) if wrk else \
            (lambda c, s: bench.run_asyncio(target, c, s))
        drive(16, min(2.0, seconds))
        time.sleep(1.5)  # every worker has synced the replica registry
        drive(16, min(2.0, seconds))
        rows = []
        for c in levels:
            cpu0, pg0 = bench.session_cpu_s(proc.pid), pg_cpu_s(pg)
            s = drive(c, seconds)
            cpu, pgc = bench.session_cpu_s(proc.pid) - cpu0, pg_cpu_s(pg) - pg0
            rows.append({"gateways": n, "concurrency": c, "rps": s.rps, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
                         "errors": s.errors, "gateway_cpu_us": cpu / s.requests * 1e6 if s.requests else None,
                         "pg_cpu_us": pgc / s.requests * 1e6 if s.requests else None})
        return {"gateways": n, "rows": rows}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        bench._kill_session(proc.pid)


def money_run(where: Any, pg: Any, threads: int, seconds: float, work: Path) -> dict[str, Any]:
    """Holds + charges from `threads` threads, one channel each, through PaymentGate on one database."""
    from cocoon_faas.gateway.db import open_database
    from cocoon_faas.gateway.ledger import Ledger
    from cocoon_faas.gateway.payments import FeePolicy, PaymentGate
    from cocoon_faas.ton.client import ChannelSigner
    from cocoon_faas.ton.keys import PrivateKey

    op = PrivateKey(b"\x07" * 32)
    ledger = Ledger(open_database(where), home=work)
    gate = PaymentGate(ledger, op, FeePolicy(bps=500), gateway_id="bench", lease_s=60)
    signers = []
    for t in range(threads):
        key = PrivateKey(bytes([t + 1]) * 32)
        ledger.add_channel(1000 + t, key.public_key(), op.public_key(), "0:" + "00" * 32, f"c{t}", 10**15)
        signers.append(ChannelSigner(work / f"s{t}-{time.monotonic_ns()}.json", key, 1000 + t, 10**15))
    counts = [0] * threads
    stop = threading.Event()

    def work_loop(t: int) -> None:
        s, i = signers[t], 0
        while not stop.is_set():
            i += 1
            ticket = s.sign_for_call(10_000)
            h = gate.authorize(ticket.header, f"b{t}-{i}", "noop", 10_000)
            s.complete(ticket, gate.settle(h, "prov", 1000, "dev", 100))
            counts[t] += 1

    pg0, cpu0, t0 = pg_cpu_s(pg) if pg else 0.0, time.process_time(), time.monotonic()
    ts = [threading.Thread(target=work_loop, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in ts:
        th.join()
    wall, cpu, pgc = time.monotonic() - t0, time.process_time() - cpu0, (pg_cpu_s(pg) - pg0) if pg else None
    n = sum(counts)
    ok = ledger.verify()["ok"]
    ledger.close()
    return {"backend": "postgresql" if pg else "sqlite", "threads": threads, "paid_calls": n, "per_s": n / wall,
            "python_cpu_us": cpu / n * 1e6, "db_cpu_us": pgc / n * 1e6 if pgc is not None else None,
            "ledger_ok": ok}


def main(gateways: list[int], levels: list[int], seconds: float, wrk: str | None) -> int:
    from tests.pg import PgCluster, unavailable

    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    print(f"# several gateways on PostgreSQL: N={gateways}, c={levels}, {seconds:g}s each, "
          f"{'wrk' if wrk else 'asyncio client'}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    pg = PgCluster().start()
    results: list[dict[str, Any]] = []
    money: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cocoon-scaleout-") as tmp:
            for n in gateways:
                print(f"## {n} gateway process(es) ...", flush=True)
                results.append(gateways_run(pg, n, wrk, levels, seconds, Path(tmp)))
                for r in results[-1]["rows"]:
                    print(f"   c={r['concurrency']:>3} {r['rps']:>8,.0f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 "
                          f"{r['p99_ms']:7.2f} ms  gateway {r['gateway_cpu_us'] or 0:5.0f} µs/call  PostgreSQL "
                          f"{r['pg_cpu_us'] or 0:4.0f} µs/call  errors {r['errors']}  (load {os.getloadavg()[0]:.1f})",
                          flush=True)
            print("## money path: authorize + settle per paid call", flush=True)
            for where, server in ((Path(tmp) / "ledger.db", None), (pg.new_database(), pg)):
                m = money_run(where, server, 4, seconds, Path(tmp))
                money.append(m)
                db = f"{m['db_cpu_us']:.0f} µs" if m["db_cpu_us"] is not None else "(in process)"
                print(f"   {m['backend']:>10}: {m['per_s']:>7,.0f} paid calls/s with {m['threads']} threads; "
                      f"Python {m['python_cpu_us']:.0f} µs/call, database server {db}/call; ledger verifies: "
                      f"{m['ledger_ok']}", flush=True)
    finally:
        pg.stop()
    base = {r["concurrency"]: r["rps"] for r in results[0]["rows"]} if results else {}
    print("\n| gateways | c | req/s | vs 1 | p50 ms | p99 ms | gateway CPU µs/call | PostgreSQL CPU µs/call |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            ratio = r["rps"] / base[r["concurrency"]] if base.get(r["concurrency"]) else 0
            print(f"| {r['gateways']} | {r['concurrency']} | {r['rps']:,.0f} | {ratio:.2f}x | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['gateway_cpu_us'] or 0:.0f} | {r['pg_cpu_us'] or 0:.0f} |")
    print(f"\nload average at the end: {os.getloadavg()}")
    return 0
