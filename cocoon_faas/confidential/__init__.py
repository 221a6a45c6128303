"""Confidential calls: TDX/NVIDIA evidence verification, attestation documents, sealed envelopes, key release.

See docs/confidential.md. Replica side: `ReplicaIdentity`; gateway side (no secrets): `peek_envelope`,
`peek_response`; caller side: `verify_document`, `ClientPolicy`, `seal_request`; operators: `verify_quote`.
"""

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

__all__ = [
    "SEALED_CONTENT_TYPE", "SEALED_FRAME_CONTENT_TYPE", "CheckFailed", "ClientCallContext", "ClientPolicy",
    "Collateral", "EnvelopeError", "EnvelopeHeader", "NotSealedToThisReplica", "OpenedRequest", "QuoteFormatError",
    "Receipt", "ReplayError", "ReplayGuard", "ReplicaIdentity", "TdxPolicy", "VerifiedQuote", "VerifiedReplica",
    "check_policy", "grant_code_key", "key_id", "open_code", "peek_envelope", "peek_response", "peek_sealed_code",
    "seal_code", "seal_request", "verify_document", "verify_quote",
]
