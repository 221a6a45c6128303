"""End-to-end confidential calls: a real gateway, a real local Ray, `dev` attestation (issue 3, "Done means").

A marker in the request and a different one only the answer holds must never appear in anything the gateway
process holds: its log, its SQLite files (with -wal), its call records and logs API, and the bytes it forwarded
(captured with COCOON_CAPTURE_FORWARDED). A plain call with a control marker shows the scan does find data the
gateway sees. Tamper cases end to end: a flipped byte, a replay, a response from another replica, stale keys.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from cocoon_faas.client import Client
from cocoon_faas.confidential import (
    SEALED_CONTENT_TYPE,
    CheckFailed,
    ClientPolicy,
    EnvelopeError,
    ReplicaIdentity,
    seal_request,
    verify_document,
)
from cocoon_faas.confidential_client import build_policy, verified_replicas
from cocoon_faas.errors import AttestationError, FunctionError
from tests.conftest import ROOT, GatewayProc

pytestmark = pytest.mark.e2e

MARKER = "req-marker-" + os.urandom(6).hex()
ANSWER = MARKER.upper()[::-1]  # only the function's answer holds this


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("conf") / "home"
    g = GatewayProc(home, env={"COCOON_ATTESTATION": "dev",
                               "COCOON_CAPTURE_FORWARDED": str(home / "forwarded.bin")}).start()
    g.cli("deploy", str(ROOT / "tests" / "apps" / "sealed.py"))
    yield g
    g.stop()


def client(g: GatewayProc) -> Client:
    return Client(url=g.url, api_key=g.key, payer=None, timeout=60)


def policy(g: GatewayProc, name: str) -> ClientPolicy:
    return build_policy(g.home, g.url, name, allow_dev_attestation=True)


def gateway_holdings(g: GatewayProc) -> dict[str, bytes]:
    """Every file under the gateway's COCOON_HOME (log, SQLite + WAL, capture) plus its call and log APIs."""
    out = {str(p.relative_to(g.home)): p.read_bytes() for p in g.home.rglob("*") if p.is_file()}
    with g.http() as h:
        for name in ("shout", "spell", "refuse"):
            out[f"api:logs:{name}"] = h.get(f"/v1/functions/{name}/logs", params={"limit": 1000}).content
    return out


def test_documents_are_dev_attested_and_pinned(gw):
    with gw.http() as h:
        att = h.get("/v1/functions/shout/attestation").json()
        measurement = h.get("/v1/functions/shout").json()["measurement"]
    assert att["measurement"] == measurement and len(att["documents"]) == 1
    doc = att["documents"][0]
    assert doc["tee"] == "dev" and "NOT SECURE" in doc["evidence"]["warning"]
    r = verify_document(doc, policy(gw, "shout"))
    assert r.measurement == measurement and r.insecure
    with pytest.raises(CheckFailed) as e:  # dev evidence is refused unless its key is trusted explicitly
        verify_document(doc, ClientPolicy.build([measurement], tee_kinds=["dev"], function="shout"))
    assert e.value.check == "dev_key_untrusted"


def test_marker_never_reaches_the_gateway(gw):
    c = client(gw)
    assert c.call_confidential("shout", {"text": MARKER}, policy=policy(gw, "shout")) == {
        "shout": ANSWER, "n": len(MARKER)}
    rc = c.last_receipt
    assert rc.function == "shout" and rc.exec_ms > 0 and rc.frames == 1
    # async: the call record holds only the sealed frame, which the client opens
    handle = c.spawn_confidential("shout", {"text": MARKER + "-async"}, policy=policy(gw, "shout"))
    assert handle.get(timeout=30)["shout"] == (MARKER + "-async").upper()[::-1]
    rec = c.get_call(handle.id)
    assert rec["status"] == "succeeded" and set(rec["result"]) == {"sealed_frame"}
    # streaming: each item sealed, ordered, authenticated end
    items = list(c.stream_confidential("spell", {"text": MARKER}, policy=policy(gw, "spell")))
    assert "".join(i["c"] for i in items) == ANSWER
    # a sealed function error: the message reaches only the caller
    with pytest.raises(FunctionError) as e:
        c.call_confidential("refuse", {"text": MARKER}, policy=policy(gw, "refuse"))
    assert ANSWER in e.value.message and e.value.details["exception_type"] == "ValueError"
    # control: a plain call's data does reach the gateway (its log API), so the scan below can find data
    control = "plain-control-" + os.urandom(4).hex()
    assert c.call("shout", {"text": control})["shout"] == control.upper()[::-1]
    time.sleep(1.0)  # call records and logs are flushed in batches
    with gw.http() as h:
        async_rec = h.get(f"/v1/calls/{handle.id}").content
    held = gateway_holdings(gw)
    held["api:call"] = async_rec
    assert any(control.encode() in v for v in held.values()), "the scan must see what the gateway does hold"
    assert "forwarded.bin" in held and b"CSQ\x02" in held["forwarded.bin"] and b"CSR\x02" in held["forwarded.bin"]
    assert "gateway.log" in held and "cocoon.db" in held
    for secret in (MARKER, ANSWER, MARKER.upper(), MARKER[::-1]):
        leaks = [k for k, v in held.items() if secret.encode() in v]
        assert not leaks, f"{secret!r} found in {leaks}"
    c.close()


def _files_holding(needle: bytes, roots: list[Path]) -> list[str]:
    """Every readable regular file under `roots` (up to 64 MiB each) that contains `needle`."""
    found = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_size > 64 * 2**20:
                        continue
                    if needle in p.read_bytes():
                        found.append(str(p))
                except OSError:
                    continue
    return found


def test_output_printed_during_a_sealed_call_is_on_no_disk_of_the_node(gw):
    """`shout` prints its input. Sealed, that output must land nowhere: not in Ray's session directory (worker
    logs) and not in any file under the node's temp dirs (the sandbox's own /tmp is a tmpfs)."""
    import tempfile

    c = client(gw)
    secret = "printed-marker-" + os.urandom(6).hex()
    assert c.call_confidential("shout", {"text": secret}, policy=policy(gw, "shout"))["n"] == len(secret)
    control = "printed-control-" + os.urandom(6).hex()
    assert c.call("shout", {"text": control})["n"] == len(control)  # plain: its output goes to `cocoon logs`
    c.close()
    time.sleep(1.5)  # logs are flushed in batches; Ray's log files are written as output arrives
    roots = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/dev/shm")]
    roots = [r for r in roots if r.is_dir()]
    assert _files_holding(control.encode(), roots), "the scan must find output the platform does keep"
    assert _files_holding(secret.encode(), roots) == []


def test_flipped_byte_is_refused(gw):
    c = client(gw)
    replicas = verified_replicas(c.transport, "shout", policy(gw, "shout"), refresh=True)
    body, _ = seal_request(json.dumps({"text": MARKER}).encode(), "shout", replicas)
    bad = bytearray(body)
    bad[-3] ^= 1
    r = httpx.post(f"{gw.url}/fn/shout", content=bytes(bad), headers={**gw.headers(),
                                                                        "Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 400 and r.json()["error"]["check"] == "decrypt", r.text
    r = httpx.post(f"{gw.url}/fn/shout", content=b"CSQ\x02junk", headers={**gw.headers(),
                                                                        "Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 400 and r.json()["error"]["check"] == "envelope"
    c.close()


def test_replay_is_refused(gw):
    c = client(gw)
    replicas = verified_replicas(c.transport, "shout", policy(gw, "shout"), refresh=True)
    body, ctx = seal_request(json.dumps({"text": "once"}).encode(), "shout", replicas)
    h = {**gw.headers(), "Content-Type": "application/cocoon-sealed+json"}  # the alternative name is accepted
    first = httpx.post(f"{gw.url}/fn/shout", content=bytes(body), headers=h)
    assert first.status_code == 200 and first.headers["X-Cocoon-Sealed-Kind"] == "res"
    result, receipt = ctx.open_response(first.content)
    assert json.loads(result) == {"shout": "ECNO", "n": 4}
    assert float(first.headers["X-Cocoon-Exec-Ms"]) == pytest.approx(receipt.exec_ms)  # metered from the receipt
    again = httpx.post(f"{gw.url}/fn/shout", content=bytes(body), headers=h)
    assert again.status_code == 409 and again.json()["error"]["check"] == "replay"
    with pytest.raises(EnvelopeError) as e:  # the gateway replaying the old answer into the same context
        ctx.open_response(first.content)
    assert e.value.check == "order"
    c.close()


def test_response_from_another_replica_is_refused(gw):
    c = client(gw)
    a, b = sorted(verified_replicas(c.transport, "pair", policy(gw, "pair"), refresh=True), key=lambda r: r.key_id)
    body, ctx = seal_request(b"{\"x\": 21}", "pair", [a])
    r = httpx.post(f"{gw.url}/fn/pair", content=bytes(body), headers={**gw.headers(),
                                                                 "Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 200
    forged = dataclasses.replace(ctx, replicas={b.key_id: b})  # the call as if sealed to the other replica only
    with pytest.raises(EnvelopeError) as e:
        forged.open_response(r.content)
    assert e.value.check == "replica"
    assert json.loads(ctx.open_response(r.content)[0]) == 42
    c.close()


def test_stale_keys_421_and_transparent_retry(gw, tmp_path):
    c = client(gw)
    pol = policy(gw, "shout")
    live = verified_replicas(c.transport, "shout", pol, refresh=True)
    gone = ReplicaIdentity.create("shout", live[0].measurement, "x", evidence="dev", home=gw.home)
    stale = verify_document(gone.document, pol)
    body, _ = seal_request(b"{\"text\": \"x\"}", "shout", [stale])
    r = httpx.post(f"{gw.url}/fn/shout", content=bytes(body), headers={**gw.headers(), "Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 421 and r.json()["error"]["type"] == "stale_keys"
    from cocoon_faas import confidential_client as cc

    key = cc._policy_key("shout", pol)
    cc._cache[c.transport][key] = (time.time() + 600, [stale])  # the client still believes in the gone replica
    assert c.call_confidential("shout", {"text": "retry"}, policy=pol)["shout"] == "YRTER"
    assert [r.key_id for r in cc._cache[c.transport][key][1]] == [live[0].key_id]
    c.close()


def test_wrong_measurement_is_refused_before_sending(gw):
    c = client(gw)
    with pytest.raises(CheckFailed) as e:
        c.call_confidential("shout", {"text": MARKER}, measurement="00" * 32, allow_dev_attestation=sorted(
            policy(gw, "shout").trusted_dev_keys))
    assert e.value.check == "measurement"
    c.close()


def test_mistyped_sealed_arguments_are_refused_on_the_callers_device(gw):
    """The gateway cannot read sealed arguments to check them, so the client checks them against the signature
    listed beside the documents: a typo is never sealed, forwarded or charged, and the error names the fix."""
    from cocoon_faas.errors import InvalidRequestError

    capture = gw.home / "forwarded.bin"
    before = capture.stat().st_size if capture.exists() else 0
    c = client(gw)
    with pytest.raises(InvalidRequestError) as e:
        c.call_confidential("shout", {"txt": MARKER}, policy=policy(gw, "shout"))
    assert e.value.status == 400 and "'txt'" in e.value.message and "did you mean 'text'" in e.value.message
    with pytest.raises(InvalidRequestError, match="must be a string, got integer"):
        list(c.stream_confidential("spell", {"text": 5}, policy=policy(gw, "spell")))
    with pytest.raises(InvalidRequestError, match="missing required argument 'x'"):
        c.call_confidential("pair", {}, policy=policy(gw, "pair"))
    assert (capture.stat().st_size if capture.exists() else 0) == before  # nothing reached a replica
    assert c.call_confidential("shout", {"text": "ok"}, policy=policy(gw, "shout"))["shout"] == "KO"
    c.close()


def test_cli_confidential_call(gw):
    out = gw.cli("call", "shout", '{"text": "cli"}', "--confidential", "--allow-dev-attestation")
    assert json.loads(out.stdout) == {"shout": "ILC", "n": 3} and "NOT SECURE" in out.stderr
    bad = gw.cli("call", "shout", '{"text": "cli"}', "--confidential", check=False)
    assert bad.returncode == 1 and "--allow-dev-attestation" in bad.stderr and "NOT SECURE" in bad.stderr
    items = gw.cli("call", "spell", '{"text": "ab"}', "--confidential", "--allow-dev-attestation", "--stream")
    assert [json.loads(x)["c"] for x in items.stdout.splitlines()] == ["B", "A"]


def test_confidential_deploy_stores_only_ciphertext(gw):
    out = gw.cli("deploy", str(ROOT / "tests" / "apps" / "sealed_code.py"), "--confidential",
                 "--allow-dev-attestation")
    assert "vault" in out.stdout
    code_keys = list((gw.home / "code_keys").glob("vault-*.key"))
    assert len(code_keys) == 1 and code_keys[0].stat().st_mode & 0o777 == 0o600
    c = client(gw)
    with gw.http() as h:
        att = h.get("/v1/functions/vault/attestation").json()
    assert att["confidential"] and len(att["documents"]) == 2
    assert not any(r["code_locked"] for r in att["replicas"])
    assert c.call_confidential("vault", {"x": 41}, policy=policy(gw, "vault")) == {"x": 42, "tag": "code-marker"}
    with gw.http() as h:
        plain = h.post("/fn/vault", json={"x": 1})
    assert plain.status_code == 400 and "confidential" in plain.json()["error"]["message"]
    marker = b"code-marker-5c1e0b7f2d9a4e63"
    for name in ("cocoon.db", "cocoon.db-wal", "gateway.log"):
        p = gw.home / name
        assert not p.exists() or marker not in p.read_bytes(), name
    c.close()


def test_replacement_replica_gets_the_code_key_from_a_peer(gw):
    """The developer is offline: a replica replacing a dead one is unlocked by a peer (same sealed policy)."""
    c = client(gw)
    pol = policy(gw, "vault")
    a, b = verified_replicas(c.transport, "vault", pol, refresh=True)
    body, _ = seal_request(b"{\"x\": -1}", "vault", [a])
    r = httpx.post(f"{gw.url}/fn/vault", content=bytes(body), headers={**gw.headers(), "Content-Type": SEALED_CONTENT_TYPE},
                   timeout=60)
    assert r.status_code in (421, 502), r.text  # its replica died; no other replica holds that key
    deadline = time.monotonic() + 90
    att: dict = {}
    while time.monotonic() < deadline:
        with gw.http() as h:
            att = h.get("/v1/functions/vault/attestation").json()
        kids = {d["key_id"] for d in att["documents"]}
        if len(kids) == 2 and a.key_id not in kids and not any(x["code_locked"] for x in att["replicas"]):
            break
        time.sleep(0.5)
    new = [d for d in att["documents"] if d["key_id"] not in (a.key_id, b.key_id)]
    assert len(new) == 1 and not any(x["code_locked"] for x in att["replicas"]), att["replicas"]
    fresh = verify_document(new[0], pol)
    body, ctx = seal_request(b"{\"x\": 1}", "vault", [fresh])
    r = httpx.post(f"{gw.url}/fn/vault", content=bytes(body), headers={**gw.headers(), "Content-Type": SEALED_CONTENT_TYPE})
    assert r.status_code == 200 and json.loads(ctx.open_response(r.content)[0])["x"] == 2
    c.close()


def test_grant_to_unknown_replica_and_bad_policy(gw):
    with gw.http() as h:
        r = h.post("/v1/functions/vault/grants", json={"grants": {"00" * 16: base64.b64encode(b"x").decode()}})
    assert r.status_code == 200 and "00" * 16 in r.json()["failed"]
    with pytest.raises(AttestationError):
        build_policy(Path(gw.home) / "nowhere", gw.url, "shout")
