"""A provider node's attestation: proof that it runs the platform's measured worker, and the key the gateway
seals the cluster's secrets to.

The node makes an X25519 key pair and an attestation document in the format of sealed calls
(:mod:`cocoon_faas.confidential.document`): ``function`` is ``NODE_FUNCTION``, ``measurement`` the worker image's
measurement (:func:`worker_measurement`), ``hpke_public_key`` the node's sealing key and ``receipt_public_key``
the wallet's key (so one wallet's document cannot be presented by another). The evidence (a TDX quote, or on
machines without a TEE a development signature that only a gateway told to trust that key accepts) binds all of
it. The wallet's signed registration names the document's ``key_id``.

The gateway answers an admitted node with its secrets (session token, Ray address, Ray token) sealed to that key
(:func:`seal_secrets`, HPKE base mode with ``SEAL_INFO`` and the node id as associated data): only the process
holding the attested key can join the cluster.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cocoon_faas.confidential import hpke
from cocoon_faas.confidential.document import (
    DOCUMENT_VERSION,
    canonical_json,
    dev_evidence,
    document_binding,
    key_id,
    load_or_create_dev_key,
    tdx_evidence,
)
from cocoon_faas.confidential.errors import EnvelopeError
from cocoon_faas.confidential.replica import tsm_quote
from cocoon_faas.errors import AuthenticationError, InvalidRequestError

NODE_FUNCTION = "cocoon-provider-node"
SEAL_INFO = b"cocoon-provider-admission/v1"
MAX_SECRETS_BYTES = 16 * 1024


@lru_cache(maxsize=1)
def worker_measurement() -> str:
    """SHA-256 over the worker's code (every module of the installed ``cocoon_faas`` package, by path): what a
    provider node runs. A TDX worker image measures the same tree into its RTMRs; the development path uses this
    digest directly."""
    import cocoon_faas

    h = hashlib.sha256(b"cocoon-worker-measurement/v1\x00")
    for label, root in (("sdk", Path(cocoon_faas.__file__).parent), ("runtime", Path(__file__).parent)):
        for path in sorted(root.rglob("*.py")):
            rel = f"{label}/{path.relative_to(root).as_posix()}"
            h.update(rel.encode() + b"\x00" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class NodeIdentity:
    """The node's sealing key and its attestation document."""

    hpke_private: bytes
    hpke_public: bytes
    document: dict[str, Any]

    @property
    def key_id(self) -> str:
        return key_id(self.hpke_public)

    @classmethod
    def create(cls, wallet_public_key: bytes, *, evidence: str = "dev", home: Path | None = None,
               measurement: str | None = None, ttl_s: float = 3600.0, now: float | None = None) -> NodeIdentity:
        """Fresh keys and a document; ``evidence`` is ``tdx`` (configfs-tsm quote) or ``dev`` (the development
        key under ``home``: NOT SECURE, accepted only by a gateway that trusts that key)."""
        if evidence not in ("dev", "tdx"):
            raise InvalidRequestError(f"attestation evidence must be 'dev' or 'tdx', not {evidence!r}")
        sk, pk = hpke.generate()
        t = int(time.time() if now is None else now)
        body: dict[str, Any] = {
            "v": DOCUMENT_VERSION, "function": NODE_FUNCTION, "measurement": measurement or worker_measurement(),
            "runtime_version": "node-1", "tee": evidence, "hpke_public_key": pk.hex(),
            "receipt_public_key": wallet_public_key.hex(), "key_id": key_id(pk), "issued_at": t,
            "expires_at": t + int(ttl_s)}
        if evidence == "dev":
            from cocoon_faas.settings import get_settings

            ev = dev_evidence(body, load_or_create_dev_key(home or get_settings().home))
        else:
            ev = tdx_evidence(tsm_quote(document_binding(body)))
        return cls(sk, pk, {**body, "evidence": ev})

    def open_secrets(self, sealed_b64: str, node_id: str) -> dict[str, Any]:
        """Open what the gateway sealed to this node; AuthenticationError when it was not sealed to this key."""
        try:
            data = base64.b64decode(sealed_b64, validate=True)
            plain = hpke.open_(self.hpke_private, SEAL_INFO, node_id.encode(), data, self.hpke_public)
            out = json.loads(plain)
        except (ValueError, EnvelopeError) as exc:
            raise AuthenticationError(f"the gateway's sealed answer does not open with this node's attested key "
                                      f"({exc}); join again") from None
        if not isinstance(out, dict):
            raise AuthenticationError("the gateway's sealed answer is not an object; join again")
        return out


def seal_secrets(hpke_public: bytes, node_id: str, secrets: dict[str, Any]) -> str:
    """The gateway side: ``secrets`` sealed to an attested node's key (base64 of enc ‖ ciphertext)."""
    plain = canonical_json(secrets)
    if len(plain) > MAX_SECRETS_BYTES:
        raise ValueError("sealed admission secrets are unexpectedly large")
    return base64.b64encode(hpke.seal(hpke_public, SEAL_INFO, node_id.encode(), plain)).decode()


def dev_key_hex(home: Path) -> str:
    """The development attestation public key a node under ``home`` signs with (what a gateway must trust)."""
    from cocoon_faas.confidential.document import dev_public_key_hex

    return dev_public_key_hex(load_or_create_dev_key(home))


__all__ = ["MAX_SECRETS_BYTES", "NODE_FUNCTION", "SEAL_INFO", "NodeIdentity", "dev_key_hex", "seal_secrets",
           "worker_measurement"]
