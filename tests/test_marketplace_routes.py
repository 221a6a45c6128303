"""The provider HTTP edge: signed registration (wallet ownership, freshness, replay), tokens, listing."""

from __future__ import annotations

import time

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.marketplace import Marketplace, Requirements
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.runtime.hardware import GIB, Hardware
from cocoon_faas.runtime.registration import Registration
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet

H100 = Hardware("declared", "H100", 2, 80 * GIB, None, 16, 64 * GIB)


@pytest.fixture
def market() -> Marketplace:
    return Marketplace(heartbeat_interval=1.0)


@pytest.fixture
def client(market: Marketplace) -> TestClient:
    return TestClient(Starlette(routes=provider_routes(market, ray_address="127.0.0.1:6379")))


@pytest.fixture
def key() -> PrivateKey:
    return PrivateKey.generate()


def signed(key: PrivateKey, *, wallet: str | None = None, now: float | None = None, name: str = "box",
           price: int = 500_000) -> dict:
    wallet = wallet or Wallet(key.public_key()).address.friendly()
    reg = Registration.new(wallet=wallet, public_key=key.public_key().to_bytes(), name=name, hardware=H100,
                           gpu_price=price, now=now)
    return reg.signed(key)


def test_register_heartbeat_list_leave(client: TestClient, market: Marketplace, key: PrivateKey) -> None:
    r = client.post("/v1/providers", json=signed(key))
    assert r.status_code == 201, r.text
    ans = r.json()
    nid, token = ans["node_id"], ans["token"]
    assert ans["ray_address"] == "127.0.0.1:6379" and ans["heartbeat_interval_s"] == 1.0
    assert ans["resources"] == {f"cocoon-node:{nid}": 1000.0, "gpu:H100": 2.0, "gpu:H100-80GB": 2.0}
    assert market.place(Requirements.parse("H100:2")).node_id == nid

    auth = {"authorization": f"Bearer {token}"}
    r = client.post(f"/v1/providers/{nid}/heartbeat", json={"load": 0.25}, headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "up"
    rows = client.get("/v1/providers").json()["providers"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["node_id"], row["gpu"], row["gpu_price"], row["load"], row["healthy"]) == \
        (nid, "H100-80GB x2", 500_000, 0.25, True)
    assert row["wallet"] == Wallet(key.public_key()).address.friendly()
    assert client.get(f"/v1/providers/{nid}").json()["status"] == "up"

    r = client.post(f"/v1/providers/{nid}/leave", headers=auth)
    assert r.json()["status"] == "left"  # no replicas, no calls: leaves at once
    assert client.get("/v1/providers").json()["providers"] == []


def test_a_heartbeat_load_that_no_listing_can_encode_is_refused(client: TestClient, key: PrivateKey) -> None:
    """A node's load as the string "inf" (or "1e999") became an infinite load: every GET /v1/providers (the
    listing, `cocoon provider ls`, the dashboard) answered 500 until that node heartbeated again."""
    ans = client.post("/v1/providers", json=signed(key)).json()
    nid, auth = ans["node_id"], {"authorization": f"Bearer {ans['token']}"}
    assert client.post(f"/v1/providers/{nid}/heartbeat", json={"load": 0.5}, headers=auth).status_code == 200
    for bad in ("inf", "1e999", "nan", "-inf", "0.7", -1, 1e300, True, None, [], {}):
        r = client.post(f"/v1/providers/{nid}/heartbeat", json={"load": bad}, headers=auth)
        assert r.status_code == 400 and "load must be a number from 0" in r.json()["error"]["message"], (bad, r.text)
        listing = client.get("/v1/providers")
        assert listing.status_code == 200 and listing.json()["providers"][0]["load"] == 0.5
        assert client.get(f"/v1/providers/{nid}").json()["load"] == 0.5
    assert client.post(f"/v1/providers/{nid}/heartbeat", json={"load": 3}, headers=auth).status_code == 200
    assert client.get(f"/v1/providers/{nid}").json()["load"] == 3


def test_a_long_node_name_is_refused_by_name_not_as_a_forgery(client: TestClient, key: PrivateKey) -> None:
    """A name over 128 characters was cut before the signature was checked, so an honest `cocoon provider join
    --name <long>` read as "registration signature does not verify"."""
    r = client.post("/v1/providers", json=signed(key, name="n" * 129))
    assert r.status_code == 400 and "shorter --name" in r.json()["error"]["message"], r.text
    assert client.get("/v1/providers").json()["providers"] == []
    assert client.post("/v1/providers", json=signed(key, name="n" * 128)).status_code == 201


def test_a_node_name_with_control_characters_is_refused(client: TestClient, key: PrivateKey) -> None:
    """Node names are shown on the operator's terminal (`cocoon provider ls`) and the dashboard."""
    for name in ("a\x1b[2Jb", "line1\nline2", "tab\there", "bell\x07"):
        r = client.post("/v1/providers", json=signed(key, name=name))
        assert r.status_code == 400 and "printable" in r.json()["error"]["message"], (name, r.text)
    assert client.get("/v1/providers").json()["providers"] == []
    assert client.post("/v1/providers", json=signed(key, name="rig 7 (Zürich)")).status_code == 201


def test_tokens_guard_heartbeat_and_leave(client: TestClient, key: PrivateKey) -> None:
    nid = client.post("/v1/providers", json=signed(key)).json()["node_id"]
    r = client.post(f"/v1/providers/{nid}/leave", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.post(f"/v1/providers/{nid}/heartbeat").status_code == 401
    r = client.post("/v1/providers/nope/heartbeat", headers={"authorization": "Bearer x"})
    assert r.status_code == 404 and "cocoon provider join" in r.json()["error"]["message"]


def test_forged_signature_is_rejected(client: TestClient, key: PrivateKey) -> None:
    body = signed(key)
    body["registration"]["gpu_price"] = 1  # tampered after signing
    r = client.post("/v1/providers", json=body)
    assert r.status_code == 401 and "signature" in r.json()["error"]["message"]


def test_key_must_own_the_wallet(client: TestClient, key: PrivateKey) -> None:
    other = Wallet(PrivateKey.generate().public_key()).address.friendly()
    r = client.post("/v1/providers", json=signed(key, wallet=other))
    assert r.status_code == 401 and "does not own wallet" in r.json()["error"]["message"]
    r = client.post("/v1/providers", json=signed(key, wallet="EQnot-an-address"))
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"


def test_stale_and_replayed_registrations_are_rejected(client: TestClient, key: PrivateKey) -> None:
    r = client.post("/v1/providers", json=signed(key, now=time.time() - 3600))
    assert r.status_code == 401 and "clock" in r.json()["error"]["message"]
    body = signed(key)
    assert client.post("/v1/providers", json=body).status_code == 201
    r = client.post("/v1/providers", json=body)
    assert r.status_code == 401 and "nonce" in r.json()["error"]["message"]


def test_rejoin_keeps_node_id_and_replaces_token(client: TestClient, key: PrivateKey) -> None:
    first = client.post("/v1/providers", json=signed(key)).json()
    second = client.post("/v1/providers", json=signed(key, price=700_000)).json()
    assert first["node_id"] == second["node_id"]
    old = {"authorization": f"Bearer {first['token']}"}
    assert client.post(f"/v1/providers/{first['node_id']}/heartbeat", headers=old).status_code == 401
    rows = client.get("/v1/providers").json()["providers"]
    assert [r["gpu_price"] for r in rows] == [700_000]


@pytest.mark.parametrize("body", [{}, {"registration": {"wallet": "x"}, "signature": "00"}, []])
def test_malformed_registrations_get_400(client: TestClient, body: object) -> None:
    r = client.post("/v1/providers", json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"


def test_no_ray_address_is_a_clear_503(market: Marketplace, key: PrivateKey, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.setenv("COCOON_RAY_ADDRESS", "")
    from cocoon_faas.settings import reload_settings

    reload_settings()
    c = TestClient(Starlette(routes=provider_routes(market, ray_address=lambda: None)))
    r = c.post("/v1/providers", json=signed(key))
    reload_settings()
    assert r.status_code == 503 and "COCOON_RAY_ADDRESS" in r.json()["error"]["message"]
    assert market.listing() == []


def test_health_loop_sweeps_silent_nodes_and_dead_ray_nodes(key: PrivateKey) -> None:
    import asyncio

    from cocoon_faas.gateway.marketplace import Node, pin
    from cocoon_faas.gateway.provider_routes import health_loop

    market = Marketplace(heartbeat_interval=0.05)
    market.register(Node("quiet", "w", "00" * 32, H100, 1, 0))
    market.register(Node("raydead", "w", "00" * 32, H100, 1, 0))
    ray_view = [{"NodeID": "r1", "Alive": True, "Resources": {"cocoon-node:raydead": 1000.0}}]
    events: list[tuple[str, str]] = []
    market.subscribe(lambda e: events.append((e.kind, e.node.node_id)))

    async def scenario() -> None:
        task = asyncio.create_task(health_loop(market, ray_nodes=lambda: list(ray_view)))
        for _ in range(3):
            market.heartbeat("raydead")
            await asyncio.sleep(0.03)
        ray_view[0] = {"NodeID": "r1", "Alive": False, "Resources": {}}
        for _ in range(10):
            market.heartbeat("raydead")  # the agent still talks, but its Ray node is gone
            await asyncio.sleep(0.03)
        task.cancel()

    asyncio.run(scenario())
    assert ("down", "quiet") in events and ("down", "raydead") in events
    assert pin("abc") == {"cocoon-node:abc": 0.001}
