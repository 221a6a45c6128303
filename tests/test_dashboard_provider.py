"""The dashboard's provider session over HTTP (in process): signed challenge -> one-time code -> cookie, and the
attacks on it: another provider's data, an API key, forged/expired/replayed challenges, codes and cookies, CSRF,
logout. A real SQLite store and ledger, a real marketplace; the clock is passed in."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cocoon_faas.gateway.dashboard_login import CHALLENGE_S, CODE_S, SESSION_S, ProviderLogin, SessionBook
from cocoon_faas.gateway.dashboard_provider import COOKIE, ProviderDashboard, provider_dashboard_routes
from cocoon_faas.gateway.db import open_database
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.marketplace import Marketplace, Node
from cocoon_faas.gateway.payments import FeePolicy, PaymentGate
from cocoon_faas.gateway.payouts import PayoutChannels
from cocoon_faas.runtime.hardware import GIB, Hardware
from cocoon_faas.ton.channel import SignedSemiChannel
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
from cocoon_faas.ton.wallet import Wallet

H100 = Hardware("declared", "H100", 2, 80 * GIB, None, 16, 64 * GIB)
OP, CALLER = PrivateKey(b"\x07" * 32), PrivateKey(b"\x08" * 32)
A, B = PrivateKey(b"\x0a" * 32), PrivateKey(b"\x0b" * 32)
BASE = "/dashboard/api/provider"
JSON_ORIGIN = {"origin": "http://testserver"}


def wallet(key: PrivateKey) -> str:
    return Wallet(key.public_key()).address.friendly()


class Clock:
    def __init__(self) -> None:
        self.t = time.time()  # the ledger stamps its rows with the real clock

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    clock = Clock()
    market = Marketplace(heartbeat_interval=1.0)
    for nid, key, name in (("a-node-1", A, "rig-1"), ("a-node-2", A, "rig-2"), ("b-node-1", B, "b-box")):
        market.register(Node(nid, wallet(key), key.public_key().hex(), H100, 500_000, 0, name))
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.add_channel(1, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "alice", 10**9)
    gate, signer = PaymentGate(ledger, OP, FeePolicy(bps=1000)), ChannelSigner(tmp_path / "c.json", CALLER, 1, 10**9)
    for i, (nid, amount) in enumerate((("a-node-1", 3000), ("a-node-1", 4000), ("a-node-2", 5000),
                                       ("b-node-1", 777_000))):
        t = signer.sign_for_call(10**6)
        signer.complete(t, gate.settle(gate.authorize(t.header, f"c{i}", "f", 10**6), nid, amount, "d", 0))
    payouts = PayoutChannels(ledger, None, OP)  # a channel funded on chain before: recorded, then paid through
    payouts.adopt("a-node-1", 555, A.public_key(), Wallet(A.public_key()).address, 10**9)
    payouts.pay("a-node-1", 6000)
    sessions = SessionBook(open_database(tmp_path / "store.db"), clock=clock)
    app = Starlette(routes=provider_dashboard_routes(
        ProviderDashboard(lambda: sessions, lambda: market, lambda: ledger, clock=clock)))
    named = Starlette(routes=provider_dashboard_routes(  # COCOON_DASHBOARD_HOSTS=faas.example.com
        ProviderDashboard(lambda: sessions, lambda: market, lambda: ledger, clock=clock,
                          hosts=frozenset({"faas.example.com"}))))
    return {"app": app, "named": named, "clock": clock, "ledger": ledger}


def signed_login(client: TestClient, key: PrivateKey, *, claim: str | None = None, gateway: str = "testserver",
                 challenge: str | None = None) -> dict[str, Any]:
    challenge = challenge or client.post(f"{BASE}/challenge").json()["challenge"]
    return ProviderLogin(challenge, gateway, claim or wallet(key), "v3r2", key.public_key().hex()).signed(key)


def log_in(client: TestClient, key: PrivateKey) -> str:
    r = client.post(f"{BASE}/login", json=signed_login(client, key))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["url"] == f"http://testserver/dashboard#provider-code={out['code']}"
    r = client.post(f"{BASE}/session", json={"code": out["code"]}, headers=JSON_ORIGIN)
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    for attr in ("HttpOnly", "SameSite=strict", "Path=/dashboard", f"Max-Age={int(SESSION_S)}"):
        assert attr.lower() in cookie.lower(), cookie
    assert "secure" not in cookie.lower()  # plain http on loopback; https (or X-Forwarded-Proto) adds Secure
    return str(r.json()["csrf"])


def reason(r: Any) -> str:
    return str(r.json()["error"].get("reason"))


def test_a_provider_sees_its_own_nodes_books_and_charts_only(world: dict[str, Any]) -> None:
    a, b = TestClient(world["app"]), TestClient(world["app"])
    log_in(a, A)
    log_in(b, B)
    me = a.get(f"{BASE}/me").json()
    assert me["wallet"] == Wallet(A.public_key()).address.raw
    nodes = {n["node_id"]: n for n in me["nodes"]}
    assert set(nodes) == {"a-node-1", "a-node-2"}
    assert (nodes["a-node-1"]["ledger_earned"], nodes["a-node-1"]["ledger_paid"], nodes["a-node-1"]["due"]) == \
        (7000, 6000, 1000)
    assert nodes["a-node-2"]["gpu"] == "H100-80GB x2" and nodes["a-node-2"]["status"] == "up"
    assert me["totals"] == {"earned": 12000, "paid": 6000, "due": 6000}
    assert me["pending"]["due"] == 6000 and me["pending"]["last_payout"]["amount"] == 6000
    assert [p["provider_id"] for p in me["payouts"]] == ["a-node-1"]
    ch, = me["pending"]["channels"]  # the state to close on chain with: the operator's signature, 6000 sent
    assert (ch["provider_id"], ch["channel_id"], ch["seqno"], ch["sent"], ch["left"]) == \
        ("a-node-1", "555", 1, 6000, 10**9 - 6000)
    state = SignedSemiChannel.from_boc(base64.b64decode(ch["latest_state"]))
    assert state.is_signed_by(OP.public_key()) and state.state.channel_id == 555 and state.state.data.sent == 6000
    s = me["series"]
    assert s["earned"][-1] == 12000 and s["paid"][-1] == 6000 and s["due"][-1] == 6000 and len(s["t"]) >= 3
    assert s["t"] == sorted(set(s["t"])) and s["earned"] == sorted(s["earned"]) and s["earned"][0] == 0  # steps
    assert "777000" not in a.get(f"{BASE}/me").text  # B's earnings are nowhere in A's view
    assert a.get(f"{BASE}/nodes/a-node-2").json()["node_id"] == "a-node-2"
    r = a.get(f"{BASE}/nodes/b-node-1")  # B's node: as if it did not exist
    assert r.status_code == 404 and "777000" not in r.text
    b_me = b.get(f"{BASE}/me").json()
    assert {n["node_id"] for n in b_me["nodes"]} == {"b-node-1"} and b_me["pending"]["channels"] == []
    assert b.get(f"{BASE}/nodes/a-node-1").status_code == 404


def test_an_api_key_or_a_forged_cookie_opens_nothing(world: dict[str, Any]) -> None:
    c = TestClient(world["app"])
    r = c.get(f"{BASE}/me", headers={"authorization": "Bearer any-tenant-or-operator-key"})
    assert r.status_code == 401 and reason(r) == "missing" and "cocoon provider login" in r.json()["error"]["message"]
    c.cookies.set(COOKIE, "forged-session-id", domain="testserver.local", path="/dashboard")
    r = c.get(f"{BASE}/me")
    assert r.status_code == 401 and reason(r) == "unknown"
    assert c.get(f"{BASE}/nodes/a-node-1").status_code == 401


def test_forged_expired_replayed_and_misdirected_logins_are_refused(world: dict[str, Any]) -> None:
    c, clock = TestClient(world["app"]), world["clock"]
    challenge = c.post(f"{BASE}/challenge").json()["challenge"]
    forged = signed_login(c, A, challenge=challenge)
    forged["signature"] = B.sign(ProviderLogin(**forged["login"]).message()).hex()
    r = c.post(f"{BASE}/login", json=forged)
    assert r.status_code == 401 and "forged" in r.json()["error"]["message"]
    r = c.post(f"{BASE}/login", json=signed_login(c, B, claim=wallet(A), challenge=challenge))  # B claims A's wallet
    assert r.status_code == 401 and "does not own" in r.json()["error"]["message"]
    r = c.post(f"{BASE}/login", json=signed_login(c, A, gateway="evil.example:443", challenge=challenge))
    assert r.status_code == 403 and reason(r) == "audience"
    honest = signed_login(c, A, challenge=challenge)  # the refusals did not use the challenge up
    assert c.post(f"{BASE}/login", json=honest).status_code == 200
    r = c.post(f"{BASE}/login", json=honest)
    assert r.status_code == 401 and reason(r) == "replayed"
    r = c.post(f"{BASE}/login", json=signed_login(c, A, challenge="made-up-challenge"))
    assert r.status_code == 401 and reason(r) == "unknown"
    late = signed_login(c, A)
    clock.t += CHALLENGE_S + 1
    r = c.post(f"{BASE}/login", json=late)
    assert r.status_code == 401 and reason(r) == "expired"
    nobody = PrivateKey(b"\x0c" * 32)
    r = c.post(f"{BASE}/login", json=signed_login(c, nobody))
    assert r.status_code == 404 and "cocoon provider join" in r.json()["error"]["message"]
    r = c.post(f"{BASE}/login", json={"login": {"challenge": "x"}, "signature": "00"})
    assert r.status_code == 400 and "lacks" in r.json()["error"]["message"]


def test_codes_and_sessions_are_one_use_and_short_lived(world: dict[str, Any]) -> None:
    c, clock = TestClient(world["app"]), world["clock"]
    code = c.post(f"{BASE}/login", json=signed_login(c, A)).json()["code"]
    assert c.post(f"{BASE}/session", json={"code": code}, headers=JSON_ORIGIN).status_code == 200
    r = TestClient(world["app"]).post(f"{BASE}/session", json={"code": code}, headers=JSON_ORIGIN)
    assert r.status_code == 401 and reason(r) == "replayed"  # a leaked link, opened second, gets nothing
    late = c.post(f"{BASE}/login", json=signed_login(c, A)).json()["code"]
    clock.t += CODE_S + 1
    r = c.post(f"{BASE}/session", json={"code": late}, headers=JSON_ORIGIN)
    assert r.status_code == 401 and reason(r) == "expired"
    assert c.get(f"{BASE}/me").status_code == 200
    clock.t += SESSION_S
    r = c.get(f"{BASE}/me")
    assert r.status_code == 401 and reason(r) == "expired"


def test_csrf_is_refused_and_logout_ends_the_session(world: dict[str, Any]) -> None:
    c = TestClient(world["app"])
    code = c.post(f"{BASE}/login", json=signed_login(c, A)).json()["code"]
    for headers, body in (({"origin": "http://evil.example"}, {"json": {"code": code}}),
                          ({"origin": "null"}, {"json": {"code": code}}),
                          ({}, {"data": {"code": code}})):  # a cross-site form posts form-encoded
        r = c.post(f"{BASE}/session", headers=headers, **body)
        assert r.status_code == 403 and reason(r) == "csrf", r.text
    csrf = log_in(TestClient(world["app"]), A)  # another browser of A's: its token is not this session's
    c.post(f"{BASE}/session", json={"code": code}, headers=JSON_ORIGIN)  # the code survived the refusals
    me = c.get(f"{BASE}/me").json()
    for headers in ({}, {"x-cocoon-csrf": csrf}, {"x-cocoon-csrf": me["csrf"], "origin": "http://evil.example"}):
        r = c.post(f"{BASE}/logout", json={}, headers=headers)
        assert r.status_code == 403 and reason(r) == "csrf", r.text
        assert c.get(f"{BASE}/me").status_code == 200  # still logged in: nothing changed
    sid = c.cookies.get(COOKIE)
    r = c.post(f"{BASE}/logout", json={}, headers={"x-cocoon-csrf": me["csrf"], **JSON_ORIGIN})
    assert r.status_code == 200 and 'cocoon_provider=""' in r.headers["set-cookie"]
    assert c.get(f"{BASE}/me").status_code == 401
    c.cookies.set(COOKIE, sid or "", path="/dashboard")  # the old cookie, kept by an attacker: ended server-side
    r = c.get(f"{BASE}/me")
    assert r.status_code == 401 and reason(r) == "unknown"


def test_logins_and_books_on_both_database_backends(database: Any, tmp_path: Path) -> None:
    """What several gateways share: a challenge used on one is a replay on the other; the ledger's series query."""
    clock = Clock()
    one, two = SessionBook(database(), clock=clock), SessionBook(database(), clock=clock)
    challenge, _ = one.new_challenge()
    two.use_challenge(challenge)
    with pytest.raises(Exception, match="already used"):
        one.use_challenge(challenge)
    sid, s = one.redeem(two.new_code("0:" + "ab" * 32)[0])
    assert two.session(sid).wallet == s.wallet == "0:" + "ab" * 32
    two.end(sid)
    with pytest.raises(Exception, match="unknown or ended"):
        one.session(sid)
    ledger = Ledger(database(), home=tmp_path)
    ledger.add_channel(1, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "alice", 10**9)
    gate, signer = PaymentGate(ledger, OP), ChannelSigner(tmp_path / "c.json", CALLER, 1, 10**9)
    for i, nid in enumerate(("n1", "n1", "n2", "other")):
        t = signer.sign_for_call(10**6)
        signer.complete(t, gate.settle(gate.authorize(t.header, f"c{i}", "f", 10**6), nid, 1000 + i, "d", 0))
    before, buckets = ledger.provider_income(["n1", "n2"], "charges", time.time() - 60, 10.0)
    assert before == 0 and sum(s for _, s in buckets) == 1000 + 1001 + 1002
    assert ledger.provider_income(["n1"], "charges", time.time() + 60, 10.0) == (2001, [])
    assert ledger.payouts_to(["n1"]) == []


def test_a_gateway_that_knows_its_name_refuses_logins_signed_for_another(world: dict[str, Any]) -> None:
    """A look-alike gateway relaying a login it got signed (for its own name) cannot pass it off with a forged Host
    header once the real gateway's names are set."""
    c = TestClient(world["named"], base_url="http://faas.example.com")
    relayed = signed_login(c, A, gateway="look-alike.example")
    r = c.post(f"{BASE}/login", json=relayed, headers={"host": "look-alike.example"})
    assert r.status_code == 403 and reason(r) == "audience" and "faas.example.com" in r.json()["error"]["message"]
    r = c.post(f"{BASE}/login", json=signed_login(c, A, gateway="faas.example.com"))
    assert r.status_code == 200 and r.json()["url"].startswith("http://faas.example.com/dashboard#provider-code=")


def test_unauthenticated_challenges_are_bounded(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import cocoon_faas.gateway.dashboard_login as login_mod

    monkeypatch.setattr(login_mod, "MAX_PENDING", 3)
    c, clock = TestClient(world["app"]), world["clock"]
    assert all(c.post(f"{BASE}/challenge").status_code == 200 for _ in range(3))
    r = c.post(f"{BASE}/challenge")
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    clock.t += CHALLENGE_S + 1  # expired ones no longer count
    assert c.post(f"{BASE}/challenge").status_code == 200
