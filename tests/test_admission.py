"""Provider admission (gateway/admission.py) and its HTTP edge, tried as an attacker would: unapproved,
unattested, untrusted, borrowed and lying registrations; the secrets sealed to the attested key; a real Store
holds the operator's approvals; the marketplace excludes nodes whose Ray node contradicts their claims."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

from cocoon_faas.errors import InvalidRequestError, PermissionDeniedError
from cocoon_faas.gateway.admission import APPROVED, ATTESTED, OPEN, Admission, resolve_mode, wallet_key
from cocoon_faas.gateway.marketplace import Marketplace, Node, Requirements, claims_problem
from cocoon_faas.gateway.provider_routes import provider_routes
from cocoon_faas.gateway.store import Store
from cocoon_faas.runtime.hardware import GIB, Hardware
from cocoon_faas.runtime.node_attestation import NodeIdentity, dev_key_hex, worker_measurement
from cocoon_faas.runtime.registration import Registration
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet

HW = Hardware("declared", "H100", 1, 80 * GIB, None, 4, 16 * GIB)


def registration(key: PrivateKey, *, hw: Hardware = HW, price: int = 1000, kid: str = "") -> Registration:
    return Registration.new(wallet=Wallet(key.public_key()).address.friendly(),
                            public_key=key.public_key().to_bytes(), name="box", hardware=hw, gpu_price=price,
                            attestation_kid=kid)


def test_resolve_mode() -> None:
    assert resolve_mode("auto", "127.0.0.1") == OPEN
    assert resolve_mode("auto", "0.0.0.0") == ATTESTED and resolve_mode("auto", "10.1.2.3") == ATTESTED
    assert resolve_mode("approved", "0.0.0.0") == APPROVED
    with pytest.raises(InvalidRequestError, match="loopback development only"):
        resolve_mode("open", "0.0.0.0")


def test_price_and_hardware_claims_are_bounded_in_every_mode() -> None:
    adm = Admission(OPEN, status_of=lambda w: None, max_price=10**9)
    key = PrivateKey.generate()
    adm.check(registration(key, price=10**9), None, time.time())
    with pytest.raises(InvalidRequestError, match="COCOON_MAX_PRICE_NANOTON"):
        adm.check(registration(key, price=10**30), None, time.time())
    for hw in (dataclasses.replace(HW, cpus=100_000), dataclasses.replace(HW, gpu_count=64 * 8)):
        with pytest.raises(InvalidRequestError, match="beyond any one machine"):
            adm.check(registration(key, hw=hw), None, time.time())


def test_approved_mode_and_revocation() -> None:
    book: dict[str, str] = {}
    adm = Admission(APPROVED, status_of=book.get, max_price=10**9)
    key = PrivateKey.generate()
    reg = registration(key)
    with pytest.raises(PermissionDeniedError, match="cocoon provider approve") as exc:
        adm.check(reg, None, time.time())
    assert "COCOON_PROVIDER_ADMISSION=approved" in exc.value.message
    book[wallet_key(reg.wallet)] = "approved"
    assert adm.check(reg, None, time.time()).mode == APPROVED
    book[wallet_key(reg.wallet)] = "revoked"
    with pytest.raises(PermissionDeniedError, match="revoked"):
        adm.check(reg, None, time.time())
    with pytest.raises(PermissionDeniedError, match="revoked"):  # revocation holds in open mode too
        Admission(OPEN, status_of=book.get, max_price=10**9).check(reg, None, time.time())


def test_attested_mode_checks_the_evidence_the_wallet_and_the_key(tmp_path: Path) -> None:
    trusted, other = tmp_path / "trusted", tmp_path / "other"
    adm = Admission(ATTESTED, status_of=lambda w: None, max_price=10**9, dev_keys=[dev_key_hex(trusted)])
    key = PrivateKey.generate()
    pk = key.public_key().to_bytes()
    now = time.time()
    with pytest.raises(PermissionDeniedError, match="carries no attestation"):
        adm.check(registration(key), None, now)
    good = NodeIdentity.create(pk, home=trusted)
    admitted = adm.check(registration(key, kid=good.key_id), good.document, now)
    assert admitted.mode == ATTESTED and admitted.sealing_key == good.hpke_public
    untrusted = NodeIdentity.create(pk, home=other)
    with pytest.raises(PermissionDeniedError, match="dev_key_untrusted"):
        adm.check(registration(key, kid=untrusted.key_id), untrusted.document, now)
    thief = PrivateKey.generate()  # someone else's (public) document under another wallet
    with pytest.raises(PermissionDeniedError, match="another wallet key"):
        adm.check(registration(thief, kid=good.key_id), good.document, now)
    with pytest.raises(PermissionDeniedError, match="attestation_kid"):
        adm.check(registration(key), good.document, now)
    wrong = NodeIdentity.create(pk, home=trusted, measurement="ab" * 32)  # not the platform's worker
    with pytest.raises(PermissionDeniedError, match="measurement"):
        adm.check(registration(key, kid=wrong.key_id), wrong.document, now)
    tampered = {**good.document, "measurement": worker_measurement()[::-1]}
    with pytest.raises(PermissionDeniedError):
        adm.check(registration(key, kid=good.key_id), tampered, now)


class _Operator:
    def __call__(self, request: Request) -> bool:
        return request.headers.get("authorization") == "Bearer op"


def _client(tmp_path: Path, mode: str, market: Marketplace, **kw: Any) -> tuple[TestClient, Store]:
    store = Store(tmp_path / "db.sqlite")
    adm = Admission(mode, status_of=store.wallet_status, max_price=10**9, **kw)
    app = Starlette(routes=provider_routes(market, ray_address="127.0.0.1:6379", ray_token="ray-secret",
                                           admission=adm, wallets=lambda: store, is_operator=_Operator()))
    return TestClient(app), store


def test_unapproved_gets_403_and_no_ray_address_then_approve_and_revoke(tmp_path: Path) -> None:
    market = Marketplace(heartbeat_interval=1.0)
    client, store = _client(tmp_path, APPROVED, market)
    key = PrivateKey.generate()
    reg = registration(key)
    r = client.post("/v1/providers", json=reg.signed(key))
    # neither the Ray address nor its token in the refusal (a random wallet address may spell "ray" itself)
    assert r.status_code == 403 and "127.0.0.1:6379" not in r.text and "ray-secret" not in r.text
    assert "ray_address" not in r.json()["error"]
    assert "cocoon provider approve" in r.json()["error"]["message"] and market.listing() == []
    assert client.post("/v1/providers/approvals", json={"wallet": reg.wallet}).status_code == 403  # not operator
    op = {"authorization": "Bearer op"}
    ok = client.post("/v1/providers/approvals", json={"wallet": reg.wallet}, headers=op)
    assert ok.status_code == 200 and ok.json()["status"] == "approved"
    assert store.wallet_status(wallet_key(reg.wallet)) == "approved"
    joined = client.post("/v1/providers", json=registration(key).signed(key))
    assert joined.status_code == 201 and joined.json()["ray_token"] == "ray-secret"
    node_id = joined.json()["node_id"]
    gone = client.delete(f"/v1/providers/approvals/{reg.wallet}", headers=op)
    assert gone.status_code == 200 and gone.json()["nodes_down"] == [node_id]
    assert market.status(node_id) == "down" and not market.routable(node_id)
    hb = client.post(f"/v1/providers/{node_id}/heartbeat", json={"load": 0},
                     headers={"authorization": f"Bearer {joined.json()['token']}"})
    assert hb.status_code == 401  # its session ended with the revocation
    assert client.post("/v1/providers", json=registration(key).signed(key)).status_code == 403
    listing = client.get("/v1/providers/approvals", headers=op).json()
    assert listing["admission"] == APPROVED and listing["wallets"][0]["status"] == "revoked"


def test_attested_registration_gets_its_secrets_sealed(tmp_path: Path) -> None:
    market = Marketplace(heartbeat_interval=1.0)
    home = tmp_path / "node"
    client, _ = _client(tmp_path, ATTESTED, market, dev_keys=[dev_key_hex(home)])
    key = PrivateKey.generate()
    bare = client.post("/v1/providers", json=registration(key).signed(key))
    assert bare.status_code == 403 and "COCOON_PROVIDER_ADMISSION=attested" in bare.json()["error"]["message"]
    ident = NodeIdentity.create(key.public_key().to_bytes(), home=home)
    r = client.post("/v1/providers", json=registration(key, kid=ident.key_id).signed(key, ident.document))
    assert r.status_code == 201, r.text
    body = r.json()
    assert "ray-secret" not in r.text and "token" not in body and "ray_address" not in body
    opened = ident.open_secrets(body["sealed"], body["node_id"])
    assert opened["ray_token"] == "ray-secret" and opened["ray_address"] == "127.0.0.1:6379"
    other = NodeIdentity.create(key.public_key().to_bytes(), home=home)
    with pytest.raises(Exception, match="does not open"):
        other.open_secrets(body["sealed"], body["node_id"])
    hb = client.post(f"/v1/providers/{body['node_id']}/heartbeat", json={"load": 0},
                     headers={"authorization": f"Bearer {opened['token']}"})
    assert hb.status_code == 200


def _node(nid: str, hw: Hardware = HW, price: int = 1000) -> Node:
    return Node(nid, "w", "00" * 32, hw, price, 10)


def _ray(nid: str, rid: str, **res: float) -> dict[str, Any]:
    return {"Alive": True, "NodeID": rid, "Resources": {f"cocoon-node:{nid}": 1000.0, **res}}


def test_a_node_counts_only_once_its_ray_node_backs_its_claims() -> None:
    clock = [0.0]
    market = Marketplace(heartbeat_interval=1.0, clock=lambda: clock[0], expiry_s=100.0)
    honest, liar, never = _node("honest"), _node("liar", price=5000), _node("never", price=10**9)
    for n in (honest, liar, never):
        market.register(n)
    truth = {"CPU": 4.0, "GPU": 1.0, "memory": float(16 * GIB), "gpu:H100": 1.0, "gpu:H100-80GB": 1.0}
    market.sync_ray_nodes([_ray("honest", "r1", **truth), _ray("liar", "r2", **{**truth, "CPU": 1.0})])
    rows = {v.node_id: v for v in market.listing()}
    assert rows["honest"].excluded is None
    assert rows["liar"].excluded is not None and "claimed 4 CPU" in rows["liar"].excluded
    assert market.max_prices()[0] == 1000  # neither the liar nor the node that never came up sets prices
    h100 = Requirements(gpu_model="H100", gpu_count=1)
    assert [n.node_id for n in market.eligible(h100)] == ["honest"]
    assert market.place(h100).node_id == "honest"
    assert claims_problem(HW, {**truth, "cocoon-node:honest": 1000.0}, "honest") is None
    market.mark_down("honest", "test")
    assert market.max_prices()[0] == 0  # a node that goes down stops influencing pricing at once
    clock[0] = 500.0
    market.sweep()  # down (and silent) past the expiry: forgotten
    assert "honest" not in {v.node_id for v in market.listing()}
