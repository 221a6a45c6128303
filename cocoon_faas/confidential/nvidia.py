"""NVIDIA Hopper GPU attestation reports: SPDM 1.1 GET_MEASUREMENTS, signature and certificate chain.

A report is the 37-byte request (version 0x11, code 0xE0, param1, param2, 32-byte nonce, slot id) followed by the
response (0x11, 0x60, param1, param2, block count u8, record length u24 LE, measurement blocks, 32-byte responder
nonce, opaque length u16 LE, opaque data, 96-byte ECDSA-P384 r‖s). The GPU's attestation key signs
SHA-384(request ‖ response without the signature); its certificate chain ends at the NVIDIA Device Identity CA.
Comparing measurements to NVIDIA's signed reference manifests needs the network and is out of scope here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.roots import nvidia_device_root
from cocoon_faas.confidential.x509chain import load_pem_chain, verify_chain

REQUEST_LEN = 37
SIG_LEN = 96


@dataclass(frozen=True)
class GpuReport:
    """A parsed SPDM measurement report."""

    raw: bytes
    request_nonce: bytes
    responder_nonce: bytes
    measurements: dict[int, bytes]
    opaque: dict[int, bytes]
    signature: bytes

    @property
    def signed(self) -> bytes:
        return self.raw[:-SIG_LEN]

    def config(self) -> dict[str, str]:
        """The opaque fields NVIDIA's verifier reports as `config` (names as in its claims)."""
        text = {3: "driver_version", 15: "chip_sku", 16: "chip_sku_mod", 17: "project", 18: "project_sku",
                11: "nvdec0_status", 21: "protected_pcie_status"}
        raw = {14: "board_id", 4: "gpu_info", 13: "cpr_info", 20: "fwid"}
        out = {name: self.opaque[t].rstrip(b"\0").decode() for t, name in text.items() if t in self.opaque}
        out.update({name: self.opaque[t].hex() for t, name in raw.items() if t in self.opaque})
        return out


def _need(b: bytes, n: int, what: str) -> None:
    if len(b) < n:
        raise CheckFailed("gpu_structure", f"GPU report truncated in {what}")


def parse_gpu_report(raw: bytes) -> GpuReport:
    _need(raw, REQUEST_LEN + 8 + SIG_LEN, "header")
    if raw[0] != 0x11 or raw[1] != 0xE0 or raw[REQUEST_LEN] != 0x11 or raw[REQUEST_LEN + 1] != 0x60:
        raise CheckFailed("gpu_structure", "not an SPDM 1.1 GET_MEASUREMENTS request/response pair")
    nonce = raw[4:36]
    resp = raw[REQUEST_LEN:]
    nblocks = resp[4]
    rec_len = int.from_bytes(resp[5:8], "little")
    _need(resp, 8 + rec_len + 34, "measurement record")
    rec, pos = resp[8:8 + rec_len], 0
    meas: dict[int, bytes] = {}
    for _ in range(nblocks):
        _need(rec[pos:], 7, "measurement block")
        index, _spec, size = struct.unpack_from("<BBH", rec, pos)
        _vtype, vsize = struct.unpack_from("<BH", rec, pos + 4)
        meas[index] = rec[pos + 7:pos + 7 + vsize]
        pos += 4 + size
    p = 8 + rec_len
    responder_nonce = resp[p:p + 32]
    olen = int.from_bytes(resp[p + 32:p + 34], "little")
    opaque_raw = resp[p + 34:p + 34 + olen]
    if len(resp) != p + 34 + olen + SIG_LEN:
        raise CheckFailed("gpu_structure", "GPU report length does not match its length fields")
    opaque, q = {}, 0
    while q + 4 <= len(opaque_raw):
        t, n = struct.unpack_from("<HH", opaque_raw, q)
        opaque[t] = opaque_raw[q + 4:q + 4 + n]
        q += 4 + n
    return GpuReport(bytes(raw), nonce, responder_nonce, meas, opaque, raw[-SIG_LEN:])


@dataclass(frozen=True)
class VerifiedGpuReport:
    report: GpuReport
    leaf_subject: str


def verify_gpu_report(raw: bytes, chain_pem: bytes, *, at: datetime | None = None,
                      root: x509.Certificate | None = None,
                      expected_nonce: bytes | None = None) -> VerifiedGpuReport:
    """Verify the chain to the pinned NVIDIA root and the report's P-384 signature; checks `gpu_chain`,
    `gpu_signature`, `gpu_nonce`."""
    rep = parse_gpu_report(raw)
    at = at or datetime.now(timezone.utc)
    try:
        chain = load_pem_chain(chain_pem)
    except ValueError as exc:
        raise CheckFailed("gpu_chain", f"the GPU certificate chain does not parse ({exc})") from None
    leaf = verify_chain(chain, root or nvidia_device_root(), at, "gpu_chain")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CheckFailed("gpu_chain", "the GPU attestation certificate does not hold an EC key")
    der = encode_dss_signature(int.from_bytes(rep.signature[:48], "big"), int.from_bytes(rep.signature[48:], "big"))
    try:
        key.verify(der, rep.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise CheckFailed("gpu_signature", "the GPU report signature does not verify; the report was altered "
                          "or comes from another GPU") from None
    if expected_nonce is not None and rep.request_nonce != expected_nonce:
        raise CheckFailed("gpu_nonce", "the GPU report answers another nonce (a replayed report)")
    return VerifiedGpuReport(rep, leaf.subject.rfc4514_string())
