"""The one exception tree of Cocoon FaaS.

Every error the platform raises is a `CocoonError`. Each subclass carries the HTTP status and the `type` string
used in the one JSON error shape the gateway answers with: ``{"error": {"type": ..., "message": ...}}``. The
client maps that shape back into the same subclass, so SDK users catch the same exceptions locally and remotely.

    CocoonError
    ├── InvalidSpecError        bad decorator arguments (raised at decoration time)
    ├── InvalidRequestError     400: malformed JSON, unknown/missing/mistyped argument, bad CLI input
    ├── AuthenticationError     401: missing or unknown API key
    ├── PaymentRequiredError    402: no payment, or not enough channel credit
    ├── PaymentError            400/409: a forged, stale, replayed or foreign payment state
    ├── PermissionDeniedError   403: the key may not touch this resource
    ├── NotFoundError           404: unknown function, version or call
    ├── ConflictError           409: the request contradicts current state
    ├── PayloadTooLargeError    413: body over the limit
    ├── StaleKeysError          421: a sealed call was wrapped to replica keys that are gone
    ├── OverloadedError         429: every replica busy and the queue full
    ├── FunctionError           500: the user's code raised
    │   └── MemoryExceededError 500: the user's code ran out of its memory= limit
    ├── ReplicaLostError        502: the replica died mid-call and no retry was left
    ├── NoCapacityError         503: nothing can run this function now
    ├── CallTimeoutError        504: the call ran past its time limit
    ├── CallCancelledError      499: the call was cancelled
    ├── AttestationError        attestation evidence or policy check failed
    └── GatewayUnreachableError the client could not reach the gateway
"""

from __future__ import annotations

from typing import Any


class CocoonError(Exception):
    """Raised for any Cocoon FaaS failure; the root of the tree."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.details}}


class InvalidSpecError(CocoonError, ValueError):
    """Raised when decorator arguments are wrong; the message says what to write instead."""

    status = 400
    type = "invalid_spec"


class InvalidRequestError(CocoonError, ValueError):
    """Raised when a request (HTTP body, CLI argument, SDK call) is malformed."""

    status = 400
    type = "invalid_request"


class AuthenticationError(CocoonError):
    """Raised when an API key is missing or unknown."""

    status = 401
    type = "authentication_error"


class PaymentRequiredError(CocoonError):
    """Raised when a call carries no payment or the channel lacks credit for its hold."""

    status = 402
    type = "payment_required"


class PaymentError(CocoonError):
    """Raised when a payment state is forged, stale, replayed or for another channel."""

    status = 400
    type = "invalid_payment"


class PermissionDeniedError(CocoonError):
    """Raised when a key may not change the resource (another developer's function)."""

    status = 403
    type = "permission_denied"


class NotFoundError(CocoonError, LookupError):
    """Raised when a function, version or call does not exist."""

    status = 404
    type = "not_found"


class ConflictError(CocoonError):
    """Raised when a request contradicts the current state (a taken name, a finished call)."""

    status = 409
    type = "conflict"


class PayloadTooLargeError(CocoonError):
    """Raised when a request body is over the configured limit."""

    status = 413
    type = "payload_too_large"


class StaleKeysError(CocoonError):
    """Raised when a sealed call names replica keys the gateway no longer has; refetch and retry."""

    status = 421
    type = "stale_keys"


class OverloadedError(CocoonError):
    """Raised when every replica is busy and the queue is full; retry after `retry_after` seconds."""

    status = 429
    type = "overloaded"


class FunctionError(CocoonError):
    """Raised when the user's function raised; carries the exception type and message."""

    status = 500
    type = "function_error"


class MemoryExceededError(FunctionError):
    """Raised when the function ran out of the memory its spec allows (`memory=`); the replica survives."""

    status = 500
    type = "memory_exceeded"


class ReplicaLostError(CocoonError):
    """Raised when a replica died during a call and no retry was left."""

    status = 502
    type = "replica_lost"


class NoCapacityError(CocoonError):
    """Raised when no replica can be started for the function (missing resource, no provider)."""

    status = 503
    type = "no_capacity"


class CallTimeoutError(CocoonError, TimeoutError):
    """Raised when a call runs past its time limit."""

    status = 504
    type = "timeout"


class CallCancelledError(CocoonError):
    """Raised when a call was cancelled before it finished."""

    status = 499
    type = "cancelled"


class AttestationError(CocoonError):
    """Raised when attestation evidence or the client's policy check fails; names the failed check."""

    status = 400
    type = "attestation_error"


class GatewayUnreachableError(CocoonError, ConnectionError):
    """Raised by the client when it cannot reach the gateway."""

    status = 503
    type = "gateway_unreachable"


_BY_TYPE: dict[str, type[CocoonError]] = {
    cls.type: cls
    for cls in [
        CocoonError, InvalidSpecError, InvalidRequestError, AuthenticationError, PaymentRequiredError,
        PaymentError, PermissionDeniedError, NotFoundError, ConflictError, PayloadTooLargeError,
        StaleKeysError, OverloadedError, FunctionError, MemoryExceededError, ReplicaLostError, NoCapacityError, CallTimeoutError,
        CallCancelledError, AttestationError, GatewayUnreachableError,
    ]
}


def error_from_body(status: int, body: Any) -> CocoonError:
    """Rebuild the exception the gateway raised from its JSON error shape."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):  # not a Cocoon gateway's answer (a wrong port or path, a proxy's page)
        text = " ".join(str(body).split())  # one line, whatever page came back
        return CocoonError(f"the server answered HTTP {status} without a Cocoon error ({text[:120]!r}); check that "
                           "COCOON_GATEWAY_URL (or --gateway) is a Cocoon gateway's address, e.g. "
                           "http://127.0.0.1:8000")
    details = {k: v for k, v in err.items() if k not in ("type", "message")}
    cls = _BY_TYPE.get(str(err.get("type")), CocoonError)
    exc = cls(str(err.get("message", "")), **details)
    exc.status = status
    return exc
