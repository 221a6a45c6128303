"""End-to-end: a real gateway on 127.0.0.1, a real local Ray, examples deployed through the CLI."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socketserver
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, sse_events

pytestmark = pytest.mark.e2e


def test_sync_call_returns_json_and_call_id(gateway):
    with gateway.http() as c:
        r = c.post("/fn/greet", json={"name": "Ada", "excited": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "Hello, Ada!"}
    assert len(r.headers["X-Cocoon-Call-Id"]) == 32


def test_async_function_and_class_form(gateway):
    with gateway.http() as c:
        assert c.post("/fn/add", json={"a": 2, "b": 3.5}).json() == 5.5
        first = c.post("/fn/Counter.hello", json={"who": "Ada"}).json()
        second = c.post("/fn/Counter.hello", json={}).json()
    assert first["text"] == "hi Ada" and second["text"] == "hi world"
    assert first["loaded_at"] == second["loaded_at"]  # setup ran once for the replica


def test_cli_call_and_ls_and_logs(gateway):
    out = gateway.cli("call", "greet", '{"name": "Grace"}').stdout
    assert json.loads(out) == {"message": "Hello, Grace."}
    ls = json.loads(gateway.cli("ls", "--json").stdout)
    greet = next(f for f in ls if f["name"] == "greet")
    assert greet["calls"] >= 1 and greet["version"] >= 1 and greet["p50_ms"] is not None
    time.sleep(0.5)  # logs are flushed in small batches
    logs = gateway.cli("logs", "greet").stdout
    assert "greeting Grace" in logs
    bad = gateway.cli("call", "greet", "{not json", check=False)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr


def test_stream_items_arrive_in_order_before_the_generator_finishes(gateway):
    t0 = time.monotonic()
    arrivals = []
    items = []
    with httpx.Client(base_url=gateway.url, headers=gateway.headers(), timeout=30) as c:
        with c.stream("POST", "/fn/slow_stream", json={"n": 3, "gap": 0.6}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            buf = ""
            for chunk in r.iter_text():
                buf += chunk
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    arrivals.append(time.monotonic() - t0)
                    items.extend(sse_events(block))
    data = [d for e, d in items if e == "message"]
    assert [d["i"] for d in data] == [0, 1, 2]
    assert items[-1][0] == "end" and items[-1][1]["items"] == 3
    assert arrivals[0] < arrivals[-1] - 1.0  # the first item came >1 s before the end (2 gaps of 0.6 s)


def test_cli_stream(gateway):
    out = gateway.cli("call", "countdown", '{"start": 2, "delay": 0}', "--stream").stdout.splitlines()
    assert [json.loads(x)["n"] for x in out] == [2, 1, 0]


def test_a_generator_called_for_json_is_told_to_stream_before_it_runs(gateway):
    """`cocoon call` without --stream on a generator (the SDK's call() accepts JSON only): a 400 naming the fix,
    nothing run or recorded; a client that accepts anything still gets the stream."""
    def calls() -> int:
        return next(f["calls"] for f in gateway.http().get("/v1/functions").json()["functions"]
                    if f["name"] == "countdown")

    before = calls()
    r = gateway.cli("call", "countdown", '{"start": 2, "delay": 0}', check=False)
    assert r.returncode != 0 and "--stream" in r.stderr + r.stdout, r.stderr
    with gateway.http() as c:
        r = c.post("/fn/countdown", json={"start": 1, "delay": 0}, headers={"Accept": "application/json"})
        assert r.status_code == 400 and "generator" in r.json()["error"]["message"]
        assert calls() == before
        r = c.post("/fn/countdown", json={"start": 1, "delay": 0})  # httpx sends Accept: */*
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")


def test_async_call_poll_and_result(gateway):
    with gateway.http() as c:
        r = c.post("/fn/greet", json={"name": "Async"}, headers={"Prefer": "respond-async"})
        assert r.status_code == 202
        body = r.json()
        assert body["status_url"].endswith(f"/v1/calls/{body['id']}")
        for _ in range(100):
            st = c.get(f"/v1/calls/{body['id']}").json()
            if st["status"] == "succeeded":
                break
            time.sleep(0.05)
    assert st["result"] == {"message": "Hello, Async."}


def test_cancel_interrupts_a_running_call(gateway, tmp_path):
    marker = f"busy-finished-{uuid.uuid4().hex}"
    with gateway.http() as c:
        r = c.post("/fn/busy", json={"seconds": 3, "marker": marker}, headers={"Prefer": "respond-async"})
        cid = r.json()["id"]
        for _ in range(200):
            if c.get(f"/v1/calls/{cid}").json()["status"] == "running":
                break
            time.sleep(0.02)
        d = c.delete(f"/v1/calls/{cid}")
        assert d.status_code == 200 and d.json()["status"] == "cancelled"
        # busy has one replica with one slot: a new call runs at once only if the old one was interrupted
        t0 = time.monotonic()
        assert c.post("/fn/busy", json={"seconds": 0}).status_code == 200
        assert time.monotonic() - t0 < 2.0
        assert c.get(f"/v1/calls/{cid}").json()["status"] == "cancelled"
        assert c.delete(f"/v1/calls/{cid}").status_code == 409
    time.sleep(3.2)
    with gateway.http() as c:  # the interrupted loop never reached its end (a finished one would have written it)
        assert c.post("/fn/busy", json={"seconds": 0, "check": marker}).json()["found"] is False
        done = f"busy-done-{uuid.uuid4().hex}"
        assert c.post("/fn/busy", json={"seconds": 0, "marker": done}).status_code == 200
        assert c.post("/fn/busy", json={"seconds": 0, "check": done}).json()["found"] is True


@pytest.mark.parametrize(
    ("path", "body", "status", "etype", "needle"),
    [
        ("/fn/greet", b"{not json", 400, "invalid_request", "not valid JSON"),
        ("/fn/greet", b'{"nme": "x"}', 400, "invalid_request", "did you mean 'name'"),
        ("/fn/greet", b"{}", 400, "invalid_request", "missing required argument 'name'"),
        ("/fn/greet", b'{"name": 5}', 400, "invalid_request", "argument 'name' of 'greet' must be a string"),
        ("/fn/greet", b"[1, 2]", 400, "invalid_request", "JSON object"),
        ("/fn/nope", b"{}", 404, "not_found", "no function named 'nope'"),
        ("/fn/divide", b'{"a": 1, "b": 0}', 500, "function_error", "ZeroDivisionError"),
        ("/fn/too_slow", b'{"seconds": 5}', 504, "timeout", "time limit"),
        ("/fn/needs_h100", b"{}", 503, "no_capacity", "gpu:H100"),
    ],
)
def test_error_statuses(gateway, path, body, status, etype, needle):
    with gateway.http() as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == etype and needle in err["message"]
    assert "Traceback" not in r.text


def test_body_over_limit_is_413(gateway):
    with gateway.http() as c:
        r = c.post("/fn/echo", json={"data": "x" * 300_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_auth_required_and_wrong_key(gateway):
    r = httpx.post(gateway.url + "/fn/greet", json={"name": "x"})
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/fn/greet", json={"name": "x"}, headers={"Authorization": "Bearer ck_nope"})
    assert r.status_code == 401


def test_queue_full_is_429_with_retry_after(gateway):
    def hit(_):
        return httpx.post(gateway.url + "/fn/busy", json={"seconds": 1.0}, headers=gateway.headers(), timeout=60)

    with cf.ThreadPoolExecutor(10) as ex:
        rs = list(ex.map(hit, range(10)))
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and 200 in codes, codes
    r429 = next(r for r in rs if r.status_code == 429)
    assert int(r429.headers["Retry-After"]) >= 1 and r429.json()["error"]["type"] == "overloaded"


def _first_asker() -> tuple[int, socketserver.TCPServer]:
    """A loopback server that answers every line with the first line it ever got (which replica asked first)."""
    first: list[str] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            ident = self.rfile.readline().decode().strip()
            if not first:
                first.append(ident)
            self.wfile.write(first[0].encode() + b"\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server


def test_replica_death_is_retried_elsewhere(gateway):
    port, server = _first_asker()
    with gateway.http() as c, server:
        r = c.post("/fn/crash_once", json={"port": port})
        server.shutdown()
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["first_id"] != body["id"]  # the first replica died; another one answered
        for _ in range(600):  # the dead replica is replaced (min_replicas=2); a Ray worker start can be slow
            if c.get("/v1/functions/crash_once").json()["replicas"] == 2:
                break
            time.sleep(0.1)
        assert c.get("/v1/functions/crash_once").json()["replicas"] == 2


def _hang_then_replaced(gateway, name: str) -> None:
    """A call of `name` with `hang` ignores its time limit: the caller gets 504 at the limit, and the interrupt
    grace later the sandbox process is ended and the replica replaced; a later call is answered by a new process."""
    with gateway.http() as c:
        ready = time.monotonic() + 120
        while True:  # the function's first replica starts (four of them at once here: slow on a loaded machine)
            first = c.post(f"/fn/{name}", json={})
            if first.status_code == 200 or time.monotonic() > ready:
                break
            assert first.status_code == 504 and "became free" in first.text, first.text
        assert first.status_code == 200, first.text
        boot = first.json()["boot"]
        stuck = c.post(f"/fn/{name}", json={"hang": True})
        assert stuck.status_code == 504 and stuck.json()["error"]["type"] == "timeout", stuck.text
        deadline = time.monotonic() + 120
        seen = boot
        while time.monotonic() < deadline:
            r = c.post(f"/fn/{name}", json={})
            if r.status_code == 200:
                seen = r.json()["boot"]
                if seen != boot:
                    break
            time.sleep(0.5)
        assert seen != boot, name  # a new process answers: the one with the stuck call is gone


def test_a_call_that_swallows_its_timeout_or_blocks_its_loop_gets_its_process_replaced(gateway):
    """`stubborn` (sync) catches the interrupt forever; `stubborn_swallow` (async) catches its CancelledError and
    goes on; `stubborn_block` (async) blocks the child's event loop with time.sleep. Without the watchdog the first
    two processes would keep answering probes (a second pool thread / the free loop) with the stuck call still
    running, and the third would never answer again. `stubborn_gil` holds the GIL in one C call, so no thread of
    its process runs: the actor ends it from outside (runtime/beacon.py). They run side by side (each waits out the
    grace)."""
    names = ["stubborn", "stubborn_swallow", "stubborn_block", "stubborn_gil"]
    with cf.ThreadPoolExecutor(len(names)) as ex:
        list(ex.map(lambda n: _hang_then_replaced(gateway, n), names))


def test_control_plane_ownership(gateway):
    other = gateway.cli("keys", "create", "--name", "mallory").stdout.strip()
    assert other.startswith("ck_") and "\n" not in other
    h = {"Authorization": f"Bearer {other}"}
    with httpx.Client(base_url=gateway.url, headers=h) as c:
        assert c.delete("/v1/functions/greet").status_code == 403
        assert c.post("/v1/functions/greet/rollback", json={}).status_code == 403
        assert c.get("/v1/functions").json()["functions"] == []
        assert c.post("/fn/greet", json={"name": "M"}).status_code == 200  # calling is allowed


def test_health_metrics_openapi(gateway):
    with gateway.http() as c:
        assert c.get("/healthz").json()["status"] == "ok"
        c.post("/fn/greet", json={"name": "m"})
        m = c.get("/metrics").text
        assert 'cocoon_calls_total{function="greet",status="succeeded"}' in m
        doc = c.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        schema = doc["paths"]["/fn/greet"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["name"] and schema["properties"]["name"] == {"type": "string"}
        assert c.get("/nope").status_code == 404 and c.get("/nope").json()["error"]["type"] == "not_found"


def test_redeploy_under_load_drops_nothing_then_rollback(gateway):
    with gateway.http() as c:
        v0 = c.get("/v1/functions/echo").json()["version"]
    stop = time.monotonic() + 600
    results: list[int] = []

    def load() -> None:
        with httpx.Client(base_url=gateway.url, headers=gateway.headers(), timeout=60) as c:
            while time.monotonic() < stop:
                results.append(c.post("/fn/echo", json={"data": "x", "n": 1}).status_code)

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(load) for _ in range(4)]
        time.sleep(0.5)
        before = len(results)
        gateway.cli("deploy", str(ROOT / "tests" / "apps" / "edge.py"))
        during = len(results) - before
        t_end = time.monotonic() + 30
        while len(results) < before + during + 20 and time.monotonic() < t_end:  # keep calling after the switch
            time.sleep(0.05)
        stop = time.monotonic()
        for f in futs:
            f.result()
    assert during > 0 and set(results) == {200}, (during, sorted(set(results)))
    with gateway.http() as c:
        v1 = c.get("/v1/functions/echo").json()["version"]
        assert v1 == v0 + 1
        out = gateway.cli("rollback", "echo").stdout
        assert f"v{v0}" in out
        assert c.get("/v1/functions/echo").json()["version"] == v0
        assert c.post("/fn/echo", json={"n": 2}).json() == {"len": 0, "n": 2}


def test_rm_removes_function(gateway, tmp_path):
    app = tmp_path / "tmpapp.py"
    app.write_text("import os\nimport cocoon_faas as cocoon\n\n@cocoon.function(cpu=0.25)\ndef doomed() -> int:\n"
                   "    return os.nice(0)\n")
    gateway.cli("deploy", str(app))
    with gateway.http() as c:
        # tenant code runs at normal priority (Ray starts its workers at nice 15, and the sandbox child inherited
        # it: on a busy node every call and deploy waited for CPU)
        assert c.post("/fn/doomed", json={}).json() == 0
        gateway.cli("rm", "doomed")
        assert c.post("/fn/doomed", json={}).status_code == 404


def test_deploy_errors_are_clear(gateway, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(
        "import cocoon_faas as cocoon\n\n@cocoon.cls(cpu=0.25)\nclass Bad:\n    @cocoon.enter()\n"
        "    def setup(self):\n        raise RuntimeError('model file missing')\n\n"
        "    @cocoon.method()\n    def run(self) -> int:\n        return 1\n"
    )
    r = gateway.cli("deploy", str(broken), check=False)
    assert r.returncode == 1 and "model file missing" in r.stderr
    with gateway.http() as c:
        assert c.get("/v1/functions/Bad.run").status_code == 404  # nothing half-deployed
    r = gateway.cli("deploy", str(tmp_path / "missing.py"), check=False)
    assert r.returncode != 0
    assert Path(gateway.home / "api_key").stat().st_mode & 0o777 == 0o600


def test_autoscaling_up_under_load_and_back_down(gateway):
    def hit(_):
        return httpx.post(gateway.url + "/fn/scalable", json={"seconds": 1.5}, headers=gateway.headers(),
                          timeout=60)

    with cf.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(hit, range(8)))
    assert {r.status_code for r in rs} == {200}
    assert len({r.json() for r in rs}) >= 2  # served by more than one replica process
    with gateway.http() as c:
        peak = c.get("/v1/functions/scalable").json()["replicas"]
        assert 2 <= peak <= 3  # never above max_replicas
        for _ in range(100):  # scale-down delay is 3 s in tests; one replica stays warm for the idle window
            if c.get("/v1/functions/scalable").json()["replicas"] == 1:
                break
            time.sleep(0.2)
        assert c.get("/v1/functions/scalable").json()["replicas"] == 1


def test_sdk_remote_spawn_stream_and_errors(gateway, monkeypatch):
    import importlib.util

    import cocoon_faas as cocoon
    from cocoon_faas.settings import reload_settings

    monkeypatch.setenv("COCOON_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("COCOON_HOME", str(gateway.home))
    reload_settings()
    try:
        spec = importlib.util.spec_from_file_location("hello_sdk", ROOT / "examples" / "hello.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.greet.remote(name="SDK") == {"message": "Hello, SDK."}
        assert mod.greet(name="local") == {"message": "Hello, local."}
        assert [x["n"] for x in mod.countdown.stream(start=2, delay=0)] == [2, 1, 0]
        call = mod.add.spawn(a=1, b=2)
        assert call.get(timeout=30) == 3
        with pytest.raises(cocoon.FunctionError, match="ZeroDivisionError"):
            mod.divide.remote(a=1, b=0)
        with pytest.raises(cocoon.InvalidRequestError, match="did you mean 'name'"):
            cocoon.Client().call("greet", {"nam": "x"})
        with pytest.raises(cocoon.NotFoundError):
            cocoon.Client().call("missing_fn", {})
    finally:
        monkeypatch.undo()
        reload_settings()


def test_plain_calls_reach_the_sandbox_over_the_gateways_own_connection(gateway, tmp_path):
    """The direct path end to end: the replica actor handed the gateway's connection to the sandboxed process (a
    sandbox without network=True has no TCP socket of its own), and its peer is the gateway's end on loopback."""
    app = tmp_path / "holder.py"
    app.write_text("import os, socket\nimport cocoon_faas as cocoon\n\n@cocoon.function(cpu=0.25)\ndef held() -> list:\n"
                   "    peers = []\n"
                   "    for name in os.listdir('/proc/self/fd'):\n"
                   "        try:\n"
                   "            s = socket.socket(fileno=os.dup(int(name)))\n"
                   "        except OSError:\n"
                   "            continue\n"
                   "        with s:\n"
                   "            if s.family == socket.AF_INET:\n"
                   "                peers.append(s.getpeername()[0])\n"
                   "    return peers\n")
    gateway.cli("deploy", str(app))
    with gateway.http() as c:
        peers = c.post("/fn/held", json={}).json()
        gateway.cli("rm", "held")
    assert peers and set(peers) == {"127.0.0.1"}
