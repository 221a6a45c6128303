"""Failures of the confidential layer, each naming the check that failed.

Every exception here is an `AttestationError` (the one tree in `cocoon_faas.errors`) with a machine-readable
`check` attribute (also in `details`, so the gateway's JSON error shape carries it): `pck_chain`,
`quote_signature`, `report_data`, `receipt_signature`, `replay`, ... Tests and operators match on `check`.
"""

from __future__ import annotations

from typing import Any

from cocoon_faas.errors import AttestationError


class CheckFailed(AttestationError):
    """Raised when one attestation or policy check fails; `check` names it."""

    def __init__(self, check: str, message: str, **details: Any) -> None:
        super().__init__(f"{check}: {message}", check=check, **details)
        self.check = check


class QuoteFormatError(CheckFailed):
    """Raised when a quote's bytes do not parse (truncated, wrong lengths, unknown version)."""


class EnvelopeError(CheckFailed):
    """Raised when a sealed envelope, reply or receipt fails to parse, decrypt or authenticate."""


class ReplayError(EnvelopeError):
    """Raised by a replica for a request id it has seen, or a timestamp outside its window."""

    status = 409
    type = "replayed_request"


class NotSealedToThisReplica(EnvelopeError):
    """Raised when a sealed request names no key this replica holds: the client's documents are stale."""

    status = 421
    type = "stale_keys"
