"""The Intel SGX extension of a PCK leaf certificate (OID 1.2.840.113741.1.13.1): FMSPC, PCE-ID and TCB SVNs.

The extension is a DER `SEQUENCE OF SEQUENCE { OID, value }`; the TCB entry (…13.1.2) nests 16 component SVNs
(…2.1..2.16), the PCESVN (…2.17) and the CPUSVN (…2.18). A few dozen lines of DER reading keep this module free
of an ASN.1 dependency; anything unexpected raises `CheckFailed("pck_extension")`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from cocoon_faas.confidential.errors import CheckFailed

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"


def _tlv(b: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER element at `pos`: (tag, content, next position)."""
    if pos + 2 > len(b):
        raise CheckFailed("pck_extension", "truncated DER in the SGX extension")
    tag, n = b[pos], b[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(b[pos:pos + k], "big")
        pos += k
    if pos + n > len(b):
        raise CheckFailed("pck_extension", "truncated DER in the SGX extension")
    return tag, b[pos:pos + n], pos + n


def _items(b: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(b):
        tag, content, pos = _tlv(b, pos)
        out.append((tag, content))
    return out


def _oid(content: bytes) -> str:
    first = content[0]
    parts, v = [first // 40, first % 40], 0
    for c in content[1:]:
        v = (v << 7) | (c & 0x7F)
        if not c & 0x80:
            parts.append(v)
            v = 0
    return ".".join(map(str, parts))


def _pairs(seq_content: bytes) -> dict[str, tuple[int, bytes]]:
    out = {}
    for tag, content in _items(seq_content):
        if tag != 0x30:
            continue
        inner = _items(content)
        if len(inner) == 2 and inner[0][0] == 0x06:
            out[_oid(inner[0][1])] = inner[1]
    return out


@dataclass(frozen=True)
class PckExtension:
    """What TCB evaluation needs from the PCK leaf."""

    fmspc: bytes
    pce_id: bytes
    cpu_svn: bytes
    comp_svns: tuple[int, ...]
    pce_svn: int


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID)).value
    except x509.ExtensionNotFound:
        raise CheckFailed("pck_extension", "the PCK leaf has no SGX extension; is this an Intel PCK cert?") from None
    raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    tag, content, _ = _tlv(raw, 0)
    top = _pairs(content)
    base = SGX_EXTENSION_OID
    try:
        fmspc = top[base + ".4"][1]
        pce_id = top[base + ".3"][1]
        tcb = _pairs(top[base + ".2"][1])
        comps = tuple(int.from_bytes(tcb[f"{base}.2.{i}"][1], "big") for i in range(1, 17))
        pce_svn = int.from_bytes(tcb[f"{base}.2.17"][1], "big")
        cpu_svn = tcb[f"{base}.2.18"][1]
    except KeyError as exc:
        raise CheckFailed("pck_extension", f"the SGX extension lacks entry {exc.args[0]}") from None
    return PckExtension(fmspc, pce_id, cpu_svn, comps, pce_svn)
