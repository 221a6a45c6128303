"""`cocoon attest verify`: JSON output, exit codes, the failed check named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cocoon_faas.cli import main

TDX = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tdx"
pytestmark = pytest.mark.skipif(not TDX.is_dir(), reason="shared TDX test vectors not present")


def _run(*args: str):
    return CliRunner().invoke(main, ["attest", "verify", *args])


def test_verify_with_collateral_exits_zero():
    res = _run(str(TDX / "dcapqvl_v4.bin"), "--collateral", str(TDX / "dcapqvl_v4_collateral.json"),
               "--at", "2025-06-20T00:00:00Z")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verified"] is True and out["version"] == 4 and out["tcb_status"] == "UpToDate"
    for key in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data", "td_attributes"):
        assert key in out
    assert len(out["mrtd"]) == 96 and len(out["report_data"]) == 128


def test_verify_v5_without_collateral():
    res = _run(str(TDX / "trustee_v5.bin"), "--at", "2026-06-01T00:00:00+00:00", "--root",
               str(TDX / "intel_sgx_root_ca.der"))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 5 and out["tcb_status"] is None


def test_debug_td_fails_and_names_check():
    res = _run(str(TDX / "trustee_v4.bin"), "--at", "2026-06-01")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert out["verified"] is False and out["failed_check"] == "debug"
    assert "debug" in res.stderr
    assert _run(str(TDX / "trustee_v4.bin"), "--at", "2026-06-01", "--allow-debug").exit_code == 0


def test_tampered_quote_fails(tmp_path):
    raw = bytearray((TDX / "dcapqvl_v4.bin").read_bytes())
    raw[48 + 136] ^= 1
    p = tmp_path / "q.bin"
    p.write_bytes(bytes(raw))
    res = _run(str(p), "--at", "2026-06-01")
    assert res.exit_code == 1 and json.loads(res.stdout)["failed_check"] == "quote_signature"


def test_expired_and_bad_time():
    res = _run(str(TDX / "gotdx_v5.bin"), "--at", "2060-01-01")
    assert res.exit_code == 1 and json.loads(res.stdout)["failed_check"] == "pck_chain"
    assert _run(str(TDX / "gotdx_v5.bin"), "--at", "yesterday").exit_code == 2


def test_document_command_marks_dev_as_not_secure(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cocoon_faas.confidential.document import dev_public_key_hex
    from cocoon_faas.confidential.replica import ReplicaIdentity

    key = Ed25519PrivateKey.generate()
    rep = ReplicaIdentity.create("embed", "ab" * 32, "0.1", dev_key=key)
    p = tmp_path / "doc.json"
    p.write_bytes(rep.document_json)
    ok = CliRunner().invoke(main, ["attest", "document", str(p), "--allow-dev-key", dev_public_key_hex(key),
                                   "--measurement", "ab" * 32])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["secure"] is False and "NOT SECURE" in ok.stderr
    refused = CliRunner().invoke(main, ["attest", "document", str(p)])
    assert refused.exit_code == 1 and json.loads(refused.stdout)["failed_check"] == "tee_kind"
    assert "NOT SECURE" in refused.stderr
