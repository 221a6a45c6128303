"""Confidential calls: TDX/NVIDIA evidence verification, attestation documents, sealed envelopes, key release.

See docs/confidential.md. Replica side: `ReplicaIdentity`; gateway side (no secrets): `peek_envelope`,
`peek_response`; caller side: `verify_document`, `ClientPolicy`, `seal_request`; operators: `verify_quote`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cocoon_faas.confidential.caller import ClientCallContext, seal_request
    from cocoon_faas.confidential.collateral import Collateral
    from cocoon_faas.confidential.document import ClientPolicy, VerifiedReplica, key_id, verify_document
    from cocoon_faas.confidential.envelope import (
        SEALED_CONTENT_TYPE,
        SEALED_FRAME_CONTENT_TYPE,
        EnvelopeHeader,
        Receipt,
        peek_envelope,
        peek_response,
    )
    from cocoon_faas.confidential.errors import (
        CheckFailed,
        EnvelopeError,
        NotSealedToThisReplica,
        QuoteFormatError,
        ReplayError,
    )
    from cocoon_faas.confidential.keyrelease import grant_code_key, open_code, peek_sealed_code, seal_code
    from cocoon_faas.confidential.replica import OpenedRequest, ReplayGuard, ReplicaIdentity
    from cocoon_faas.confidential.tdx import TdxPolicy, VerifiedQuote, check_policy, verify_quote

# Each public name and the submodule that defines it: imported on first use (PEP 562), so a replica or the gateway
# importing one submodule (errors, envelope) does not load the caller's side, the TDX verifier and X.509.
_WHERE = {
    **dict.fromkeys(("ClientCallContext", "seal_request"), "caller"),
    "Collateral": "collateral",
    **dict.fromkeys(("ClientPolicy", "VerifiedReplica", "key_id", "verify_document"), "document"),
    **dict.fromkeys(("SEALED_CONTENT_TYPE", "SEALED_FRAME_CONTENT_TYPE", "EnvelopeHeader", "Receipt",
                     "peek_envelope", "peek_response"), "envelope"),
    **dict.fromkeys(("CheckFailed", "EnvelopeError", "NotSealedToThisReplica", "QuoteFormatError", "ReplayError"),
                    "errors"),
    **dict.fromkeys(("grant_code_key", "open_code", "peek_sealed_code", "seal_code"), "keyrelease"),
    **dict.fromkeys(("OpenedRequest", "ReplayGuard", "ReplicaIdentity"), "replica"),
    **dict.fromkeys(("TdxPolicy", "VerifiedQuote", "check_policy", "verify_quote"), "tdx"),
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "SEALED_CONTENT_TYPE", "SEALED_FRAME_CONTENT_TYPE", "CheckFailed", "ClientCallContext", "ClientPolicy",
    "Collateral", "EnvelopeError", "EnvelopeHeader", "NotSealedToThisReplica", "OpenedRequest", "QuoteFormatError",
    "Receipt", "ReplayError", "ReplayGuard", "ReplicaIdentity", "TdxPolicy", "VerifiedQuote", "VerifiedReplica",
    "check_policy", "grant_code_key", "key_id", "open_code", "peek_envelope", "peek_response", "peek_sealed_code",
    "seal_code", "seal_request", "verify_document", "verify_quote",
]
