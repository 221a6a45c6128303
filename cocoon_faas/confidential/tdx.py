"""TDX quote verification to a pinned Intel root, then a relying-party policy (spec: specs/attestation.md §7).

`verify_quote` runs the checks in the spec's order, each raising `CheckFailed(check=...)`:
`header` → `pck_chain` → `qe_report_signature` → `qe_binding` → `quote_signature` → with collateral `crl_chain`,
`crl`, `revoked`, `tcb_info`, `qe_identity`, `tcb_status`. `check_policy` then applies `debug`, `mrtd`,
`rtmr0..3` and `report_data`. Time is an argument: evidence and collateral expire, and tests pin a date.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cocoon_faas.confidential.collateral import Collateral, TcbResult, check_revocation, evaluate_tcb
from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.pck import parse_pck_extension
from cocoon_faas.confidential.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    INTEL_QE_VENDOR_ID,
    TdxQuote,
    parse_quote,
)
from cocoon_faas.confidential.roots import intel_sgx_root_ca
from cocoon_faas.confidential.x509chain import fingerprint, load_pem_chain, verify_chain

DEFAULT_ACCEPTED_TCB = frozenset({"UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                                  "ConfigurationAndSWHardeningNeeded"})


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote whose signatures verified to `root_sha256`; `tcb` is set when collateral was checked."""

    quote: TdxQuote
    root_sha256: str
    tcb: TcbResult | None = None

    def to_dict(self) -> dict[str, Any]:
        q = self.quote
        out: dict[str, Any] = {"version": q.header.version, "body_type": q.body_type,
                               "tee_type": q.header.tee_type, "qe_vendor_id": q.header.qe_vendor_id.hex(),
                               "user_data": q.header.user_data.hex(), **q.report.to_dict(),
                               "qe_isv_svn": q.qe_report.isv_svn, "root_sha256": self.root_sha256}
        out["tcb_status"] = self.tcb.status if self.tcb else None
        if self.tcb:
            out["tcb"] = self.tcb.to_dict()
        return out


def _p256_verify(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes, check: str, what: str) -> None:
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CheckFailed(check, f"{what} does not verify; the quote was altered or is not genuine") from None


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(timezone.utc)
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def verify_quote(quote: bytes | TdxQuote, *, at: datetime | None = None, root: x509.Certificate | None = None,
                 collateral: Collateral | None = None,
                 accept_tcb: Iterable[str] = DEFAULT_ACCEPTED_TCB) -> VerifiedQuote:
    """Verify a TDX quote's signatures (and, with collateral, revocation and TCB) at time `at` (default now)."""
    q = quote if isinstance(quote, TdxQuote) else parse_quote(quote)
    at = _utc(at)
    root = root or intel_sgx_root_ca()
    h = q.header
    if h.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise CheckFailed("header", f"attestation key type {h.att_key_type} is not ECDSA-P256 (2)")
    if h.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise CheckFailed("header", f"QE vendor id {h.qe_vendor_id.hex()} is not Intel's")
    try:
        chain = load_pem_chain(q.pck_chain_pem)
    except ValueError as exc:
        raise CheckFailed("pck_chain", f"the PCK chain does not parse ({exc})") from None
    leaf = verify_chain(chain, root, at, "pck_chain")
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
        raise CheckFailed("pck_chain", "the PCK leaf does not hold an EC key")
    _p256_verify(leaf_key, q.qe_report_signature, q.qe_report.raw, "qe_report_signature", "QE report signature")
    binding = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    if q.qe_report.report_data != binding + bytes(32):
        raise CheckFailed("qe_binding", "the QE report does not bind the attestation key "
                          "(REPORTDATA != SHA-256(attestation_key || qe_auth_data) || zeros)")
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
    except ValueError:
        raise CheckFailed("quote_signature", "the attestation key is not a P-256 point") from None
    _p256_verify(att_key, q.signature, q.signed, "quote_signature", "quote signature")
    tcb = None
    if collateral is not None:
        check_revocation(collateral, chain, root, at)
        tcb = evaluate_tcb(collateral, parse_pck_extension(leaf), q.report, q.qe_report, root, at)
        if tcb.status not in set(accept_tcb):
            raise CheckFailed("tcb_status", f"TCB status is {tcb.status} (platform {tcb.platform_status}, "
                              f"module {tcb.module_status}, QE {tcb.qe_status}); update the platform or "
                              "accept this status explicitly", tcb_status=tcb.status)
    return VerifiedQuote(q, fingerprint(root), tcb)


def _hexset(values: Iterable[str | bytes] | None) -> frozenset[bytes] | None:
    if values is None:
        return None
    return frozenset(bytes.fromhex(v) if isinstance(v, str) else bytes(v) for v in values)


@dataclass(frozen=True)
class TdxPolicy:
    """What a relying party accepts: `None` allow-lists accept anything; debug TDs are refused unless allowed."""

    allow_debug: bool = False
    mrtd: frozenset[bytes] | None = None
    rtmr: tuple[frozenset[bytes] | None, ...] = field(default=(None, None, None, None))
    require_collateral: bool = False

    @classmethod
    def build(cls, *, mrtd: Iterable[str | bytes] | None = None,
              rtmr: dict[int, Iterable[str | bytes]] | None = None, allow_debug: bool = False,
              require_collateral: bool = False) -> TdxPolicy:
        r = rtmr or {}
        return cls(allow_debug, _hexset(mrtd), tuple(_hexset(r.get(i)) for i in range(4)), require_collateral)


def check_policy(v: VerifiedQuote, policy: TdxPolicy, report_data: bytes | None = None) -> None:
    """Apply the relying-party policy; `report_data` is the binding the client recomputed (64 bytes)."""
    rep = v.quote.report
    if rep.debug and not policy.allow_debug:
        raise CheckFailed("debug", "the TD runs in DEBUG mode (TDATTRIBUTES bit 0): its memory is readable by "
                          "the host; refuse it")
    if policy.require_collateral and v.tcb is None:
        raise CheckFailed("tcb_status", "policy requires collateral (TCB status) and none was checked")
    if policy.mrtd is not None and rep.mr_td not in policy.mrtd:
        raise CheckFailed("mrtd", f"MRTD {rep.mr_td.hex()[:24]}... is not in the allow-list")
    for i, allowed in enumerate(policy.rtmr):
        if allowed is not None and rep.rtmr[i] not in allowed:
            raise CheckFailed(f"rtmr{i}", f"RTMR{i} {rep.rtmr[i].hex()[:24]}... is not in the allow-list")
    if report_data is not None and rep.report_data != report_data:
        raise CheckFailed("report_data", "REPORTDATA does not equal the binding of the presented document: the "
                          "quote belongs to other keys")
