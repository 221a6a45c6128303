"""Provider admission end to end: a real gateway, real Ray nodes joined by `cocoon provider join`.

An attested gateway (development evidence, trusted by key on this machine, as sealed calls are) admits a node
that proves it runs the platform's worker and seals the Ray token to it; an unattested or untrusted node is
refused and learns nothing; a node whose Ray node contradicts its claims is excluded, the reason shown by
`cocoon provider ls`; tenant replicas run on providers, not the head. An approved-mode gateway refuses wallets
until `cocoon provider approve`, and `cocoon provider revoke` takes a node out at once.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cocoon_faas.runtime.hardware import GIB, Hardware
from cocoon_faas.runtime.node_attestation import NodeIdentity, dev_key_hex
from cocoon_faas.runtime.registration import Registration
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet
from tests.conftest import GatewayProc
from tests.ray_nodes import FAST_HEALTH, RayCluster, node_ports
from tests.test_e2e_marketplace import Market, Provider

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

APP = '''
import cocoon_faas as cocoon


@cocoon.function(cpu=0.5, memory="64Mi", min_replicas=1, max_replicas=1)
def where() -> str:
    import os

    return os.environ.get("COCOON_NODE") or "local"  # the sandbox has no Ray; the platform names the node
'''
HW = Hardware("declared", None, 0, 0, None, 2, 2 * GIB)


def _registration(key: PrivateKey, hw: Hardware = HW, price: int = 0, kid: str = "") -> Registration:
    return Registration.new(wallet=Wallet(key.public_key()).address.friendly(),
                            public_key=key.public_key().to_bytes(), name="raw", hardware=hw, gpu_price=price,
                            cpu_price=price, attestation_kid=kid)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cluster = RayCluster()
    base = tmp_path_factory.mktemp("adm")
    trusted = ",".join(dev_key_hex(base / f"prov-{name}") for name in ("good", "liar"))
    gw = GatewayProc(base / "home", env={"COCOON_RAY_LOOPBACK_ONLY": "false",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), **FAST_HEALTH,
        "COCOON_PROVIDER_ADMISSION": "attested", "COCOON_PROVIDER_DEV_KEYS": trusted,
        "COCOON_PROVIDER_HEARTBEAT_S": "0.5", "COCOON_RAY_NUM_CPUS": "2", "COCOON_REPLICA_START_TIMEOUT_S": "150"})
    m: Market | None = None
    try:
        m = Market(gw.start(), cluster)
        yield m
    finally:
        if m is not None:
            m.http.close()
        for p in (m.providers.values() if m is not None else ()):
            p.stop()
        gw.stop()
        cluster.teardown()
        assert cluster.pids() == []


def _join_args(p: Provider, *extra: str) -> list[str]:
    return ["provider", "join", "--gateway", p.gateway, "--wallet", p.wallet, "--price", "0", "--cpu-price",
            "0.000001", "--cpus", "2", "--name", p.name, "--temp-dir", p.temp_dir, "--object-store-memory",
            "80000000", *(f"--ray-arg={a}" for a in node_ports()), *extra]


def _wallet(p: Provider) -> None:
    p.home.mkdir(parents=True, exist_ok=True)
    made = p.cli("wallet", "create")
    assert made.returncode == 0, made.stderr
    p.wallet = json.loads(made.stdout)["address"]


def _start(market: Market, p: Provider, extra: tuple[str, ...], done: Any) -> dict[str, Any]:
    """`cocoon provider join` until ``done(row)``; a node that misses Ray's start-up deadline on a loaded
    machine is started again (as tests/test_e2e_marketplace.py does)."""
    row: dict[str, Any] = {}
    for _ in range(2):
        p.proc = subprocess.Popen([sys.executable, "-m", "cocoon_faas", *_join_args(p, *extra)], env=p.env,
                                  stdout=open(p.home / "join.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.proc.poll() is None:
            row = market.rows().get(p.name) or {}
            if done(row):
                return row
            time.sleep(0.25)
        p.stop()
    return row


def test_unattested_and_untrusted_nodes_are_refused_and_learn_nothing(market: Market) -> None:
    key = PrivateKey.generate()
    r = httpx.post(market.gw.url + "/v1/providers", json=_registration(key).signed(key), timeout=30)
    assert r.status_code == 403, r.text
    assert "COCOON_PROVIDER_ADMISSION=attested" in r.json()["error"]["message"]
    assert "token" not in r.json() and "ray_address" not in r.text
    for name, extra, needle in [("bare", ("--attestation", "none"), "carries no attestation"),
                                ("stranger", (), "dev_key_untrusted")]:
        p = market.provider(name, "none", "0", "0")
        _wallet(p)
        out = subprocess.run([sys.executable, "-m", "cocoon_faas", *_join_args(p, *extra)], env=p.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and needle in out.stderr, (out.stdout, out.stderr)
    assert market.rows() == {}  # nothing listed, nothing joined


def test_absurd_claims_are_refused(market: Market) -> None:
    key = PrivateKey.generate()
    for reg, needle in [(_registration(key, hw=dataclasses.replace(HW, cpus=100_000)), "beyond any one machine"),
                        (_registration(key, price=10**30), "COCOON_MAX_PRICE_NANOTON")]:
        r = httpx.post(market.gw.url + "/v1/providers", json=reg.signed(key), timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_attested_node_joins_with_the_token_sealed_and_runs_tenant_replicas(market: Market, tmp_path: Path) -> None:
    p = market.provider("good", "none", "0", "0.000001")
    _wallet(p)
    # what the gateway answers an attested registration: secrets sealed to the attested key only
    key = PrivateKey.from_mnemonic(json.loads((p.home / "wallet.json").read_text())["words"])
    ident = NodeIdentity.create(key.public_key().to_bytes(), home=p.home)
    reg = dataclasses.replace(_registration(key, kid=ident.key_id), name="probe")
    r = httpx.post(market.gw.url + "/v1/providers", json=reg.signed(key, ident.document), timeout=30)
    assert r.status_code == 201, r.text
    assert market.gw.env["RAY_AUTH_TOKEN"] not in r.text and "token" not in r.json()
    assert ident.open_secrets(r.json()["sealed"], r.json()["node_id"])["ray_token"] == market.gw.env["RAY_AUTH_TOKEN"]
    httpx.post(f"{market.gw.url}/v1/providers/{r.json()['node_id']}/leave", timeout=30,
               headers={"authorization": f"Bearer {ident.open_secrets(r.json()['sealed'], r.json()['node_id'])['token']}"})
    # the real agent: `cocoon provider join` (dev attestation by default here) joins Ray with the sealed token
    row = _start(market, p, (), lambda r: bool(r.get("ray_node_id") and r.get("healthy")))
    assert row.get("ray_node_id") and row.get("excluded") is None, p.log()
    p.node_id = row["node_id"]
    assert market.gw.env["RAY_AUTH_TOKEN"] not in p.log()
    app = tmp_path / "where_app.py"
    app.write_text(APP)
    market.gw.cli("deploy", str(app))
    r = market.call("where")
    assert r.status_code == 200 and r.json() == p.node_id  # on the provider, never on the head


def test_a_lying_node_is_excluded_with_the_reason_shown(market: Market) -> None:
    p = market.provider("liar", "none", "0", "0.000001")
    _wallet(p)
    # claims 2 CPUs (the registration) but gives its Ray node 1: Ray's report contradicts the claim
    row = _start(market, p, ("--ray-arg=--num-cpus=1",), lambda r: bool(r.get("excluded")))
    assert row.get("excluded") and "claimed 2 CPU" in row["excluded"], (row, p.log())
    assert not row["healthy"] and row["replicas"] == 0
    ls = subprocess.run([sys.executable, "-m", "cocoon_faas", "provider", "ls", "--gateway", market.gw.url],
                        env=p.env, capture_output=True, text=True, timeout=60)
    assert "excluded: claimed 2 CPU" in ls.stdout, ls.stdout + ls.stderr
    assert market.call("where").json() == market.providers["good"].node_id


def test_approved_mode_approve_and_revoke(tmp_path: Path) -> None:
    gw = GatewayProc(tmp_path / "home", env={"COCOON_RAY_LOOPBACK_ONLY": "false", "COCOON_PROVIDER_ADMISSION": "approved", "COCOON_RAY_NUM_CPUS": "1"})
    try:
        gw.start()
        key = PrivateKey.generate()
        wallet = Wallet(key.public_key()).address.friendly()
        r = httpx.post(gw.url + "/v1/providers", json=_registration(key).signed(key), timeout=30)
        assert r.status_code == 403 and f"cocoon provider approve {wallet}" in r.json()["error"]["message"]
        assert "ray_address" not in r.text
        approved = json.loads(gw.cli("provider", "approve", wallet, "--gateway", gw.url).stdout)
        assert approved["status"] == "approved"
        joined = httpx.post(gw.url + "/v1/providers", json=_registration(key).signed(key), timeout=30)
        assert joined.status_code == 201 and joined.json()["admission"] == "approved", joined.text
        revoked = json.loads(gw.cli("provider", "revoke", wallet, "--gateway", gw.url).stdout)
        assert revoked["status"] == "revoked" and revoked["nodes_down"] == [joined.json()["node_id"]]
        again = httpx.post(gw.url + "/v1/providers", json=_registration(key).signed(key), timeout=30)
        assert again.status_code == 403 and "revoked" in again.json()["error"]["message"]
        stranger = subprocess.run([sys.executable, "-m", "cocoon_faas", "provider", "approve", wallet,
                                   "--gateway", gw.url], capture_output=True, text=True, timeout=60,
                                  env={**gw.env, "COCOON_HOME": str(tmp_path / "nobody")})
        assert stranger.returncode != 0  # no operator key: nothing changes
    finally:
        gw.stop()
