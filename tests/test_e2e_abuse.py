"""Bad input, tried as an attacker would against a real gateway: a 4xx that names the problem, no state changed,
and the gateway keeps serving everyone else afterwards."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayProc

pytestmark = pytest.mark.e2e

LIMIT = 262_144  # COCOON_MAX_BODY_BYTES of the shared test gateway (tests/conftest.py)

POST_ROUTES = ["/fn/greet", "/v1/providers", "/v1/channels", "/v1/channels/1/close", "/v1/keys",
               "/v1/functions/greet/rollback", "/v1/chat/completions", "/v1/embeddings",
               "/v1/providers/abc/heartbeat", "/v1/ledger/providers/abc/payout"]


def _still_healthy(gw: GatewayProc) -> None:
    """Deploys, keys, logs and calls all still work (the store is not stuck in a failed transaction)."""
    with gw.http() as c:
        assert c.post("/fn/greet", json={"name": "Ada"}).json() == {"message": "Hello, Ada."}
        assert c.post("/v1/keys", json={"name": "default"}).status_code == 201
        assert c.get("/v1/functions/greet/logs").status_code == 200
        assert c.get("/v1/functions").status_code == 200


def test_lone_surrogate_is_refused_and_the_store_keeps_working(gateway: GatewayProc, tmp_path: Path) -> None:
    with gateway.http() as c:
        r = c.post("/fn/greet", content=b'{"name": "\\ud800"}', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        r = c.post("/v1/keys", content=b'{"name": "x\\udfff"}')
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
        # a pair of surrogates is one valid character and passes
        ok = c.post("/fn/greet", content=b'{"name": "\\ud83d\\ude00"}')
        assert ok.status_code == 200 and ok.json() == {"message": "Hello, \U0001F600."}
    # text a function itself prints that UTF-8 cannot hold is kept escaped, never breaking the log batch
    app = tmp_path / "surrogate_app.py"
    app.write_text("import cocoon_faas as cocoon\n\n@cocoon.function(cpu=0.25)\ndef lone() -> int:\n"
                   "    print('bad ' + chr(0xD800) + ' text')\n    return 1\n")
    gateway.cli("deploy", str(app))
    with gateway.http() as c:
        assert c.post("/fn/lone", json={}).json() == 1
        logs = c.get("/v1/functions/lone/logs").json()["logs"]
        assert any("bad \\ud800 text" in x["text"] for x in logs), logs
    gateway.cli("rm", "lone")
    _still_healthy(gateway)


def _chunks(total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * 65536
        sent += 65536


@pytest.mark.parametrize("path", POST_ROUTES)
def test_every_route_has_one_body_limit(gateway: GatewayProc, path: str) -> None:
    with gateway.http() as c:
        declared = c.post(path, content=b" " * (LIMIT + 1))
        assert declared.status_code == 413, (path, declared.status_code, declared.text)
        assert declared.json()["error"]["type"] == "payload_too_large"
        streamed = c.post(path, content=_chunks(LIMIT + 65536))  # chunked: no Content-Length to check up front
        if path in ("/v1/providers/abc/heartbeat", "/v1/ledger/providers/abc/payout"):
            # these refuse an unknown node / a non-operator before reading the body at all
            assert streamed.status_code in (401, 403, 404, 413), (path, streamed.status_code, streamed.text)
        else:
            assert streamed.status_code == 413, (path, streamed.status_code, streamed.text)
            assert "COCOON_MAX_BODY_BYTES" in streamed.json()["error"]["message"]


# The provider dashboard's own POST routes (their bodies are capped far below COCOON_MAX_BODY_BYTES)
DASHBOARD_POST_ROUTES = [f"/dashboard/api/provider/{p}" for p in ("challenge", "login", "session", "logout")]


@pytest.mark.parametrize("path", DASHBOARD_POST_ROUTES)
def test_dashboard_routes_refuse_big_and_bad_bodies(gateway: GatewayProc, path: str) -> None:
    with gateway.http() as c:
        for what, body in (("declared", b" " * (LIMIT + 1)), ("chunked", _chunks(LIMIT + 65536)),
                           ("not utf-8", b"\xff\xfe not utf-8"), ("nested", b"[" * 100_000 + b"]" * 100_000)):
            r = c.post(path, content=body, headers={"Origin": gateway.url, "Content-Type": "application/json"})
            if path.endswith("/challenge") and what != "declared":
                # it takes no body and never reads one (so nothing grows); it must still only hand out a challenge
                assert r.status_code in (200, 429) and "Traceback" not in r.text, (what, r.status_code)
                continue
            assert 400 <= r.status_code < 500, (path, what, r.status_code, r.text[:200])
            assert "Traceback" not in r.text and json.loads(r.text)["error"]["message"], (path, what)


def test_deployments_have_the_larger_bundle_limit(gateway: GatewayProc) -> None:
    with gateway.http() as c:
        r = c.post("/v1/deployments", content=_chunks(10 * LIMIT + 65536))
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
        small = c.post("/v1/deployments", content=b'{"functions": []}')
        assert small.status_code == 400  # under the limit: the route's own check answers


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/fn/greet", b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ("/fn/echo", b'{"data": "x", "n": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}", "nested"),
    ("/v1/chat/completions", b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ("/v1/keys", b'{"name": ' + b"[" * 1500 + b"]" * 1500 + b"}", "nested"),
    ("/v1/keys", b'{"name": ' + b"9" * 3000 + b"}", "digits"),
    ("/v1/keys", b'{"name": 1e999}', "finite"),
    ("/v1/keys", b'{"name": NaN}', "NaN"),
    ("/v1/providers", b'{"registration": ' + b"{\"a\":" * 2000 + b"1" + b"}" * 2000 + b"}", "nested"),
    ("/v1/channels", b'{"channel_id": ' + b"1" * 5000 + b"}", "digits"),
])
def test_deep_nesting_and_huge_numbers_are_400(gateway: GatewayProc, path: str, body: bytes, needle: str) -> None:
    with gateway.http() as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (path, r.status_code, r.text[:300])
    assert needle in r.json()["error"]["message"]
    _still_healthy(gateway)


def test_bad_content_length_and_oversized_headers(gateway: GatewayProc) -> None:
    with gateway.http() as c:
        assert b" 400 " in _raw(gw=gateway, request=b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n"
                                b"Authorization: Bearer " + gateway.key.encode() + b"\r\n\r\n{}").split(b"\r\n")[0]
        big = c.get("/v1/functions", headers={f"X-Junk-{i}": "y" * 1000 for i in range(80)})
        assert big.status_code == 431 and "COCOON_MAX_HEADER_BYTES" in big.json()["error"]["message"]
        fn = c.post("/fn/greet", json={"name": "x"}, headers={f"X-Junk-{i}": "y" * 1000 for i in range(80)})
        assert fn.status_code == 431
    _still_healthy(gateway)


def _raw(gw: GatewayProc, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_json_error_shape_for_every_refusal(gateway: GatewayProc) -> None:
    """No route answers a refusal with an HTML page or a traceback."""
    with gateway.http() as c:
        for path in POST_ROUTES:
            r = c.post(path, content=b"\xff\xfe not utf-8")
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
            assert "Traceback" not in r.text and json.loads(r.text)["error"]["message"]


def _as(gw: GatewayProc, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**gw.env, "COCOON_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "cocoon_faas", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def _second_developer(gw: GatewayProc, name: str) -> str:
    with gw.http() as c:
        r = c.post("/v1/keys", json={"name": name})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def test_rm_takes_the_functions_logs_and_records_with_it(gateway: GatewayProc, tmp_path: Path) -> None:
    app = tmp_path / "secretive.py"
    app.write_text("import cocoon_faas as cocoon\n\n@cocoon.function(cpu=0.25)\ndef secretive(x: str) -> int:\n"
                   "    print('first owner says ' + x)\n    return 1\n")
    gateway.cli("deploy", str(app))
    with gateway.http() as c:
        r = c.post("/fn/secretive", json={"x": "hunter2"}, headers={"Prefer": "respond-async"})
        cid = r.json()["id"]
        for _ in range(100):
            if c.get(f"/v1/calls/{cid}").json()["status"] == "succeeded":
                break
            time.sleep(0.1)
        assert any("hunter2" in x["text"] for x in c.get("/v1/functions/secretive/logs").json()["logs"])
    gateway.cli("rm", "secretive")
    bob = _second_developer(gateway, "bob-rm")
    deployed = _as(gateway, bob, "deploy", str(app))
    assert deployed.returncode == 0, deployed.stderr
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {bob}"}, timeout=60) as c:
        logs = c.get("/v1/functions/secretive/logs").json()["logs"]
        assert not any("hunter2" in x["text"] for x in logs), logs
        assert c.get(f"/v1/calls/{cid}").status_code == 404
    assert _as(gateway, bob, "rm", "secretive").returncode == 0


def test_a_model_id_belongs_to_the_first_developer(gateway: GatewayProc, tmp_path: Path) -> None:
    app = tmp_path / "model_app.py"
    app.write_text("import cocoon_faas as cocoon\n\n"
                   "@cocoon.function(cpu=0.25, max_replicas=1, serves='embeddings:owned-emb')\n"
                   "def first_emb(text: str) -> dict:\n    return {'embedding': [1.0]}\n")
    gateway.cli("deploy", str(app))
    thief = _second_developer(gateway, "mallory-models")
    stolen = tmp_path / "thief_app.py"
    stolen.write_text(app.read_text().replace("first_emb", "thief_emb"))
    out = _as(gateway, thief, "deploy", str(stolen))
    assert out.returncode != 0 and "first_emb" in out.stderr and "another developer" in out.stderr, out.stderr
    models = httpx.get(gateway.url + "/v1/models", timeout=30).json()["data"]
    mine = [m for m in models if m["id"] == "owned-emb"]
    assert len(mine) == 1 and mine[0]["cocoon"]["function"] == "first_emb"
    gateway.cli("rm", "first_emb")
