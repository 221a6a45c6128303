"""The call path against its peers: one no-op function served five ways, one load generator, one run.

Issue 2 ("Done means"): our gateway vs Ray Serve (default HTTP proxy, and its best configuration here,
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` hitting the replica's direct-ingress port) vs a bare Starlette echo app vs
Starlette + one Ray actor call per request, at concurrency 1, 16 and 64. Targets at concurrency 64: at least 1.5x
Ray Serve's best with a lower p99, at least 0.5x the bare echo app; deploy-to-first-response under 2 s.

Each system runs in its own subprocess (its own session, so its Ray dies with it) and is shut down before the
next one starts: on a 2-core machine two systems side by side would measure each other. Everything listens on
127.0.0.1. The load generator is wrk (Debian's ``wrk``) driven by a Lua script that reports exact percentiles,
or, when wrk is missing, an asyncio HTTP/1.1 keep-alive client in this process (which then competes with the
server for the two cores: its numbers are lower bounds, and the report says which generator ran).

    python benchmarks/gateway.py                       # every system, c = 1, 16, 64, 5 s each
    python benchmarks/gateway.py --only ours,ours-workers,serve-direct --concurrency 64   # each at its best here
    python benchmarks/gateway.py --only ours,echo --duration 3 --json /tmp/gw.json
    python benchmarks/gateway.py --function plain --only ours,serve-direct   # a plain `def`, default settings

`--function plain` serves what a user writes first (benchmarks/apps/plain.py: a plain `def`, no options) on our
gateway and, the same function with Ray Serve's defaults (`@serve.deployment` and nothing else), on Ray Serve;
after the usual warm-up (which also lets our autoscaler reach its default replica count).

    python benchmarks/gateway.py --gateways 1,2 --concurrency 64   # several gateways on PostgreSQL (scaleout.py)

Ray Serve's direct ingress (ray/serve/_private/replica.py, ``_maybe_start_direct_ingress_servers``): with
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (which turns on ``RAY_SERVE_ENABLE_DIRECT_INGRESS``) every ingress replica
runs its own HTTP server on a port the controller allocates from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``
(30000) upward; the controller's ``get_target_groups()`` lists those replica targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOOP_APP = ROOT / "benchmarks" / "apps" / "noop.py"
PLAIN_APP = ROOT / "benchmarks" / "apps" / "plain.py"
FUNCTION = {"name": "noop"}  # --function: noop (async, tuned like the peers) or plain (a default `def`)
WARMUP = {"s": 2.0}  # --warmup: seconds of load before measuring (longer lets autoscaling settle)
SYSTEMS = ("ours", "ours-workers", "ours-relay", "serve-proxy", "serve-direct", "echo", "actor")
CORES = os.cpu_count() or 1
TITLES = {
    "ours": "cocoon gateway",
    "ours-workers": f"cocoon gateway, `cocoon serve --workers {CORES}` (a process per core, one port)",
    "ours-relay": "cocoon gateway, every call through the replica actor (COCOON_DIRECT_CALLS=false)",
    "serve-proxy": "Ray Serve, default HTTP proxy",
    "serve-direct": "Ray Serve, THROUGHPUT_OPTIMIZED direct ingress",
    "echo": "bare Starlette echo (uvicorn)",
    "actor": "Starlette + 1 Ray actor call/request",
}
BODY = b"{}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Target:
    """Where the load goes: a URL, the request's headers, and how long the system took to deploy."""

    url: str
    headers: dict[str, str]
    deploy_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stats:
    concurrency: int
    requests: int  # successful (2xx) responses
    errors: int  # non-2xx responses and socket errors
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None = None  # CPU time the system's processes spent per successful request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# -- load generators -------------------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.body = %s
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for ASCII text


def wrk_path() -> str | None:
    """wrk if installed and runnable, else None (then the asyncio client is used)."""
    path = shutil.which("wrk")
    if path is None:
        return None
    try:
        subprocess.run([path, "--version"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path


def run_wrk(wrk: str, target: Target, concurrency: int, seconds: float) -> Stats:
    headers = "\n".join(f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in target.headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA % (_lua_str(BODY.decode()), headers))
        script = f.name
    try:
        cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", script,
               target.url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary; its output was:\n{out}")
    d = json.loads(line[8:])
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return Stats(concurrency, d["requests"] - d["status"], errors, d["duration_us"] / 1e6,
                 d["p50_us"] / 1000, d["p99_us"] / 1000)


async def _one_conn(host: str, port: int, request: bytes, stop_at: float, lat: list[float]) -> int:
    """One keep-alive connection sending requests back to back; returns how many failed."""
    errors = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            hdrs = {k.strip().lower(): v.strip() for k, _, v in
                    (ln.partition(b":") for ln in head.split(b"\r\n")[1:] if ln)}
            if b"content-length" in hdrs:
                await reader.readexactly(int(hdrs[b"content-length"]))
            elif hdrs.get(b"transfer-encoding") == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            if 200 <= status < 300:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


def run_asyncio(target: Target, concurrency: int, seconds: float) -> Stats:
    from urllib.parse import urlsplit

    u = urlsplit(target.url)
    hdrs = {"Host": u.netloc, "Content-Type": "application/json", "Content-Length": str(len(BODY)),
            **target.headers}
    request = (f"POST {u.path or '/'} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
               + "\r\n").encode() + BODY

    async def main() -> tuple[list[float], int, float]:
        lat: list[float] = []
        t0 = time.monotonic()
        res = await asyncio.gather(*(_one_conn(u.hostname or "127.0.0.1", u.port or 80, request, t0 + seconds, lat)
                                     for _ in range(concurrency)), return_exceptions=True)
        errs = sum(r if isinstance(r, int) else 1 for r in res)
        return lat, errs, time.monotonic() - t0

    lat, errs, took = asyncio.run(main())
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [lat[0] if lat else 0.0] * 99
    return Stats(concurrency, len(lat), errs, took, q[49] * 1000, q[98] * 1000)


# -- systems: each a subprocess in its own session ---------------------------------------------------------

def _post_ok(url: str, headers: dict[str, str], timeout: float = 5) -> bool:
    req = urllib.request.Request(url, data=BODY, headers={"Content-Type": "application/json", **headers},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _wait_first_response(url: str, headers: dict[str, str], deadline: float) -> None:
    while time.monotonic() < deadline:
        if _post_ok(url, headers, timeout=2):
            return
        time.sleep(0.01)
    raise TimeoutError(f"no 2xx from {url} in time")


class System:
    """A running system under test; `stop()` takes down its whole session (Ray included)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.log"

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, cwd=ROOT,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def start(self, timeout: float = 180) -> Target:
        if self.name.startswith("ours"):
            return self._start_ours(timeout)
        ready = self.workdir / f"{self.name}.ready"
        env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} if self.name == "serve-direct" else {}
        self._spawn([sys.executable, str(Path(__file__).resolve()), "_child", self.name, str(free_port()),
                     str(ready), FUNCTION["name"]], env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                d = json.loads(ready.read_text())
                return Target(d["url"], d.get("headers", {}), d.get("deploy_s"), d.get("notes", {}))
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not start in {timeout:.0f}s; see {self.log}")

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")

    def _start_ours(self, timeout: float) -> Target:
        port = free_port()
        home = self.workdir / "cocoon-home"
        env = {"COCOON_HOME": str(home), "COCOON_GATEWAY_URL": f"http://127.0.0.1:{port}",
               "COCOON_RAY_NUM_CPUS": "8", "COCOON_DIRECT_CALLS": "false" if self.name == "ours-relay" else "true",
               "COCOON_WORKERS": str(CORES) if self.name == "ours-workers" else "1"}
        self._spawn([sys.executable, "-m", "cocoon_faas", "serve", "--port", str(port)], env)
        deadline = time.monotonic() + timeout
        t_start = time.monotonic()
        while not _get_ok(f"http://127.0.0.1:{port}/healthz"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway did not start; see {self.log}")
            time.sleep(0.1)
        started_s = time.monotonic() - t_start
        key = (home / "api_key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        fn = FUNCTION["name"]
        url = f"http://127.0.0.1:{port}/fn/{'hello' if fn == 'plain' else 'noop'}"
        # Deploy-to-first-response, as a user sees it: the `cocoon deploy` command, then the first call.
        t0 = time.monotonic()
        app = PLAIN_APP if fn == "plain" else NOOP_APP
        r = subprocess.run([sys.executable, "-m", "cocoon_faas", "deploy", str(app)], cwd=ROOT,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
        cli_s = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"cocoon deploy failed: {r.stdout}{r.stderr}")
        _wait_first_response(url, headers, deadline)
        deploy_s = time.monotonic() - t0
        return Target(url, headers, deploy_s, {"gateway_start_s": round(started_s, 2),
                                               "deploy_cli_s": round(cli_s, 2)})

    def stop(self) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGINT if self.name.startswith("ours") else signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
        _kill_session(p.pid)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _session_members(sid: int) -> list[int]:
    """The session's processes and their descendants: a sandbox child runs in a session of its own (bubblewrap's
    --new-session), and its CPU is part of what a call costs."""
    parent: dict[int, int] = {}
    members = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(d.name)] = int(fields[1])  # fields after "(comm)": state ppid pgrp session ...
        if int(fields[3]) == sid:
            members.add(int(d.name))
    grown = True
    while grown:
        more = {pid for pid, ppid in parent.items() if ppid in members and pid not in members}
        members |= more
        grown = bool(more)
    return sorted(members)


def session_cpu_s(sid: int) -> float:
    """User+system CPU seconds of the live processes in a session (robust to other tenants' load)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _session_members(sid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        total += int(f[11]) + int(f[12])  # utime, stime
    return total / tick


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session this benchmark created for one system (Ray workers too)."""
    for _ in range(50):
        left = _session_members(sid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# -- children: the peer systems, started by `gateway.py _child NAME PORT READY_FILE` -------------------------

def _write_ready(path: str, **data: Any) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(data))
    os.replace(tmp, path)


def _until_signalled() -> None:
    def _stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:
        time.sleep(3600)


def _init_ray() -> None:
    import logging

    import ray

    # address="local": always a fresh Ray of our own, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1")


def child_serve(name: str, port: int, ready: str, function: str = "noop") -> None:
    import ray
    from ray import serve
    from starlette.requests import Request

    _init_ray()
    try:
        if function == "plain":
            @serve.deployment
            class Noop:  # the same plain function, every Ray Serve setting at its default
                def __call__(self, request: Request) -> dict[str, str]:
                    return {"message": "Hello, world."}
        else:
            @serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
            class Noop:  # type: ignore[no-redef]
                async def __call__(self, request: Request) -> int:
                    json.loads(await request.body() or b"{}")
                    return 0

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        proxy_url = f"http://127.0.0.1:{port}/"
        t0 = time.monotonic()
        serve.run(Noop.bind(), name="noop", route_prefix="/")
        url = proxy_url
        notes: dict[str, Any] = {}
        if name == "serve-direct":
            url = _direct_ingress_url(port, time.monotonic() + 60)
            notes["direct_ingress_port"] = int(url.rsplit(":", 1)[1].strip("/"))
        _wait_first_response(url, {}, time.monotonic() + 120)
        deploy_s = time.monotonic() - t0
        _write_ready(ready, url=url, deploy_s=deploy_s, notes=notes)
        _until_signalled()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _direct_ingress_url(proxy_port: int, deadline: float) -> str:
    """The replica's own HTTP port, as the controller lists it (there is no public API for it in Ray 2.60)."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    while time.monotonic() < deadline:
        for group in ray.get(controller.get_target_groups.remote()):
            if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP":
                continue
            for t in group.targets:
                if t.port != proxy_port:
                    return f"http://127.0.0.1:{t.port}/"
        time.sleep(0.05)
    raise TimeoutError("Ray Serve listed no direct-ingress replica port; is RAY_SERVE_THROUGHPUT_OPTIMIZED=1 set?")


def child_starlette(name: str, port: int, ready: str) -> None:
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    actor: Any = None
    if name == "actor":
        import ray

        _init_ray()

        @ray.remote(num_cpus=0.25)
        class NoopActor:
            async def noop(self, body: bytes) -> int:
                json.loads(body or b"{}")
                return 0

        actor = NoopActor.remote()
        ray.get(actor.noop.remote(b"{}"))

        async def endpoint(request: Request) -> Response:
            result = await actor.noop.remote(await request.body())
            return Response(json.dumps(result).encode(), media_type="application/json")
    else:
        async def endpoint(request: Request) -> Response:
            json.loads(await request.body() or b"{}")
            return Response(b"0", media_type="application/json")

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    url = f"http://127.0.0.1:{port}/"

    def announce() -> None:
        _wait_first_response(url, {}, time.monotonic() + 60)
        _write_ready(ready, url=url)

    threading.Thread(target=announce, daemon=True).start()
    server.run()


# -- the run --------------------------------------------------------------------------------------------

def measure(name: str, wrk: str | None, levels: list[int], seconds: float, workdir: Path) -> dict[str, Any]:
    system = System(name, workdir)
    t0 = time.monotonic()
    try:
        target = system.start()
        start_s = time.monotonic() - t0
        drive = (lambda c, s: run_wrk(wrk, target, c, s)) if wrk else (lambda c, s: run_asyncio(target, c, s))
        # warm-up: JIT-free Python still has caches, pools and connections to fill (and autoscalers replicas)
        drive(max(levels), WARMUP["s"]) if WARMUP["s"] > 2 else drive(16, min(2.0, seconds))
        assert system.proc is not None
        stats = []
        for c in levels:
            cpu0 = session_cpu_s(system.proc.pid)
            s = drive(c, seconds)
            cpu = session_cpu_s(system.proc.pid) - cpu0
            stats.append(replace(s, cpu_us=cpu / s.requests * 1e6 if s.requests else None))
    finally:
        system.stop()
    return {"system": name, "title": TITLES[name], "start_s": round(start_s, 2), "deploy_s": target.deploy_s,
            "notes": target.notes, "stats": [{**asdict(s), "rps": s.rps} for s in stats]}


def _at(result: dict[str, Any] | None, c: int) -> dict[str, Any] | None:
    if result is None:
        return None
    return next((s for s in result["stats"] if s["concurrency"] == c), None)


def report(results: dict[str, dict[str, Any]], levels: list[int], generator: str) -> str:
    lines = [f"load generator: {generator}", "",
             "| system | c | req/s | p50 ms | p99 ms | CPU µs/req | errors |", "|---|---|---|---|---|---|---|"]
    for name in SYSTEMS:
        r = results.get(name)
        if r is None:
            continue
        for s in r["stats"]:
            cpu = f"{s['cpu_us']:,.0f}" if s["cpu_us"] is not None else "—"
            lines.append(f"| {r['title']} | {s['concurrency']} | {s['rps']:,.0f} | {s['p50_ms']:.2f} | "
                         f"{s['p99_ms']:.2f} | {cpu} | {s['errors']} |")
    lines += ["", "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    ours = results.get("ours")

    def best_serve(c: int) -> dict[str, Any] | None:
        cands = [s for s in (_at(results.get("serve-proxy"), c), _at(results.get("serve-direct"), c)) if s]
        return max(cands, key=lambda s: s["rps"]) if cands else None

    rows: list[tuple[str, Any]] = [
        ("ours / Ray Serve best (req/s)", lambda c: (_at(ours, c), best_serve(c))),
        (f"ours --workers {CORES} / Ray Serve best (req/s)",
         lambda c: (_at(results.get("ours-workers"), c), best_serve(c))),
        ("ours / bare echo (req/s)", lambda c: (_at(ours, c), _at(results.get("echo"), c))),
        ("ours / Starlette+actor (req/s)", lambda c: (_at(ours, c), _at(results.get("actor"), c))),
        ("ours / ours through the actor (req/s)", lambda c: (_at(ours, c), _at(results.get("ours-relay"), c))),
    ]
    for label, pick in rows:
        cells = []
        for c in levels:
            a, b = pick(c)
            cells.append(f"{a['rps'] / b['rps']:.2f}x" if a and b and b["rps"] else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for c in levels:
        a, b = _at(ours, c), best_serve(c)
        cells.append(f"{a['p99_ms']:.1f} vs {b['p99_ms']:.1f}" if a and b else "—")
    lines.append("| p99 ms, ours vs Ray Serve best | " + " | ".join(cells) + " |")
    cells = []
    for c in levels:
        a, b = _at(ours, c), best_serve(c)
        cells.append(f"{a['cpu_us']:,.0f} vs {b['cpu_us']:,.0f}" if a and b and a["cpu_us"] and b["cpu_us"] else "—")
    lines.append("| CPU µs/req, ours vs Ray Serve best | " + " | ".join(cells) + " |")
    lines += ["", "| deploy to first response (Ray already up) | seconds |", "|---|---|"]
    for name in ("ours", "ours-workers", "ours-relay", "serve-proxy", "serve-direct"):
        r = results.get(name)
        if r is not None and r["deploy_s"] is not None:
            extra = f" ({', '.join(f'{k}={v}' for k, v in r['notes'].items())})" if r["notes"] else ""
            lines.append(f"| {r['title']}{extra} | {r['deploy_s']:.2f} |")
    c = max(levels)
    a, b, e = _at(ours, c), best_serve(c), _at(results.get("echo"), c)
    if a:
        lines.append("")
        lines.append(f"targets at c={c}:")
        if b:
            ok = a["rps"] >= 1.5 * b["rps"] and a["p99_ms"] < b["p99_ms"]
            lines.append(f"  >= 1.5x Ray Serve best with lower p99: {'PASS' if ok else 'FAIL'} "
                         f"({a['rps'] / b['rps']:.2f}x, p99 {a['p99_ms']:.1f} vs {b['p99_ms']:.1f} ms)")
            w = _at(results.get("ours-workers"), c)
            if w:  # each at its best configuration on this machine
                ok = w["rps"] >= 2 * b["rps"] and w["p99_ms"] < b["p99_ms"]
                lines.append(f"  --workers {CORES}: >= 2x Ray Serve best with lower p99: {'PASS' if ok else 'FAIL'} "
                             f"({w['rps'] / b['rps']:.2f}x, p99 {w['p99_ms']:.1f} vs {b['p99_ms']:.1f} ms)")
        if e:
            ok = a["rps"] >= 0.5 * e["rps"]
            lines.append(f"  >= 0.5x bare echo: {'PASS' if ok else 'FAIL'} ({a['rps'] / e['rps']:.2f}x)")
        if ours and ours["deploy_s"] is not None:
            lines.append(f"  deploy-to-first-response < 2 s: {'PASS' if ours['deploy_s'] < 2 else 'FAIL'} "
                         f"({ours['deploy_s']:.2f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        name, port, ready = argv[1], int(argv[2]), argv[3]
        if name.startswith("serve"):
            child_serve(name, port, ready, argv[4] if len(argv) > 4 else "noop")
        else:
            child_starlette(name, port, ready)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    ap.add_argument("--client", choices=("auto", "wrk", "asyncio"), default="auto")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--function", choices=("noop", "plain"), default="noop",
                    help="noop: an async no-op tuned like its peers; plain: a plain def with default settings")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of load before measuring; above 2 s it runs at the highest concurrency")
    ap.add_argument("--gateways", help="instead: N gateway processes on one PostgreSQL, e.g. 1,2 "
                    "(benchmarks/scaleout.py)")
    args = ap.parse_args(argv)
    FUNCTION["name"] = args.function
    WARMUP["s"] = args.warmup
    if args.gateways:
        import scaleout

        wrk_bin = None if args.client == "asyncio" else wrk_path()
        return scaleout.main([int(n) for n in args.gateways.split(",")],
                             [int(c) for c in args.concurrency.split(",")], args.duration, wrk_bin)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    wrk = None if args.client == "asyncio" else wrk_path()
    if args.client == "wrk" and wrk is None:
        ap.error("wrk is not installed (apt-get install wrk); use --client asyncio")
    generator = f"wrk ({wrk}, 1 thread)" if wrk else "asyncio client in the benchmark process"
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    print(f"# gateway benchmark: {len(names)} systems, c={levels}, {args.duration:g}s each, {generator}, "
          f"{os.cpu_count()} CPUs, ray {ray_version}", flush=True)
    t_all = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cocoon-bench-") as tmp:
        for name in names:
            t0 = time.monotonic()
            print(f"## {TITLES[name]} ...", flush=True)
            try:
                results[name] = measure(name, wrk, levels, args.duration, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one system failing must not hide the others
                log = Path(tmp) / f"{name}.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                print(f"   {name} failed: {exc}\n{tail}", flush=True)
                continue
            for s in results[name]["stats"]:
                print(f"   c={s['concurrency']:>3}  {s['rps']:>9,.0f} req/s  p50 {s['p50_ms']:8.2f} ms  "
                      f"p99 {s['p99_ms']:8.2f} ms  cpu/req {s['cpu_us'] or 0:6.0f} µs  errors {s['errors']}",
                      flush=True)
            load = os.getloadavg()
            print(f"   ({time.monotonic() - t0:.0f}s incl. start and stop; load average after it {load[0]:.2f} "
                  f"{load[1]:.2f} {load[2]:.2f})", flush=True)
    print()
    print(report(results, levels, generator))
    print(f"\ntotal {time.monotonic() - t_all:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"generator": generator, "levels": levels, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
