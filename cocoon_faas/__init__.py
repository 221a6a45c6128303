"""Cocoon FaaS: confidential, pay-per-call AI functions.

    import cocoon_faas as cocoon

    @cocoon.function(cpu=1, timeout=30)
    def greet(name: str) -> dict:
        return {"hello": name}
"""

from cocoon_faas.client import Client, FunctionCall
from cocoon_faas.errors import (
    AttestationError,
    AuthenticationError,
    CallCancelledError,
    CallTimeoutError,
    CocoonError,
    FunctionError,
    InvalidRequestError,
    InvalidSpecError,
    NoCapacityError,
    NotFoundError,
    OverloadedError,
    PaymentError,
    PaymentRequiredError,
    PermissionDeniedError,
)
from cocoon_faas.functions import Cls, Function, batched, cls, enter, function, method
from cocoon_faas.spec import FunctionSpec

__all__ = [
    "AttestationError",
    "AuthenticationError",
    "CallCancelledError",
    "CallTimeoutError",
    "Client",
    "Cls",
    "CocoonError",
    "Function",
    "FunctionCall",
    "FunctionError",
    "FunctionSpec",
    "InvalidRequestError",
    "InvalidSpecError",
    "NoCapacityError",
    "NotFoundError",
    "OverloadedError",
    "PaymentError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "batched",
    "cls",
    "enter",
    "function",
    "method",
]
