"""Confidential deployments: code sealed to a measurement; its key released only to attested replicas.

Scheme (docs/confidential.md, "Key release"):

1. The deployer seals the code bundle under a fresh 32-byte code key:
   `"CSC1" ‖ u32 hlen ‖ header ‖ ChaCha20-Poly1305(code key, nonce 0, aad "CSC1"‖hlen‖header, bundle)`, where the
   header is canonical JSON {"v":1, "fn", "measurement", "policy"}. The gateway stores only this; the code key stays
   with the developer. The release policy (allowed TEE kinds, trusted dev keys, MRTD/RTMR lists, GPU required) is
   in the authenticated header, so nobody in between can loosen it.
2. A replica starts with the sealed bundle and no key, and publishes its attestation document.
3. The developer's key-release agent verifies the document against that policy with the measurement pinned to
   the header's, and answers a grant: `"CKG1" ‖ u32 hlen ‖ header {"v":1,"fn","measurement","kid"} ‖
   HPKE(replica key, info "cocoon/v1 code-key", aad = prefix, code key)`. The gateway forwards it, unreadable.
4. Peer release, so autoscaling works while the developer is offline: a replica holding the key may grant it to
   another replica whose document passes the *same* embedded policy (`ReplicaIdentity.peer_grant`). Both run the
   identical, attested code, so the key never leaves code the developer approved.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.collateral import Collateral
from cocoon_faas.confidential.document import ClientPolicy, VerifiedReplica, canonical_json, verify_document
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.tdx import TdxPolicy

CODE_MAGIC = b"CSC1"
GRANT_MAGIC = b"CKG1"
GRANT_INFO = b"cocoon/v1 code-key"
_NONCE = bytes(12)


def policy_to_json(p: ClientPolicy) -> dict[str, Any]:
    """The portable part of a policy (collateral and roots are the verifier's, not the deployer's)."""
    return {"tee_kinds": sorted(p.tee_kinds), "trusted_dev_keys": sorted(p.trusted_dev_keys),
            "mrtd": sorted(m.hex() for m in p.tdx.mrtd) if p.tdx.mrtd is not None else None,
            "rtmr": {str(i): sorted(x.hex() for x in r) for i, r in enumerate(p.tdx.rtmr) if r is not None},
            "allow_debug": p.tdx.allow_debug, "require_gpu": p.require_gpu}


def policy_from_json(d: dict[str, Any], measurement: str, function: str) -> ClientPolicy:
    tdx = TdxPolicy.build(mrtd=d.get("mrtd"), rtmr={int(k): v for k, v in (d.get("rtmr") or {}).items()},
                          allow_debug=bool(d.get("allow_debug", False)))
    return ClientPolicy(measurements=frozenset({measurement.lower()}), tee_kinds=frozenset(d["tee_kinds"]),
                        trusted_dev_keys=frozenset(d.get("trusted_dev_keys", ())), tdx=tdx,
                        require_gpu=bool(d.get("require_gpu", False)), function=function)


def _split(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], bytes, bytes]:
    if data[:4] != magic or len(data) < 8:
        raise EnvelopeError("envelope", f"not a Cocoon {what} (bad magic)")
    hlen = struct.unpack_from(">I", data, 4)[0]
    if 8 + hlen > len(data):
        raise EnvelopeError("envelope", f"{what} header exceeds the data")
    try:
        header = json.loads(data[8:8 + hlen])
    except ValueError:
        raise EnvelopeError("envelope", f"{what} header is not JSON") from None
    if not isinstance(header, dict) or header.get("v") != 1:
        raise EnvelopeError("envelope", f"{what} version is not 1")
    return header, data[:8 + hlen], data[8 + hlen:]


def _prefix(magic: bytes, header: dict[str, Any]) -> bytes:
    hb = canonical_json(header)
    return magic + struct.pack(">I", len(hb)) + hb


@dataclass(frozen=True)
class SealedCodeHeader:
    function: str
    measurement: str
    policy: ClientPolicy


def seal_code(bundle: bytes, function: str, measurement: str, policy: ClientPolicy, *,
              code_key: bytes | None = None) -> tuple[bytes, bytes]:
    """Seal a code bundle; returns (sealed bytes for the gateway, code key for the developer to keep)."""
    key = code_key or os.urandom(32)
    prefix = _prefix(CODE_MAGIC, {"v": 1, "fn": function, "measurement": measurement.lower(),
                                  "policy": policy_to_json(policy)})
    return prefix + ChaCha20Poly1305(key).encrypt(_NONCE, bundle, prefix), key


def peek_sealed_code(sealed: bytes) -> SealedCodeHeader:
    h, _, _ = _split(sealed, CODE_MAGIC, "sealed code")
    try:
        return SealedCodeHeader(str(h["fn"]), str(h["measurement"]),
                                policy_from_json(h["policy"], str(h["measurement"]), str(h["fn"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError("envelope", f"sealed code header is malformed ({exc})") from None


def open_code(sealed: bytes, code_key: bytes) -> bytes:
    _, prefix, ct = _split(sealed, CODE_MAGIC, "sealed code")
    try:
        return ChaCha20Poly1305(code_key).decrypt(_NONCE, ct, prefix)
    except (InvalidTag, ValueError):
        raise EnvelopeError("decrypt", "the sealed code does not open with this key (altered, or another "
                            "deployment's key)") from None


def grant_code_key(code_key: bytes, sealed: bytes, document: dict[str, Any] | bytes, *,
                   now: datetime | float | None = None, collateral: Collateral | None = None,
                   policy: ClientPolicy | None = None) -> tuple[bytes, VerifiedReplica]:
    """Verify a replica's document against the sealed code's policy and wrap the code key to it."""
    hdr = peek_sealed_code(sealed)
    pol = policy or hdr.policy
    if collateral is not None:
        pol = ClientPolicy(**{**pol.__dict__, "collateral": collateral})
    replica = verify_document(document, pol, now)
    if replica.measurement != hdr.measurement or replica.function != hdr.function:
        raise EnvelopeError("measurement", "the replica does not run the sealed code's measurement")
    open_code(sealed, code_key)  # refuse to hand out a key that does not open this code
    prefix = _prefix(GRANT_MAGIC, {"v": 1, "fn": hdr.function, "measurement": hdr.measurement,
                                   "kid": replica.key_id})
    return prefix + hpke.seal(replica.hpke_public_key, GRANT_INFO, prefix, code_key), replica


def open_grant(grant: bytes, hpke_key: X25519PrivateKey, key_id: str, measurement: str) -> bytes:
    h, prefix, wrapped = _split(grant, GRANT_MAGIC, "key grant")
    if h.get("kid") != key_id or h.get("measurement") != measurement:
        raise EnvelopeError("key_id", "this key grant is for another replica or measurement")
    key = hpke.open_(hpke_key, GRANT_INFO, prefix, wrapped)
    if len(key) != 32:
        raise EnvelopeError("envelope", "a code key must be 32 bytes")
    return key
