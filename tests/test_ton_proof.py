"""Browser-only provider login with TON Connect's ton_proof: the verifier (gateway/ton_proof.py) against proofs
signed by real wallet keys (the shared test mnemonic and random keys) for every wallet version it knows, each
refusal by name, and the routes over HTTP (in process: a real SQLite store, a real marketplace): the session
cookie, single use, refusals that change nothing, garbage that never 500s. The wallet's side is built here the
way a wallet app builds it (the TON Connect spec's message), with the project's own keys and wallet cells."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pytoniq_core import begin_cell
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.errors import AuthenticationError, CocoonError, InvalidRequestError, PermissionDeniedError
from cocoon_faas.gateway.dashboard_login import TON_PROOF_S, SessionBook
from cocoon_faas.gateway.dashboard_provider import COOKIE, ProviderDashboard, provider_dashboard_routes
from cocoon_faas.gateway.db import open_database
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.marketplace import Marketplace, Node
from cocoon_faas.gateway.ton_proof import MAX_AGE_S, TonProof, proof_message
from cocoon_faas.runtime.hardware import GIB, Hardware
from cocoon_faas.runtime.registration import wallet_owner_matches
from cocoon_faas.ton.address import Address
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import MAINNET, TESTNET, Wallet, state_init_cell, version_of_code, wallet_code
from tests.conftest import TESTDATA

VERSIONS = ("v3r1", "v3r2", "v4r2", "v5r1")
BASE = "/dashboard/api/provider"
HOST = "testserver"
H100 = Hardware("declared", "H100", 1, 80 * GIB, None, 8, 32 * GIB)


def mnemonic_key() -> PrivateKey:
    vec = json.loads((TESTDATA / "ton" / "mnemonic_vector.json").read_text())
    key = PrivateKey.from_mnemonic(vec["words"])
    assert key.public_key().to_bytes().hex() == vec["pub"]
    return key


def wallet_reply(key: PrivateKey, version: str, payload: str, *, domain: str = HOST, ts: float | None = None,
                 network: int = MAINNET, signer: PrivateKey | None = None, state_init: Any = None,
                 address: Address | None = None, public_key: bytes | None = None) -> dict[str, Any]:
    """What a TON Connect frontend posts after `connect` with tonProof (overrides make the forgeries)."""
    w = Wallet(key.public_key(), version=version, network=network)
    si = state_init if state_init is not None else w.state_init()
    addr = address or w.address
    stamp = int(time.time() if ts is None else ts)
    sig = (signer or key).sign(proof_message(addr, domain, stamp, payload))
    return {"address": addr.raw, "network": str(network), "public_key": (public_key or key.public_key().raw).hex(),
            "proof": {"timestamp": stamp, "domain": {"lengthBytes": len(domain.encode()), "value": domain},
                      "payload": payload, "signature": base64.b64encode(sig).decode(),
                      "state_init": base64.b64encode(si.to_boc()).decode()}}


# -- the wallet contracts ---------------------------------------------------------------------------------------

def test_wallet_versions_match_their_code_hashes_and_on_chain_addresses() -> None:
    """The code cells hash to the code hashes explorers show; the derived addresses are those of wallets that
    sent transactions on mainnet (keys published in trustwallet/wallet-core's TON signing tests)."""
    assert wallet_code("v4r2").hash.hex() == "feb5ff6820e2ff0d9483e7e0d62c817d846789fb4ae580c878866d959dabd5c0"
    assert wallet_code("v5r1").hash.hex() == "20834b7b72b112147e1b2fb457b84e74d1a30f04f737d4f62a668e9552d2b72f"
    v4 = PrivateKey(bytes.fromhex("e97620499dfee0107c0cd7f0ecb2afb3323d385b3a82320a5e3fa1fbdca6e722")).public_key()
    assert Wallet(v4, "v4r2").address.friendly(bounceable=False) == "UQApdOSfRTScoB9bMNGeo3bn-DGpQD8gywA27UaZVvAQsrHg"
    v5 = PrivateKey(bytes.fromhex("3570e35f54cfb843f2cfaf2b8cae7ceeb7b32225d7dbbd86f611056d74d9073e")).public_key()
    assert Wallet(v5, "v5r1").address.friendly() == "EQAU3o5-Sp1MYRpw3U7b_wmARxqI49LxiFhEoVCxpUKjTdgh"
    assert Wallet(v5, "v5r1", network=TESTNET).address != Wallet(v5, "v5r1").address  # v5R1 binds its network
    for version in VERSIONS:
        assert version_of_code(wallet_code(version).hash) == version
        addr = Wallet(v5, version, workchain=-1).address.friendly()
        assert wallet_owner_matches(addr, v5.raw, version) and not wallet_owner_matches(addr, v4.raw, version)
    assert wallet_owner_matches(Wallet(v5, "v5r1", network=TESTNET).address.raw, v5.raw, "v5r1")
    with pytest.raises(InvalidRequestError, match="v3 wallets only"):
        key = PrivateKey(b"\x01" * 32)
        Wallet(key.public_key(), "v4r2").transfer_body(key, 0, 0, [(3, begin_cell().end_cell())])


# -- the verifier -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_proofs_of_every_wallet_version_verify(version: str) -> None:
    for key in (mnemonic_key(), PrivateKey.generate()):
        for network in (MAINNET, TESTNET):
            proof = TonProof.from_wire(wallet_reply(key, version, "pay-load", network=network))
            assert proof.verify({HOST}, time.time()) == version
            assert proof.address == Wallet(key.public_key(), version, network=network).address


def refusal(body: dict[str, Any], hosts: set[str] | None = None, now: float | None = None) -> CocoonError:
    with pytest.raises(CocoonError) as info:
        TonProof.from_wire(body).verify(hosts or {HOST}, time.time() if now is None else now)
    return info.value


@pytest.mark.parametrize("version", ("v4r2", "v5r1"))
def test_each_forgery_is_refused_by_name(version: str) -> None:
    key, other = mnemonic_key(), PrivateKey.generate()
    e = refusal(wallet_reply(key, version, "p", signer=other))
    assert isinstance(e, AuthenticationError) and "does not verify" in e.message
    good = wallet_reply(key, version, "p")
    tampered = json.loads(json.dumps(good))
    tampered["proof"]["payload"] = "another-payload"  # signed over other fields
    assert "does not verify" in refusal(tampered).message
    e = refusal(wallet_reply(key, version, "p", domain="evil.example"))
    assert isinstance(e, PermissionDeniedError) and e.details["reason"] == "domain"
    assert refusal(wallet_reply(key, version, "p", ts=time.time() - MAX_AGE_S - 5)).details["reason"] == "stale"
    assert refusal(wallet_reply(key, version, "p", ts=time.time() + MAX_AGE_S + 5)).details["reason"] == "future"
    theirs = Wallet(other.public_key(), version)
    # another key's state_init and address, our public key: the key is not the wallet's
    e = refusal(wallet_reply(key, version, "p", state_init=theirs.state_init(), address=theirs.address))
    assert e.details["reason"] == "public_key"
    # our address, another wallet's state_init: the state_init is not this address's
    assert refusal(wallet_reply(key, version, "p", state_init=theirs.state_init())).details["reason"] == "address"
    # the other key signs for its own wallet but claims ours
    e = refusal(wallet_reply(other, version, "p", address=Wallet(key.public_key(), version).address))
    assert e.details["reason"] == "address"
    # a real state_init of our key, but another subwallet: not the standard wallet the nodes joined with
    odd = Wallet(key.public_key(), version, subwallet_id=7) if version == "v4r2" else None
    if odd is not None:
        e = refusal(wallet_reply(key, version, "p", state_init=odd.state_init(), address=odd.address))
        assert "not the standard v4r2 wallet" in e.message
    alien = state_init_cell(begin_cell().store_uint(1, 8).end_cell(), begin_cell().end_cell())  # another contract
    e = refusal(wallet_reply(key, version, "p", state_init=alien, address=Address(0, alien.hash)))
    assert "not a standard wallet" in e.message
    assert refusal(good, hosts={"faas.example.com:8443"}).details["reason"] == "domain"


def test_the_domain_may_omit_the_port_and_the_timestamp_may_be_a_string() -> None:
    key = PrivateKey.generate()
    body = wallet_reply(key, "v4r2", "p", domain="faas.example.com")
    body["proof"]["timestamp"] = str(body["proof"]["timestamp"])
    assert TonProof.from_wire(body).verify({"faas.example.com:8443"}, time.time()) == "v4r2"


@pytest.mark.parametrize("mutate", [
    lambda b: b.pop("proof"),
    lambda b: b.update(address="not-an-address"),
    lambda b: b.update(address=12),
    lambda b: b.update(network="1"),
    lambda b: b.update(public_key="zz" * 32),
    lambda b: b.update(public_key="00" * 31),
    lambda b: b["proof"].update(timestamp=-1),
    lambda b: b["proof"].update(timestamp=True),
    lambda b: b["proof"].update(timestamp="1e9"),
    lambda b: b["proof"].update(timestamp=[1]),
    lambda b: b["proof"].update(domain="testserver"),
    lambda b: b["proof"]["domain"].update(lengthBytes=3),
    lambda b: b["proof"]["domain"].update(value="x" * 100_000),
    lambda b: b["proof"].update(payload=None),
    lambda b: b["proof"].update(signature="not base64!"),
    lambda b: b["proof"].update(signature=base64.b64encode(b"short").decode()),
    lambda b: b["proof"].update(state_init="A" * 1_000_000),
    lambda b: b["proof"].update(state_init=base64.b64encode(b"\xb5\xee\x9c\x72" + b"\xff" * 40).decode()),
    lambda b: b["proof"].update(state_init=base64.b64encode(bytes(range(256)) * 3).decode()),
    lambda b: b["proof"].update(state_init=base64.b64encode(begin_cell().store_uint(5, 9).end_cell().to_boc())
                                .decode()),
    lambda b: b["proof"].update(state_init={"boc": 1}),
])
def test_garbage_is_a_400_naming_the_field(mutate: Any) -> None:
    body = wallet_reply(PrivateKey.generate(), "v5r1", "p")
    mutate(body)
    with pytest.raises(CocoonError) as info:
        TonProof.from_wire(body).verify({HOST}, time.time())
    assert 400 <= info.value.status < 500 and info.value.message


# -- the routes -------------------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def gw(tmp_path: Path) -> dict[str, Any]:
    clock, market = Clock(), Marketplace(heartbeat_interval=1.0)
    keys = {v: PrivateKey.generate() for v in ("v4r2", "v5r1")}
    keys["v4r2"] = mnemonic_key()
    for version, key in keys.items():  # each provider's node registered with its TON Connect wallet
        addr = Wallet(key.public_key(), version).address.friendly()
        market.register(Node(f"{version}-node", addr, key.public_key().hex(), H100, 500_000, 0, f"rig-{version}"))
    sessions = SessionBook(open_database(tmp_path / "store.db"), clock=clock)
    ledger = Ledger(tmp_path / "ledger.db")  # a fresh one: no payout was ever made (no payout table yet)
    app = Starlette(routes=provider_dashboard_routes(ProviderDashboard(lambda: sessions, lambda: market,
                                                                       lambda: ledger, clock=clock)))
    named = Starlette(routes=provider_dashboard_routes(ProviderDashboard(
        lambda: sessions, lambda: market, lambda: ledger, clock=clock, hosts=frozenset({"faas.example.com"}))))
    return {"app": app, "named": named, "clock": clock, "keys": keys}


def payload(c: TestClient) -> str:
    r = c.post(f"{BASE}/ton-proof/payload")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json()["expires_at"] > time.time() + TON_PROOF_S - 60
    return str(r.json()["payload"])


def post(c: TestClient, body: Any, **headers: str) -> Any:
    return c.post(f"{BASE}/ton-proof", json=body, headers=headers)


def test_a_wallet_logs_in_with_ton_proof_once_and_reads_its_own_view(gw: dict[str, Any]) -> None:
    for version, key in gw["keys"].items():
        c = TestClient(gw["app"])
        body = wallet_reply(key, version, payload(c))
        r = post(c, body, origin=f"http://{HOST}")
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert all(a in cookie for a in ("httponly", "samesite=strict", "path=/dashboard")) and r.json()["csrf"]
        me = c.get(f"{BASE}/me").json()
        assert me["wallet"] == Wallet(key.public_key(), version).address.raw and me["csrf"] == r.json()["csrf"]
        assert [n["node_id"] for n in me["nodes"]] == [f"{version}-node"]  # its own node, not the other's
        assert me["totals"] == {"earned": 0, "paid": 0, "due": 0} and me["pending"]["channels"] == []
        again = post(TestClient(gw["app"]), body)
        assert again.status_code == 401 and again.json()["error"]["reason"] == "replayed"


def test_refusals_change_nothing_and_name_the_check(gw: dict[str, Any]) -> None:
    c, key = TestClient(gw["app"]), gw["keys"]["v5r1"]
    p = payload(c)
    stranger = PrivateKey.generate()  # a real wallet, but no node here
    for body, status, why in ((wallet_reply(key, "v5r1", p, signer=stranger), 401, "does not verify"),
                              (wallet_reply(key, "v5r1", p, domain="evil.example"), 403, "signed for"),
                              (wallet_reply(stranger, "v5r1", p), 404, "has no node on this gateway"),
                              (wallet_reply(key, "v5r1", "made-up"), 401, "unknown ton_proof payload")):
        r = post(c, body)
        assert r.status_code == status and why in r.json()["error"]["message"], r.text
        assert COOKIE not in r.headers.get("set-cookie", "")
    r = post(c, wallet_reply(key, "v5r1", p), origin="http://evil.example")  # login CSRF from another site
    assert r.status_code == 403 and r.json()["error"]["reason"] == "csrf"
    assert c.get(f"{BASE}/me").status_code == 401
    assert post(c, wallet_reply(key, "v5r1", p)).status_code == 200  # the payload survived every refusal
    late = payload(c)
    gw["clock"].t += TON_PROOF_S + 1
    r = post(c, wallet_reply(key, "v5r1", late, ts=gw["clock"].t))
    assert r.status_code == 401 and r.json()["error"]["reason"] == "expired"


def test_a_gateway_that_knows_its_name_checks_the_domain_against_it(gw: dict[str, Any]) -> None:
    c, key = TestClient(gw["named"], base_url="http://faas.example.com"), gw["keys"]["v4r2"]
    r = post(c, wallet_reply(key, "v4r2", payload(c), domain="look-alike.example"), host="look-alike.example")
    assert r.status_code == 403 and "faas.example.com" in r.json()["error"]["message"]
    assert post(c, wallet_reply(key, "v4r2", payload(c), domain="faas.example.com")).status_code == 200


def test_garbage_bodies_never_500(gw: dict[str, Any]) -> None:
    c = TestClient(gw["app"])
    good = wallet_reply(gw["keys"]["v4r2"], "v4r2", payload(c))
    for raw in (b"", b"null", b"[]", b'"x"', b"{", json.dumps({"proof": []}).encode(), b"\xff\xfe",
                json.dumps({**good, "proof": {**good["proof"], "state_init": "QUJD" * 5000}}).encode(),
                json.dumps({**good, "address": {"x": 1}}).encode(), b"9" * 20_000):
        r = c.post(f"{BASE}/ton-proof", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text)
        assert "error" in r.json()
    assert post(c, good).status_code == 200  # and the payload of the good reply was not burned by them


def test_the_manifest_names_the_host_the_wallet_signs_for(gw: dict[str, Any]) -> None:
    r = TestClient(gw["app"]).get("/dashboard/tonconnect-manifest.json")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert r.json()["url"] == f"http://{HOST}" and r.json()["iconUrl"].endswith("/dashboard/assets/tonconnect-icon.png")
    r = TestClient(gw["named"], base_url="http://look-alike.example").get("/dashboard/tonconnect-manifest.json")
    assert r.json()["url"] == "http://faas.example.com"  # a forged Host does not move the proof's domain


def test_payloads_share_the_challenges_bound(gw: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither route needs credentials, so the CLI's challenges and the wallets' payloads count against one bound."""
    import cocoon_faas.gateway.dashboard_login as login_mod

    monkeypatch.setattr(login_mod, "MAX_PENDING", 3)
    c = TestClient(gw["app"])
    assert c.post(f"{BASE}/challenge").status_code == 200 and c.post(f"{BASE}/challenge").status_code == 200
    p = payload(c)
    for path in ("ton-proof/payload", "challenge"):
        r = c.post(f"{BASE}/{path}")
        assert r.status_code == 429 and r.headers["retry-after"] == "60"
    key = gw["keys"]["v4r2"]
    assert post(c, wallet_reply(key, "v4r2", p)).status_code == 200  # a used payload no longer counts
    assert c.post(f"{BASE}/ton-proof/payload").status_code == 200
