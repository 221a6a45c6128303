"""Collateral checks (CRLs, TCB info, QE identity, TCB status) on the dcap-qvl v4 sample, cross-checked."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cocoon_faas.confidential.collateral import Collateral
from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.tdx import verify_quote

TDX = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tdx"
AT = datetime(2025, 6, 20, tzinfo=timezone.utc)

pytestmark = pytest.mark.skipif(not TDX.is_dir(), reason="shared TDX test vectors not present")


@pytest.fixture(scope="module")
def raw() -> bytes:
    return (TDX / "dcapqvl_v4.bin").read_bytes()


@pytest.fixture(scope="module")
def col_json() -> dict:
    return json.loads((TDX / "dcapqvl_v4_collateral.json").read_text())


def _fails(raw, col, check, at=AT, **kw):
    with pytest.raises(CheckFailed) as ei:
        verify_quote(raw, at=at, collateral=col, **kw)
    assert ei.value.check == check, ei.value.message
    return ei.value


def test_collateral_passes_up_to_date(raw, col_json):
    v = verify_quote(raw, at=AT, collateral=Collateral.from_json(col_json))
    assert v.tcb is not None
    assert v.tcb.status == "UpToDate" and v.tcb.fmspc == "b0c06f000000"
    assert (v.tcb.platform_status, v.tcb.module_status, v.tcb.qe_status) == ("UpToDate",) * 3
    assert v.to_dict()["tcb_status"] == "UpToDate"


def test_status_agrees_with_dcap_qvl(raw, col_json):
    dcap_qvl = pytest.importorskip("dcap_qvl", reason="dcap-qvl not installed (cross-check only)")
    theirs = dcap_qvl.verify(raw, dcap_qvl.QuoteCollateralV3.from_json(json.dumps(col_json)), int(AT.timestamp()))
    mine = verify_quote(raw, at=AT, collateral=Collateral.from_json(col_json))
    assert mine.tcb is not None and theirs.status == mine.tcb.status
    assert list(theirs.advisory_ids) == list(mine.tcb.advisory_ids)


def test_expired_collateral(raw, col_json):
    err = _fails(raw, Collateral.from_json(col_json), "crl", at=datetime(2025, 8, 1, tzinfo=timezone.utc))
    assert "expired" in err.message


def test_tampered_tcb_info_and_qe_identity(raw, col_json):
    col = Collateral.from_json(col_json)
    _fails(raw, replace(col, tcb_info=col.tcb_info.replace('"pcesvn":11', '"pcesvn":10')), "tcb_info")
    _fails(raw, replace(col, qe_identity=col.qe_identity.replace('"isvsvn":4', '"isvsvn":3')), "qe_identity")
    sig = bytearray(col.tcb_info_signature)
    sig[3] ^= 1
    _fails(raw, replace(col, tcb_info_signature=bytes(sig)), "tcb_info")


def test_swapped_crls_fail(raw, col_json):
    col = Collateral.from_json(col_json)
    _fails(raw, replace(col, pck_crl=col.root_ca_crl), "crl")
    _fails(raw, replace(col, root_ca_crl=col.pck_crl), "crl")


def test_collateral_for_another_platform(raw, col_json):
    # trustee_v4 has FMSPC 50806f000000: the b0c06f collateral must be refused for it
    other = (TDX / "trustee_v4.bin").read_bytes()
    err = _fails(other, Collateral.from_json(col_json), "tcb_info")
    assert "FMSPC" in err.message


def test_outdated_status_is_refused_unless_accepted(raw, col_json):
    col = Collateral.from_json(col_json)
    _fails(raw, col, "tcb_status", accept_tcb={"OutOfDate"})


def test_malformed_collateral(col_json):
    bad = dict(col_json)
    del bad["tcb_info"]
    with pytest.raises(CheckFailed) as ei:
        Collateral.from_json(bad)
    assert ei.value.check == "collateral"
