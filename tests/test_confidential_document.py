"""Attestation documents: dev and TDX evidence, the client policy, and each refusal naming its check."""

from __future__ import annotations

import base64
import copy
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cocoon_faas.confidential.document import (
    INSECURE_WARNING,
    ClientPolicy,
    dev_public_key_hex,
    document_binding,
    load_or_create_dev_key,
    split_document,
    verify_document,
)
from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.replica import ReplicaIdentity, tsm_quote

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
M = "ab" * 32
NOW = 1_780_000_000


@pytest.fixture()
def dev_key():
    return Ed25519PrivateKey.generate()


def _policy(dev_key, **kw):
    return ClientPolicy.build([M], allow_dev_keys=[dev_public_key_hex(dev_key)], **kw)


def _fails(doc, policy, check, now=NOW + 1):
    with pytest.raises(CheckFailed) as ei:
        verify_document(doc, policy, now)
    assert ei.value.check == check, ei.value.message
    return ei.value


def test_dev_document_round_trip_and_binding(dev_key):
    rep = ReplicaIdentity.create("embed", M, "0.1.0", ttl_s=600, dev_key=dev_key, now=NOW)
    doc = rep.document
    assert doc["evidence"]["warning"] == INSECURE_WARNING and "NOT SECURE" in INSECURE_WARNING
    body, ev = split_document(rep.document_json)
    dev_key.public_key().verify(bytes.fromhex(ev["signature"]), document_binding(body))
    v = verify_document(rep.document_json, _policy(dev_key), NOW + 1)
    assert v.insecure and v.tee == "dev" and v.key_id == rep.key_id and v.measurement == M
    assert v.hpke_public_key == rep.hpke_public_key and v.receipt_public_key == rep.receipt_public_key


def test_dev_key_must_be_trusted_explicitly(dev_key):
    rep = ReplicaIdentity.create("embed", M, "0.1.0", dev_key=dev_key, now=NOW)
    err = _fails(rep.document, ClientPolicy.build([M], tee_kinds={"tdx", "dev"}), "dev_key_untrusted")
    assert "NOT SECURE" in err.message
    _fails(rep.document, ClientPolicy.build([M]), "tee_kind")  # default: TDX only
    other = Ed25519PrivateKey.generate()
    _fails(rep.document, _policy(other), "dev_key_untrusted")


def test_each_field_is_bound(dev_key):
    rep = ReplicaIdentity.create("embed", M, "0.1.0", dev_key=dev_key, now=NOW)
    policy = ClientPolicy.build(None, allow_dev_keys=[dev_public_key_hex(dev_key)])
    for field, value in [("runtime_version", "9"), ("expires_at", NOW + 10**6), ("measurement", "cd" * 32)]:
        doc = copy.deepcopy(rep.document)
        doc[field] = value
        _fails(doc, policy, "dev_signature")
    doc = copy.deepcopy(rep.document)
    doc["hpke_public_key"] = "11" * 32
    _fails(doc, policy, "key_id")


def test_policy_checks(dev_key):
    rep = ReplicaIdentity.create("embed", M, "0.1.0", ttl_s=60, dev_key=dev_key, now=NOW)
    _fails(rep.document, _policy(dev_key), "expired", now=NOW + 61)
    _fails(rep.document, ClientPolicy.build(["00" * 32], allow_dev_keys=[dev_public_key_hex(dev_key)]),
           "measurement")
    _fails(rep.document, _policy(dev_key, function="other"), "function")
    _fails(b"not json", _policy(dev_key), "document")
    _fails({"v": 1}, _policy(dev_key), "document")


def test_dev_key_file_is_created_private_and_reused(tmp_path):
    k1 = load_or_create_dev_key(tmp_path)
    assert (tmp_path / "dev_attestation_key").stat().st_mode & 0o777 == 0o600
    assert dev_public_key_hex(load_or_create_dev_key(tmp_path)) == dev_public_key_hex(k1)
    rep = ReplicaIdentity.create("f", M, "1", home=tmp_path, now=NOW)
    assert rep.document["evidence"]["dev_public_key"] == dev_public_key_hex(k1)


def _fake_tsm(tmp_path: Path, quote: bytes) -> Path:
    base = tmp_path / "tsm" / "report"
    entry = base / "e1"
    entry.mkdir(parents=True)
    (entry / "outblob").write_bytes(quote)
    (entry / "provider").write_text("tdx_guest\n")
    return base


@pytest.mark.skipif(not (TESTDATA / "tdx").is_dir(), reason="shared TDX vectors not present")
def test_tdx_evidence_through_configfs_tsm(tmp_path, monkeypatch):
    quote = (TESTDATA / "tdx" / "trustee_v5.bin").read_bytes()
    base = _fake_tsm(tmp_path, quote)
    assert tsm_quote(b"\x01" * 64, base, name="e1") == quote
    assert (base / "e1" / "inblob").read_bytes() == b"\x01" * 64
    monkeypatch.setattr("cocoon_faas.confidential.replica.os.urandom", lambda n: b"\x00" * n)
    monkeypatch.setattr("cocoon_faas.confidential.replica.os.getpid", lambda: 1)
    entry = base / "cocoon-1-00000000"
    entry.mkdir()
    (entry / "outblob").write_bytes(quote)
    rep = ReplicaIdentity.create("embed", M, "0.1.0", evidence="tdx", tsm_dir=base, now=NOW)
    assert base64.b64decode(rep.document["evidence"]["quote"]) == quote
    at = datetime(2026, 6, 1, tzinfo=timezone.utc).timestamp()
    rep.renew(600, now=at - 10)
    # A genuine quote, but its REPORTDATA binds other keys: refused for exactly that reason.
    _fails(rep.document, ClientPolicy.build([M]), "report_data", now=at)


def test_no_tee_here_is_a_clear_error(tmp_path):
    with pytest.raises(CheckFailed) as ei:
        ReplicaIdentity.create("f", M, "1", evidence="tdx", tsm_dir=tmp_path / "absent")
    assert ei.value.check == "tee_unavailable" and "evidence='dev'" in ei.value.message


@pytest.mark.skipif(not (TESTDATA / "nvidia").is_dir(), reason="shared NVIDIA vectors not present")
def test_gpu_evidence_hashed_into_the_document(dev_key):
    nv = TESTDATA / "nvidia"
    report = bytes.fromhex((nv / "hopperAttestationReport.txt").read_text().strip())
    chain = (nv / "hopper_cert_chain_case1.txt").read_bytes()
    rep = ReplicaIdentity.create("f", M, "1", dev_key=dev_key, now=NOW, gpu_evidence=(report, chain))
    verify_document(rep.document, _policy(dev_key, require_gpu=True), NOW + 1)
    bad = copy.deepcopy(rep.document)
    bad["evidence"]["nvidia"]["report"] = report[:-1].hex() + "00"
    _fails(bad, _policy(dev_key, require_gpu=True), "gpu_evidence")
    plain = ReplicaIdentity.create("f", M, "1", dev_key=dev_key, now=NOW)
    _fails(plain.document, _policy(dev_key, require_gpu=True), "gpu_evidence")
