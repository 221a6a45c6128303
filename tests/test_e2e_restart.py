"""A gateway SIGKILLed (with the Ray it started) comes back with every deployment and answers without redeploying."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, GatewayProc

pytestmark = pytest.mark.e2e


def test_restart_after_sigkill_keeps_deployments(tmp_path):
    gw = GatewayProc(tmp_path / "home").start()
    try:
        gw.cli("deploy", str(ROOT / "examples" / "hello.py"))
        key = gw.key
        with gw.http() as c:
            assert c.post("/fn/greet", json={"name": "before"}).status_code == 200
            async_id = c.post("/fn/greet", json={"name": "kept"}, headers={"Prefer": "respond-async"}).json()["id"]
            versions = {f["name"]: f["version"] for f in c.get("/v1/functions").json()["functions"]}
        import time

        time.sleep(0.6)  # one flush interval: async results are durable within it
        gw.kill()
        gw.proc = None
        gw.start()
        assert gw.key == key  # the developer key survives
        with gw.http() as c:
            after = {f["name"]: f["version"] for f in c.get("/v1/functions").json()["functions"]}
            assert after == versions
            assert c.post("/fn/greet", json={"name": "after"}).json() == {"message": "Hello, after."}
            assert c.post("/fn/add", json={"a": 1, "b": 1}).json() == 2
            st = c.get(f"/v1/calls/{async_id}").json()
            assert st["status"] == "succeeded" and st["result"] == {"message": "Hello, kept."}
        ls = json.loads(gw.cli("ls", "--json").stdout)
        assert next(f for f in ls if f["name"] == "greet")["calls"] >= 2
    finally:
        gw.stop()
