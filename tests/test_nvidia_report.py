"""NVIDIA Hopper attestation report: parse against the published claims, signature and chain, tampering."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.nvidia import parse_gpu_report, verify_gpu_report
from cocoon_faas.confidential.roots import intel_sgx_root_ca
from cocoon_faas.confidential.x509chain import fingerprint, load_cert

NV = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "nvidia"
pytestmark = pytest.mark.skipif(not NV.is_dir(), reason="shared NVIDIA test vectors not present")
AT = datetime(2026, 6, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def report() -> bytes:
    return bytes.fromhex((NV / "hopperAttestationReport.txt").read_text().strip())


@pytest.fixture(scope="module")
def chain() -> bytes:
    return (NV / "hopper_cert_chain_case1.txt").read_bytes()


def test_embedded_root_is_the_testdata_root():
    from cocoon_faas.confidential.roots import nvidia_device_root

    assert fingerprint(nvidia_device_root()) == fingerprint(load_cert(NV / "nvidia_device_root.pem"))


def test_measurements_match_claims(report):
    claims = json.loads((NV / "hopperAttestationReport-claims.txt").read_text())
    rep = parse_gpu_report(report)
    assert {str(k): v.hex() for k, v in rep.measurements.items()} == claims["measurements"]
    config = rep.config()
    assert len(config) >= 10
    for key, value in config.items():
        assert claims["config"][key] == value, key


def test_report_verifies(report, chain):
    v = verify_gpu_report(report, chain, at=AT, root=load_cert(NV / "nvidia_device_root.pem"))
    assert "GH100" in v.leaf_subject
    verify_gpu_report(report, chain, at=AT, expected_nonce=report[4:36])


@pytest.mark.parametrize("offset", [10, 37 + 8 + 100, -200, -5])
def test_any_flipped_byte_fails(report, chain, offset):
    bad = bytearray(report)
    bad[offset] ^= 0x40
    with pytest.raises(CheckFailed) as ei:
        verify_gpu_report(bytes(bad), chain, at=AT)
    assert ei.value.check in ("gpu_signature", "gpu_structure")


def test_wrong_root_nonce_and_time(report, chain):
    with pytest.raises(CheckFailed) as ei:
        verify_gpu_report(report, chain, at=AT, root=intel_sgx_root_ca())
    assert ei.value.check == "gpu_chain"
    with pytest.raises(CheckFailed) as ei:
        verify_gpu_report(report, chain, at=AT, expected_nonce=bytes(32))
    assert ei.value.check == "gpu_nonce"
    with pytest.raises(CheckFailed) as ei:
        verify_gpu_report(report, chain, at=datetime(2019, 1, 1, tzinfo=timezone.utc))
    assert ei.value.check == "gpu_chain"
    with pytest.raises(CheckFailed) as ei:
        verify_gpu_report(report, chain.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n",
                          at=AT)
    assert ei.value.check == "gpu_chain"
