"""A stand-in Intel hierarchy for the JS SDK's collateral tests (sdk-js/test/py_vectors.py uses it).

Revoking a PCK certificate, or rating a platform differently, needs CRLs and TCB info signed by Intel; tests
cannot have Intel's keys. So this re-issues the real `dcapqvl_v4` PCK chain and its real collateral under a fresh
test root (same names, serials, validity, SGX extension and JSON bodies, new keys), re-signs the QE report with the
new PCK leaf key and, when asked, puts a chosen REPORTDATA in the TD report under a fresh attestation key. Both
verifiers are then pointed at that root (`root=`), and every check runs on real collateral content.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cocoon_faas.confidential.quote import parse_quote
from cocoon_faas.confidential.roots import intel_sgx_root_ca

_SERIAL_MASK = (1 << 159) - 1  # Intel's serials use 160 bits; the builder takes at most 159
_SKIP = (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)  # they name the real keys


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _reissue(cert: x509.Certificate, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             public: ec.EllipticCurvePublicKey) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(issuer).public_key(public)
         .serial_number(cert.serial_number & _SERIAL_MASK).not_valid_before(cert.not_valid_before_utc)
         .not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        if not isinstance(ext.value, _SKIP):
            b = b.add_extension(ext.value, ext.critical)
    return b.sign(key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _crl(real_hex: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, extra_serial: int | None) -> str:
    real = x509.load_der_x509_crl(bytes.fromhex(real_hex))
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(real.last_update_utc)
         .next_update(real.next_update_utc or real.last_update_utc))
    for r in real:
        b = b.add_revoked_certificate(r)
    if extra_serial is not None:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(extra_serial)
                                      .revocation_date(real.last_update_utc).build())
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def resign(tdx_dir: Path, *, revoke_leaf: bool = False, report_data: bytes | None = None,
           edits: dict[str, list[list[str]]] | None = None) -> dict[str, Any]:
    """{quote (bytes), collateral (JSON dict), root (DER)}; `edits`: {"tcb_info"|"qe_identity": [[old, new], ...]}
    replacements made in a signed body before it is signed again."""
    raw = (tdx_dir / "dcapqvl_v4.bin").read_bytes()
    col = json.loads((tdx_dir / "dcapqvl_v4_collateral.json").read_text())
    q = parse_quote(raw)
    real_leaf, real_ca = (x509.load_pem_x509_certificate(p) for p in q.pck_chain_pem[:2])
    real_root = intel_sgx_root_ca()
    root_key, ca_key, leaf_key, tcb_key = _p256(), _p256(), _p256(), _p256()
    root = (x509.CertificateBuilder().subject_name(real_root.subject).issuer_name(real_root.subject)
            .public_key(root_key.public_key()).serial_number(real_root.serial_number & _SERIAL_MASK)
            .not_valid_before(real_root.not_valid_before_utc).not_valid_after(real_root.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(root_key, hashes.SHA256()))
    ca = _reissue(real_ca, root.subject, root_key, ca_key.public_key())
    leaf = _reissue(real_leaf, ca.subject, ca_key, leaf_key.public_key())
    signer = _reissue(x509.load_pem_x509_certificates(col["tcb_info_issuer_chain"].encode())[0], root.subject,
                      root_key, tcb_key.public_key())

    signed, signature, att_key, qe_report = q.signed, q.signature, q.attestation_key, q.qe_report.raw
    if report_data is not None:  # a fresh attestation key signs a TD report carrying `report_data`
        ak = _p256()
        nums = ak.public_key().public_numbers()
        att_key = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        signed = signed[:-64] + report_data
        signature = _raw_sig(ak, signed)
        qe_report = qe_report[:320] + hashlib.sha256(att_key + q.qe_auth_data).digest() + bytes(32)
    pem = _pem(leaf, ca, root).encode()
    cd = (qe_report + _raw_sig(leaf_key, qe_report) + struct.pack("<H", len(q.qe_auth_data)) + q.qe_auth_data
          + struct.pack("<HI", 5, len(pem)) + pem)
    sig_data = signature + att_key + struct.pack("<HI", 6, len(cd)) + cd
    quote = signed + struct.pack("<I", len(sig_data)) + sig_data

    out = dict(col)
    out["root_ca_crl"] = _crl(col["root_ca_crl"], root.subject, root_key, None)
    out["pck_crl"] = _crl(col["pck_crl"], ca.subject, ca_key, leaf.serial_number if revoke_leaf else None)
    out["pck_crl_issuer_chain"] = _pem(ca, root)
    for name in ("tcb_info", "qe_identity"):
        body = col[name]
        for old, new in (edits or {}).get(name, []):
            if old not in body:
                raise ValueError(f"{old!r} is not in {name}")
            body = body.replace(old, new)
        out[name] = body
        out[name + "_signature"] = _raw_sig(tcb_key, body.encode()).hex()
        out[name + "_issuer_chain"] = _pem(signer, root)
    return {"quote": quote, "collateral": out, "root": root.public_bytes(serialization.Encoding.DER)}
