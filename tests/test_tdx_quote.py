"""TDX quote parsing and verification against the real quotes in ../shared/testdata/tdx."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cocoon_faas.confidential.errors import CheckFailed, QuoteFormatError
from cocoon_faas.confidential.pck import parse_pck_extension
from cocoon_faas.confidential.quote import parse_quote
from cocoon_faas.confidential.roots import INTEL_SGX_ROOT_CA_SHA256, intel_sgx_root_ca, nvidia_device_root
from cocoon_faas.confidential.tdx import TdxPolicy, check_policy, verify_quote
from cocoon_faas.confidential.x509chain import fingerprint, load_cert, load_pem_chain, verify_chain
from cocoon_faas.errors import AttestationError

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
TDX = TESTDATA / "tdx"
QUOTES = ["dcapqvl_v4.bin", "trustee_v4.bin", "trustee_v5.bin", "gotdx_v5.bin", "gotdx_spr_v4_trailer.bin"]
AT = datetime(2026, 6, 1, tzinfo=timezone.utc)  # inside every PCK chain's validity window

pytestmark = pytest.mark.skipif(not TDX.is_dir(), reason="shared TDX test vectors not present")


def _quote(name: str) -> bytes:
    return (TDX / name).read_bytes()


def _flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def _fails(raw: bytes, check: str, **kw: object) -> CheckFailed:
    with pytest.raises(CheckFailed) as ei:
        verify_quote(raw, at=kw.pop("at", AT), **kw)  # type: ignore[arg-type]
    assert ei.value.check == check, ei.value.message
    assert isinstance(ei.value, AttestationError)
    assert ei.value.to_dict()["error"]["check"] == check
    return ei.value


def _body_offset(raw: bytes) -> int:
    return 48 if struct.unpack_from("<H", raw, 0)[0] == 4 else 54


def test_pinned_root_matches_testdata_and_spec():
    root = intel_sgx_root_ca()
    assert fingerprint(root) == INTEL_SGX_ROOT_CA_SHA256
    assert fingerprint(load_cert(TDX / "intel_sgx_root_ca.der")) == INTEL_SGX_ROOT_CA_SHA256


@pytest.mark.parametrize("name", QUOTES)
def test_every_quote_parses_and_verifies(name):
    raw = _quote(name)
    v = verify_quote(raw, at=AT)
    q = v.quote
    assert q.header.version == (5 if "v5" in name else 4)
    assert q.header.tee_type == 0x81
    assert len(q.report.report_data) == 64 and all(len(r) == 48 for r in q.report.rtmr)
    if q.header.version == 5:
        assert q.body_type == 3 and q.report.mr_service_td is not None
    assert v.root_sha256 == INTEL_SGX_ROOT_CA_SHA256


def test_trailer_is_tolerated_and_not_signed():
    raw = _quote("gotdx_spr_v4_trailer.bin")
    q = parse_quote(raw)
    assert q.length < len(raw) and raw[q.length:].strip().startswith(b"extra bytes")
    verify_quote(raw + b"more junk", at=AT)
    verify_quote(raw[:q.length], at=AT)


def test_trustee_v4_matches_expected_claims_field_by_field():
    claims = json.loads((TDX / "trustee_v4_expected_claims.json").read_text())
    q = verify_quote(_quote("trustee_v4.bin"), at=AT).quote
    hdr, body, r = claims["quote"]["header"], claims["quote"]["body"], q.report
    assert struct.pack("<H", q.header.version).hex() == hdr["version"]
    assert struct.pack("<H", q.header.att_key_type).hex() == hdr["att_key_type"]
    assert struct.pack("<I", q.header.tee_type).hex() == hdr["tee_type"]
    assert q.header.reserved.hex() == hdr["reserved"]
    assert q.header.qe_vendor_id.hex() == hdr["vendor_id"]
    assert q.header.user_data.hex() == hdr["user_data"]
    mine = {"mr_config_id": r.mr_config_id, "mr_owner": r.mr_owner, "mr_owner_config": r.mr_owner_config,
            "mr_seam": r.mr_seam, "mr_td": r.mr_td, "mrsigner_seam": r.mr_signer_seam,
            "report_data": r.report_data, "rtmr_0": r.rtmr[0], "rtmr_1": r.rtmr[1], "rtmr_2": r.rtmr[2],
            "rtmr_3": r.rtmr[3], "seam_attributes": r.seam_attributes, "tcb_svn": r.tee_tcb_svn,
            "td_attributes": r.td_attributes, "xfam": r.xfam}
    assert set(mine) == set(body)
    for key, value in body.items():
        assert mine[key].hex() == value, key
    assert r.report_data.hex() == claims["report_data"]
    assert r.debug is claims["td_attributes"]["debug"] is True
    assert r.septve_disable is claims["td_attributes"]["septve_disable"]


@pytest.mark.parametrize("name", QUOTES)
def test_parse_matches_dcap_qvl(name):
    dcap_qvl = pytest.importorskip("dcap_qvl", reason="dcap-qvl not installed (cross-check only)")
    raw = _quote(name)
    theirs = dcap_qvl.parse_quote(raw)
    q = parse_quote(raw)
    assert theirs.header.version == q.header.version
    assert bytes(theirs.header.user_data) == q.header.user_data
    tr, r = theirs.report, q.report
    pairs = [("mr_td", r.mr_td), ("mr_seam", r.mr_seam), ("mr_signer_seam", r.mr_signer_seam),
             ("mr_config_id", r.mr_config_id), ("mr_owner", r.mr_owner), ("mr_owner_config", r.mr_owner_config),
             ("report_data", r.report_data), ("rt_mr0", r.rtmr[0]), ("rt_mr1", r.rtmr[1]),
             ("rt_mr2", r.rtmr[2]), ("rt_mr3", r.rtmr[3]), ("td_attributes", r.td_attributes),
             ("seam_attributes", r.seam_attributes), ("xfam", r.xfam), ("tee_tcb_svn", r.tee_tcb_svn)]
    if q.report.mr_service_td is not None:
        pairs += [("mr_service_td", r.mr_service_td), ("tee_tcb_svn2", r.tee_tcb_svn2)]
    for attr, mine in pairs:
        assert bytes(getattr(tr, attr)) == mine, attr
    assert bytes.fromhex(theirs.fmspc()) == parse_pck_extension(
        verify_chain(load_pem_chain(q.pck_chain_pem), intel_sgx_root_ca(), AT, "pck_chain")).fmspc


def test_bit_flip_in_report_data_fails_quote_signature():
    raw = _quote("trustee_v5.bin")
    _fails(_flip(raw, _body_offset(raw) + 520 + 7, 3), "quote_signature")


def test_bit_flip_in_mrtd_fails_quote_signature():
    raw = _quote("dcapqvl_v4.bin")
    _fails(_flip(raw, _body_offset(raw) + 136), "quote_signature")


@pytest.mark.parametrize("name", ["dcapqvl_v4.bin", "gotdx_v5.bin"])
def test_bit_flip_in_qe_report_fails_qe_report_signature(name):
    raw = _quote(name)
    q = parse_quote(raw)
    qe_off = len(q.signed) + 4 + 64 + 64 + 2 + 4
    assert raw[qe_off:qe_off + 384] == q.qe_report.raw
    _fails(_flip(raw, qe_off + 64), "qe_report_signature")      # MRENCLAVE
    _fails(_flip(raw, qe_off + 384 + 5), "qe_report_signature")  # the signature itself


def test_bit_flip_in_signature_and_key():
    raw = _quote("trustee_v4.bin")
    sig_off = len(parse_quote(raw).signed) + 4
    _fails(_flip(raw, sig_off + 10), "quote_signature")
    _fails(_flip(raw, sig_off + 64 + 10), "qe_binding")  # attestation key no longer what the QE bound


def _fake_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    real = intel_sgx_root_ca()
    now = datetime(2020, 1, 1, tzinfo=timezone.utc)
    return (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.subject)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + timedelta(days=36500))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def test_wrong_root_fails_pck_chain():
    raw = _quote("dcapqvl_v4.bin")
    _fails(raw, "pck_chain", root=_fake_root())
    _fails(raw, "pck_chain", root=nvidia_device_root())
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not intel")])
    assert _fake_root().subject != other


def test_expired_and_not_yet_valid_chain_fail_pck_chain():
    raw = _quote("trustee_v4.bin")
    err = _fails(raw, "pck_chain", at=datetime(2050, 1, 1, tzinfo=timezone.utc))
    assert "not valid at" in err.message
    _fails(raw, "pck_chain", at=datetime(2020, 1, 1, tzinfo=timezone.utc))
    # gotdx_v5's leaf was issued in 2026: before that it must not verify
    _fails(_quote("gotdx_v5.bin"), "pck_chain", at=datetime(2025, 6, 1, tzinfo=timezone.utc))


def test_malformed_quotes_name_the_problem():
    raw = _quote("dcapqvl_v4.bin")
    with pytest.raises(QuoteFormatError) as ei:
        parse_quote(raw[:700])
    assert ei.value.check == "structure" and "truncated" in ei.value.message
    with pytest.raises(QuoteFormatError) as ei:
        parse_quote(struct.pack("<H", 3) + raw[2:])
    assert ei.value.check == "header"
    with pytest.raises(QuoteFormatError) as ei:
        parse_quote(raw[:4] + struct.pack("<I", 0) + raw[8:])
    assert ei.value.check == "header"
    _fails(raw[:12] + bytes(16) + raw[28:], "header")  # QE vendor id not Intel's


def test_policy_refuses_debug_and_enforces_allow_lists():
    v = verify_quote(_quote("trustee_v4.bin"), at=AT)
    with pytest.raises(CheckFailed) as ei:
        check_policy(v, TdxPolicy())
    assert ei.value.check == "debug"
    check_policy(v, TdxPolicy(allow_debug=True))
    good = verify_quote(_quote("trustee_v5.bin"), at=AT)
    r = good.quote.report
    check_policy(good, TdxPolicy.build(mrtd=[r.mr_td.hex()], rtmr={1: [r.rtmr[1]]}), r.report_data)
    for policy, rd, check in [
        (TdxPolicy.build(mrtd=["00" * 48]), None, "mrtd"),
        (TdxPolicy.build(rtmr={2: ["11" * 48]}), None, "rtmr2"),
        (TdxPolicy(), _flip(r.report_data, 0), "report_data"),
        (TdxPolicy(require_collateral=True), None, "tcb_status"),
    ]:
        with pytest.raises(CheckFailed) as ei:
            check_policy(good, policy, rd)
        assert ei.value.check == check
