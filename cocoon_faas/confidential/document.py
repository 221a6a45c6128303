"""Attestation documents: what a replica publishes so clients can seal calls to it (DESIGN.md, confidential call).

A document is a JSON object: the *body* (function, measurement, runtime version, HPKE and receipt public keys,
key id, issue/expiry times, TEE kind, optional GPU evidence hash) plus `evidence`. The evidence binds the body:
its REPORTDATA (TDX) or signed message (dev) is

    binding = SHA-512("cocoon-attestation-document/v1" ‖ 0x00 ‖ canonical_json(body))

so a quote cannot be replayed beside other keys. Evidence kinds: `tdx` (a quote from configfs-tsm, optionally
an NVIDIA GPU report whose SHA-256 sits in the body) and `dev` (an Ed25519 signature by a local development key:
accepted only by clients told to trust that exact key, and always shown as NOT SECURE).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cocoon_faas.confidential.collateral import Collateral
from cocoon_faas.confidential.errors import CheckFailed
from cocoon_faas.confidential.nvidia import verify_gpu_report
from cocoon_faas.confidential.tdx import TdxPolicy, VerifiedQuote, check_policy, verify_quote

DOCUMENT_VERSION = 1
_DOMAIN = b"cocoon-attestation-document/v1\x00"
_KEY_ID_DOMAIN = b"cocoon-hpke-key-id/v1\x00"
INSECURE_WARNING = "NOT SECURE: development attestation signed by a local key; no TEE protects this replica"
DEV_KEY_FILE = "dev_attestation_key"
TEE_KINDS = ("tdx", "dev")


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding that is hashed and signed: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(hpke_public_key: bytes) -> str:
    """The routing-visible fingerprint of a replica's HPKE public key (16 bytes, hex)."""
    return hashlib.sha256(_KEY_ID_DOMAIN + hpke_public_key).digest()[:16].hex()


def document_binding(body: dict[str, Any]) -> bytes:
    """The 64 bytes the evidence must carry: SHA-512 over the domain tag and the canonical body."""
    return hashlib.sha512(_DOMAIN + canonical_json(body)).digest()


def split_document(doc: dict[str, Any] | bytes | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(body, evidence) of a document given as a dict or its JSON."""
    if isinstance(doc, (bytes, str)):
        try:
            doc = json.loads(doc)
        except ValueError:
            raise CheckFailed("document", "the attestation document is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("evidence"), dict):
        raise CheckFailed("document", "the attestation document has no `evidence` object")
    body = {k: v for k, v in doc.items() if k != "evidence"}
    return body, doc["evidence"]


# -- development attestation key ---------------------------------------------------------------------------

def load_or_create_dev_key(home: Path) -> Ed25519PrivateKey:
    """The local development attestation key under `home` (created 0600 on first use)."""
    path = Path(home) / DEV_KEY_FILE
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise CheckFailed("dev_key", f"{path} is not a 32-byte Ed25519 key; delete it to make a new one")
        return Ed25519PrivateKey.from_private_bytes(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_bytes(key.private_bytes_raw())
    tmp.replace(path)
    return key


def dev_public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes_raw().hex()


def dev_evidence(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"kind": "dev", "dev_public_key": dev_public_key_hex(key),
            "signature": key.sign(document_binding(body)).hex(), "warning": INSECURE_WARNING}


def tdx_evidence(quote: bytes, gpu_report: bytes | None = None, gpu_chain_pem: bytes | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"kind": "tdx", "quote": base64.b64encode(quote).decode()}
    if gpu_report is not None and gpu_chain_pem is not None:
        ev["nvidia"] = {"report": gpu_report.hex(), "cert_chain": gpu_chain_pem.decode()}
    return ev


def gpu_evidence_sha256(gpu_report: bytes, gpu_chain_pem: bytes) -> str:
    return hashlib.sha256(gpu_report + b"\x00" + gpu_chain_pem).hexdigest()


# -- client policy and verification ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientPolicy:
    """What a client accepts. `measurements=None` accepts any measurement (say so explicitly); dev evidence
    needs both "dev" in `tee_kinds` and its key in `trusted_dev_keys` (hex Ed25519 public keys)."""

    measurements: frozenset[str] | None
    tee_kinds: frozenset[str] = frozenset({"tdx"})
    trusted_dev_keys: frozenset[str] = frozenset()
    tdx: TdxPolicy = field(default_factory=TdxPolicy)
    collateral: Collateral | None = None
    root: x509.Certificate | None = None
    require_gpu: bool = False
    function: str | None = None
    max_clock_skew_s: float = 300.0

    @classmethod
    def build(cls, measurements: Iterable[str] | str | None, *, allow_dev_keys: Iterable[str] = (),
              tee_kinds: Iterable[str] | None = None, **kw: Any) -> ClientPolicy:
        """Convenience: trusting a dev key also allows the "dev" TEE kind."""
        if isinstance(measurements, str):
            measurements = [measurements]
        dev = frozenset(k.lower() for k in allow_dev_keys)
        kinds = frozenset(tee_kinds) if tee_kinds is not None else frozenset({"tdx"} | ({"dev"} if dev else set()))
        ms = frozenset(m.lower() for m in measurements) if measurements is not None else None
        return cls(measurements=ms, tee_kinds=kinds, trusted_dev_keys=dev, **kw)


@dataclass(frozen=True)
class VerifiedReplica:
    """A replica whose document passed the client's policy: the keys a call may be sealed to."""

    function: str
    measurement: str
    runtime_version: str
    key_id: str
    hpke_public_key: bytes
    receipt_public_key: bytes
    tee: str
    expires_at: float
    insecure: bool
    document: dict[str, Any] = field(repr=False)
    quote: VerifiedQuote | None = field(default=None, repr=False)

    @property
    def receipt_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.receipt_public_key)


def _hex(body: dict[str, Any], name: str, length: int) -> bytes:
    try:
        v = bytes.fromhex(str(body[name]))
    except (KeyError, ValueError):
        raise CheckFailed("document", f"document field `{name}` is missing or not hex") from None
    if len(v) != length:
        raise CheckFailed("document", f"document field `{name}` must be {length} bytes")
    return v


def _utc(now: datetime | float | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if isinstance(now, (int, float)):
        return datetime.fromtimestamp(now, timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


def verify_document(doc: dict[str, Any] | bytes | str, policy: ClientPolicy,
                    now: datetime | float | None = None) -> VerifiedReplica:
    """Verify a document's evidence and the client's policy; raise `CheckFailed` naming the failed check."""
    body, ev = split_document(doc)
    at = _utc(now)
    ts = at.timestamp()
    if body.get("v") != DOCUMENT_VERSION:
        raise CheckFailed("document", f"document version {body.get('v')!r} is not {DOCUMENT_VERSION}; upgrade")
    try:
        function, measurement = str(body["function"]), str(body["measurement"]).lower()
        runtime_version, tee = str(body["runtime_version"]), str(body["tee"])
        issued, expires = float(body["issued_at"]), float(body["expires_at"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckFailed("document", f"document field {exc} is missing or malformed") from None
    hpke_pk, receipt_pk = _hex(body, "hpke_public_key", 32), _hex(body, "receipt_public_key", 32)
    if policy.function is not None and function != policy.function:
        raise CheckFailed("function", f"document is for function '{function}', not '{policy.function}'")
    if ts > expires:
        raise CheckFailed("expired", f"document expired {ts - expires:.0f}s ago; refetch the documents")
    if issued > ts + policy.max_clock_skew_s:
        raise CheckFailed("document", "document issued in the future; check the clocks")
    if policy.measurements is not None and measurement not in policy.measurements:
        raise CheckFailed("measurement", f"measurement {measurement[:16]}... is not one this client allows "
                          "(by default: the measurement `cocoon deploy` printed)")
    if tee not in policy.tee_kinds or ev.get("kind") != tee:
        raise CheckFailed("tee_kind", f"TEE kind '{ev.get('kind')}' (document says '{tee}') is not allowed; "
                          f"allowed: {sorted(policy.tee_kinds)}")
    if body.get("key_id") != key_id(hpke_pk):
        raise CheckFailed("key_id", "document key_id is not the fingerprint of its HPKE key")
    binding = document_binding(body)
    quote = None
    if tee == "dev":
        dev_pk = str(ev.get("dev_public_key", "")).lower()
        if dev_pk not in policy.trusted_dev_keys:
            raise CheckFailed("dev_key_untrusted", f"dev attestation key {dev_pk[:16]}... is not trusted. "
                              f"{INSECURE_WARNING}. Pass --allow-dev-attestation to trust it explicitly")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(dev_pk)).verify(
                bytes.fromhex(str(ev.get("signature", ""))), binding)
        except (ValueError, InvalidSignature):
            raise CheckFailed("dev_signature", "the dev attestation signature does not cover this document") from None
    elif tee == "tdx":
        try:
            raw_quote = base64.b64decode(str(ev["quote"]), validate=True)
        except (KeyError, ValueError):
            raise CheckFailed("document", "tdx evidence has no base64 `quote`") from None
        quote = verify_quote(raw_quote, at=at, root=policy.root, collateral=policy.collateral)
        check_policy(quote, policy.tdx, binding)
    else:
        raise CheckFailed("tee_kind", f"unknown TEE kind '{tee}'")
    _check_gpu(body, ev, policy, at)
    return VerifiedReplica(function, measurement, runtime_version, str(body["key_id"]), hpke_pk, receipt_pk, tee,
                           expires, tee == "dev", {**body, "evidence": ev}, quote)


def _check_gpu(body: dict[str, Any], ev: dict[str, Any], policy: ClientPolicy, at: datetime) -> None:
    claimed = body.get("gpu_evidence_sha256")
    nv = ev.get("nvidia")
    if claimed is None and not policy.require_gpu:
        return
    if claimed is None or not isinstance(nv, dict):
        raise CheckFailed("gpu_evidence", "policy requires NVIDIA GPU evidence and the document has none")
    report, chain = bytes.fromhex(str(nv.get("report", ""))), str(nv.get("cert_chain", "")).encode()
    if gpu_evidence_sha256(report, chain) != claimed:
        raise CheckFailed("gpu_evidence", "the GPU evidence is not the one the document's binding covers")
    verify_gpu_report(report, chain, at=at)
