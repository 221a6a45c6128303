"""Intel TDX DCAP quotes, v4 and v5: parsing by the length fields (spec: ../shared/specs/attestation.md).

All integers are little-endian. A v4 quote is a 48-byte header, a 584-byte TD report (TD 1.0), then the signature
data; v5 inserts `body_type u16` and `body_size u32` after the header (TD 1.0 = 584 bytes, TD 1.5 = 648 bytes).
The signed region is everything before the signature data. Bytes after the structure (padding, text) are
ignored: real quote buffers often carry them. Parsing never verifies; see `tdx.verify_quote`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from cocoon_faas.confidential.errors import QuoteFormatError

HEADER_LEN = 48
TD10_LEN = 584
TD15_LEN = 648
QE_REPORT_LEN = 384
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_TYPE_QE_REPORT = 6
CERT_TYPE_PCK_CHAIN = 5
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuoteFormatError(
                "structure", f"quote truncated reading {what}: need {n} bytes at offset {self.pos}, "
                f"have {len(self.data) - self.pos}; pass the whole quote file"
            )
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    reserved: bytes
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """The TD report body (TD 1.0, or TD 1.5 with `tee_tcb_svn2` and `mr_service_td`)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES bit 0: a debug TD's memory is readable by the host; it must be refused."""
        return bool(self.td_attributes[0] & 1)

    @property
    def septve_disable(self) -> bool:
        return bool(self.td_attributes[3] & 0x10)

    @classmethod
    def from_bytes(cls, b: bytes) -> TdReport:
        if len(b) not in (TD10_LEN, TD15_LEN):
            raise QuoteFormatError("structure", f"TD report must be {TD10_LEN} or {TD15_LEN} bytes, got {len(b)}")
        f = [b[o:o + n] for o, n in ((0, 16), (16, 48), (64, 48), (112, 8), (120, 8), (128, 8), (136, 48),
                                     (184, 48), (232, 48), (280, 48))]
        rtmr = (b[328:376], b[376:424], b[424:472], b[472:520])
        extra = (b[584:600], b[600:648]) if len(b) == TD15_LEN else (None, None)
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], rtmr=rtmr, report_data=b[520:584],
                   tee_tcb_svn2=extra[0], mr_service_td=extra[1])

    def to_dict(self) -> dict[str, object]:
        """Hex fields, named as operators and trustee name them."""
        d: dict[str, object] = {
            "tee_tcb_svn": self.tee_tcb_svn.hex(), "mr_seam": self.mr_seam.hex(),
            "mrsigner_seam": self.mr_signer_seam.hex(), "seam_attributes": self.seam_attributes.hex(),
            "td_attributes": self.td_attributes.hex(), "xfam": self.xfam.hex(), "mrtd": self.mr_td.hex(),
            "mr_config_id": self.mr_config_id.hex(), "mr_owner": self.mr_owner.hex(),
            "mr_owner_config": self.mr_owner_config.hex(),
            **{f"rtmr{i}": r.hex() for i, r in enumerate(self.rtmr)},
            "report_data": self.report_data.hex(), "debug": self.debug,
        }
        if self.tee_tcb_svn2 is not None and self.mr_service_td is not None:
            d["tee_tcb_svn2"] = self.tee_tcb_svn2.hex()
            d["mr_service_td"] = self.mr_service_td.hex()
        return d


@dataclass(frozen=True)
class QeReport:
    """The quoting enclave's SGX report body (384 bytes), signed by the PCK leaf key."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @classmethod
    def from_bytes(cls, b: bytes) -> QeReport:
        if len(b) != QE_REPORT_LEN:
            raise QuoteFormatError("structure", f"QE report must be {QE_REPORT_LEN} bytes, got {len(b)}")
        misc, = struct.unpack_from("<I", b, 16)
        prod, svn = struct.unpack_from("<HH", b, 256)
        return cls(b, b[0:16], misc, b[48:64], b[64:96], b[128:160], prod, svn, b[320:384])


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote; `signed` is the region the attestation key signed, `length` what the structure used."""

    header: QuoteHeader
    body_type: int
    report: TdReport
    signed: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: tuple[bytes, ...]
    length: int

    @classmethod
    def from_bytes(cls, data: bytes) -> TdxQuote:
        return parse_quote(data)


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a v4 or v5 TDX quote; trailing bytes after the structure are tolerated."""
    r = _Reader(bytes(data))
    raw_header = r.take(HEADER_LEN, "header")
    version, akt, tee = struct.unpack_from("<HHI", raw_header, 0)
    header = QuoteHeader(version, akt, tee, raw_header[8:12], raw_header[12:28], raw_header[28:48])
    if version == 4:
        body_type, body_len = 2, TD10_LEN
    elif version == 5:
        body_type, body_len = r.u16("body type"), r.u32("body size")
        expected = {2: TD10_LEN, 3: TD15_LEN}.get(body_type)
        if expected is None or body_len != expected:
            raise QuoteFormatError("structure", f"v5 body type {body_type} with size {body_len} is not a TD report "
                                   "(type 2 = 584 bytes, 3 = 648 bytes)")
    else:
        raise QuoteFormatError("header", f"quote version {version} is not supported; only TDX v4 and v5 are")
    if tee != TEE_TYPE_TDX:
        raise QuoteFormatError("header", f"tee_type 0x{tee:x} is not TDX (0x81); this is not a TDX quote")
    report = TdReport.from_bytes(r.take(body_len, "TD report"))
    signed = r.data[:r.pos]
    sig_len = r.u32("signature data length")
    sig = _Reader(r.take(sig_len, "signature data"))
    signature = sig.take(64, "quote signature")
    att_key = sig.take(64, "attestation key")
    cert_type = sig.u16("certification data type")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise QuoteFormatError("structure", f"certification data type {cert_type}; expected 6 (QE report)")
    cd = _Reader(sig.take(sig.u32("certification data size"), "certification data"))
    qe_report = QeReport.from_bytes(cd.take(QE_REPORT_LEN, "QE report"))
    qe_sig = cd.take(64, "QE report signature")
    auth = cd.take(cd.u16("QE auth data length"), "QE auth data")
    inner_type = cd.u16("PCK certification data type")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise QuoteFormatError("structure", f"PCK certification data type {inner_type}; expected 5 (PEM chain)")
    pem = cd.take(cd.u32("PCK chain size"), "PCK chain")
    chain = tuple(m.group(0) for m in _PEM_CERT.finditer(pem))
    if not chain:
        raise QuoteFormatError("structure", "the quote carries no PCK certificate chain")
    return TdxQuote(header, body_type, report, signed, signature, att_key, qe_report, qe_sig, auth, chain, r.pos)
