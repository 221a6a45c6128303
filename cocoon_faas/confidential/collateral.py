"""DCAP collateral for TDX: revocation lists, TCB info, QE identity, and the TCB status they give a quote.

Collateral comes in the JSON form dcap-qvl writes (keys `pck_crl_issuer_chain`, `root_ca_crl`, `pck_crl`,
`tcb_info_issuer_chain`, `tcb_info`, `tcb_info_signature`, `qe_identity_issuer_chain`, `qe_identity`,
`qe_identity_signature`; CRLs as hex DER, signatures as hex r‖s). It may come from an untrusted cache: every piece
is verified to the same pinned root before use. The TCB evaluation follows Intel's quote verification library:
TDX module identity (TEE_TCB_SVN[1] selects `TDX_NN`), the first platform level the PCK SVNs and TEE TCB SVNs
meet (TEE SVN indexes 0 and 1 skipped when a module version is set), the QE identity level, then the worst status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.pck import PckExtension
from cocoon_faas.confidential.quote import QeReport, TdReport
from cocoon_faas.confidential.x509chain import load_pem_chain, verify_chain

# Worst last; combined statuses merge flags (Intel's convergence of platform, module and QE statuses).
_RANK = ["UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded",
         "OutOfDate", "OutOfDateConfigurationNeeded", "Revoked"]


@dataclass(frozen=True)
class Collateral:
    """Verification collateral for one FMSPC, as raw strings so signatures cover the exact signed bytes."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Collateral:
        d = json.loads(data) if isinstance(data, (str, bytes)) else data
        try:
            return cls(
                d["pck_crl_issuer_chain"], _crl_bytes(d["root_ca_crl"]), _crl_bytes(d["pck_crl"]),
                d["tcb_info_issuer_chain"], d["tcb_info"], bytes.fromhex(d["tcb_info_signature"]),
                d["qe_identity_issuer_chain"], d["qe_identity"], bytes.fromhex(d["qe_identity_signature"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckFailed("collateral", f"collateral JSON is malformed ({exc!r}); pass the JSON that "
                              "dcap-qvl or a PCCS returns") from None


@dataclass(frozen=True)
class TcbResult:
    """The outcome of collateral checks: overall status and its parts."""

    status: str
    platform_status: str
    module_status: str
    qe_status: str
    advisory_ids: tuple[str, ...]
    fmspc: str

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "platform_status": self.platform_status,
                "module_status": self.module_status, "qe_status": self.qe_status,
                "advisory_ids": list(self.advisory_ids), "fmspc": self.fmspc}


def _crl_bytes(v: str) -> bytes:
    return v.encode() if v.lstrip().startswith("-----BEGIN") else bytes.fromhex(v)


def _load_crl(b: bytes) -> x509.CertificateRevocationList:
    if b.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(b)
    return x509.load_der_x509_crl(b)


def _verify_signed_json(body: str, sig: bytes, chain_pem: str, root: x509.Certificate, at: datetime,
                        check: str) -> dict[str, Any]:
    signer = verify_chain(load_pem_chain(chain_pem.encode()), root, at, check + "_chain")
    if len(sig) != 64:
        raise CheckFailed(check, f"signature must be 64 bytes r||s, got {len(sig)}")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub = signer.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CheckFailed(check, "the signing certificate does not hold an EC key")
    try:
        pub.verify(der, body.encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CheckFailed(check, "signature does not verify; the collateral was altered") from None
    doc = json.loads(body)
    if _parse_time(doc["nextUpdate"]) < at:
        raise CheckFailed(check, f"expired at {doc['nextUpdate']}; fetch fresh collateral or pass --at")
    if _parse_time(doc["issueDate"]) > at:
        raise CheckFailed(check, f"issued {doc['issueDate']}, after the evaluation time")
    return doc


def _parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def check_revocation(col: Collateral, pck_chain: list[x509.Certificate], root: x509.Certificate,
                     at: datetime) -> None:
    """Root CA CRL (signed by the root) and PCK CRL (signed by the PCK CA) are current and list no cert of ours."""
    pck_ca = verify_chain(load_pem_chain(col.pck_crl_issuer_chain.encode()), root, at, "crl_chain")
    for name, raw, issuer in (("root CA CRL", col.root_ca_crl, root), ("PCK CRL", col.pck_crl, pck_ca)):
        crl = _load_crl(raw)
        key = issuer.public_key()
        if crl.issuer != issuer.subject or not isinstance(key, ec.EllipticCurvePublicKey) \
                or not crl.is_signature_valid(key):
            raise CheckFailed("crl", f"the {name} is not signed by '{issuer.subject.rfc4514_string()}'")
        if crl.next_update_utc is not None and crl.next_update_utc < at:
            raise CheckFailed("crl", f"the {name} expired at {crl.next_update_utc.isoformat()}; fetch fresh "
                              "collateral")
        for cert in pck_chain:
            if cert.issuer == crl.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
                raise CheckFailed("revoked", f"certificate '{cert.subject.rfc4514_string()}' serial "
                                  f"{cert.serial_number:x} is revoked by the {name}")


def _worst(*statuses: str) -> str:
    flags = set()
    for s in statuses:
        if s not in _RANK:
            return s
        if s == "Revoked":
            return s
        if "OutOfDate" in s:
            flags.add("ood")
        if "Configuration" in s:
            flags.add("cfg")
        if "SWHardening" in s:
            flags.add("sw")
    if "ood" in flags:
        return "OutOfDateConfigurationNeeded" if "cfg" in flags else "OutOfDate"
    if "cfg" in flags:
        return "ConfigurationAndSWHardeningNeeded" if "sw" in flags else "ConfigurationNeeded"
    return "SWHardeningNeeded" if "sw" in flags else "UpToDate"


def _masked_eq(value: bytes, expected_hex: str, mask_hex: str) -> bool:
    exp, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    return len(value) == len(exp) == len(mask) and all((v & m) == e for v, m, e in zip(value, mask, exp, strict=True))


def _module_status(tcb: dict[str, Any], report: TdReport) -> str:
    isvsvn, version = report.tee_tcb_svn[0], report.tee_tcb_svn[1]
    if version == 0:
        ident, levels = tcb.get("tdxModule"), None
        ident_name = "tdxModule"
    else:
        ident_name = f"TDX_{version:02X}"
        ident = next((m for m in tcb.get("tdxModuleIdentities", []) if m["id"].upper() == ident_name), None)
        levels = ident["tcbLevels"] if ident else None
    if ident is None:
        raise CheckFailed("tcb_status", f"the TCB info names no TDX module identity {ident_name}")
    if bytes.fromhex(ident["mrsigner"]) != report.mr_signer_seam:
        raise CheckFailed("tcb_status", f"MRSIGNERSEAM does not match TDX module identity {ident_name}")
    if not _masked_eq(report.seam_attributes, ident["attributes"], ident["attributesMask"]):
        raise CheckFailed("tcb_status", f"SEAMATTRIBUTES do not match TDX module identity {ident_name}")
    if levels is None:
        return "UpToDate"
    for lvl in levels:
        if isvsvn >= lvl["tcb"]["isvsvn"]:
            return str(lvl["tcbStatus"])
    raise CheckFailed("tcb_status", f"TDX module {ident_name} SVN {isvsvn} is below every rated level")


def evaluate_tcb(col: Collateral, pck: PckExtension, report: TdReport, qe: QeReport, root: x509.Certificate,
                 at: datetime) -> TcbResult:
    """Verify TCB info and QE identity to `root` at `at` and return the TCB status of this quote."""
    tcb = _verify_signed_json(col.tcb_info, col.tcb_info_signature, col.tcb_info_issuer_chain, root, at,
                              "tcb_info")
    qei = _verify_signed_json(col.qe_identity, col.qe_identity_signature, col.qe_identity_issuer_chain, root,
                              at, "qe_identity")
    if tcb.get("id") != "TDX" or tcb.get("version") != 3:
        raise CheckFailed("tcb_info", f"TCB info id {tcb.get('id')} v{tcb.get('version')} is not TDX v3")
    if bytes.fromhex(tcb["fmspc"]) != pck.fmspc or bytes.fromhex(tcb["pceId"]) != pck.pce_id:
        raise CheckFailed("tcb_info", f"TCB info is for FMSPC {tcb['fmspc']}, the PCK leaf says "
                          f"{pck.fmspc.hex().upper()}; fetch the collateral of this platform")
    # QE identity
    if qei.get("id") != "TD_QE":
        raise CheckFailed("qe_identity", f"QE identity id {qei.get('id')} is not TD_QE")
    if bytes.fromhex(qei["mrsigner"]) != qe.mr_signer or qei["isvprodid"] != qe.isv_prod_id:
        raise CheckFailed("qe_identity", "the quoting enclave's MRSIGNER/ISVPRODID are not Intel's TD QE")
    misc = qe.misc_select.to_bytes(4, "little")
    if not _masked_eq(misc, qei["miscselect"], qei["miscselectMask"]) or \
            not _masked_eq(qe.attributes, qei["attributes"], qei["attributesMask"]):
        raise CheckFailed("qe_identity", "the quoting enclave's MISCSELECT/ATTRIBUTES do not match")
    qe_status = next((str(lv["tcbStatus"]) for lv in qei["tcbLevels"] if qe.isv_svn >= lv["tcb"]["isvsvn"]), None)
    if qe_status is None:
        raise CheckFailed("qe_identity", f"QE ISVSVN {qe.isv_svn} is below every rated level")
    module_status = _module_status(tcb, report)
    start = 2 if report.tee_tcb_svn[1] > 0 else 0
    platform, advisories = None, ()
    for lvl in tcb["tcbLevels"]:
        t = lvl["tcb"]
        sgx = [c["svn"] for c in t["sgxtcbcomponents"]]
        tdx = [c["svn"] for c in t["tdxtcbcomponents"]]
        if len(sgx) != 16 or len(tdx) != 16:
            raise CheckFailed("tcb_info", "a TCB level does not list 16 SGX and 16 TDX components")
        if pck.pce_svn < t["pcesvn"] or any(a < b for a, b in zip(pck.comp_svns, sgx, strict=True)):
            continue
        if any(a < b for a, b in zip(report.tee_tcb_svn[start:], tdx[start:], strict=True)):
            continue
        platform, advisories = str(lvl["tcbStatus"]), tuple(lvl.get("advisoryIDs", ()))
        break
    if platform is None:
        raise CheckFailed("tcb_status", "the platform's TCB is below every level the TCB info rates")
    status = _worst(platform, module_status, qe_status)
    return TcbResult(status, platform, module_status, qe_status, advisories, pck.fmspc.hex())
